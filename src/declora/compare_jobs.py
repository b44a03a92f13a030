"""``declora compare --jobs J``: a grid's cells in J processes at once.

A run of a small model leaves most of a GPU idle between its kernel launches, and a many-core CPU gives
one run more threads than it can use; several cells side by side then finish a grid sooner. Each cell
runs as its own ``declora compare GRID --cell K`` process: the same code and the same folders as the
sequential grid, so a later ``declora compare`` skips what finished. A cell's console output goes to
OUT/cell_logs/CELL.log. Ctrl-C (or SIGTERM) stops every running cell as it stops one run, each keeping
its last checkpoint, and the same command continues the grid. A cell that fails stops no other: the
running cells finish, no new one starts, and the command names the failed cell and its log. With
several GPUs each cell is given the least busy one.

On a 2-core CPU it does not pay: each process pays its own start (benchmarks/README.md measures it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from declora.compare import SKIPPED, STATE_WORDS, Cell, Grid, cell_state, checked_cells, expand, only_cell
from declora.config import ConfigError, to_dict
from declora.runfolder import logged_rounds

STOP_WAIT_S = 60.0  # a stopped cell's last checkpoint is already on disk; this only lets it exit cleanly


@dataclass
class Job:
    index: int  # the cell's place in the grid's order
    cell: Cell
    proc: subprocess.Popen
    log: Path
    began: float
    gpu: str | None = None  # the GPU the cell was given (CUDA_VISIBLE_DEVICES), None: left as it was


@dataclass
class Outcome:
    cells: list[Cell]  # every cell of the grid, in order
    failed: list[str] = field(default_factory=list)  # one line per cell that failed
    stopped: bool = False  # the deadline stopped cells before the grid finished


def say_now(line: str) -> None:
    print(line, flush=True)  # a log file or a pipe reads each line as it comes


def label(k: int, total: int, cell: Cell) -> str:
    return f"[{k + 1}/{total}] {cell.method} seed={cell.seed}"


def cpu_count() -> int:
    """The CPUs this process may run on (a container's or a batch job's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cell_env(jobs: int) -> dict[str, str]:
    """The cells' environment: without a ``threads`` of its own a cell takes CPUs / jobs threads, so that
    J processes of torch's default (every core each) do not oversubscribe the machine."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // jobs)))
    return env


def visible_gpus() -> list[str]:
    """The GPUs the cells may spread over: CUDA_VISIBLE_DEVICES's entries where it is set, else every GPU
    torch sees (none on a machine without CUDA)."""
    import torch

    if not torch.cuda.is_available():  # CUDA_VISIBLE_DEVICES set on a machine without CUDA names nothing
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    return [str(k) for k in range(torch.cuda.device_count())]


def pick_gpu(cell: Cell, gpus: list[str], busy: list[str | None]) -> str | None:
    """With several GPUs, a cell that asks for CUDA without naming one (device auto or cuda) gets the GPU
    the fewest running cells have, as its only visible GPU; None leaves its environment as it is (one GPU,
    the CPU, or a cell that names cuda:K itself)."""
    device = cell.cfg.device if cell.cfg is not None else "auto"
    if len(gpus) < 2 or device not in ("auto", "cuda"):
        return None
    return min(gpus, key=lambda gpu: (busy.count(gpu), gpus.index(gpu)))


def cell_digest(cell: Cell) -> str:
    """A fingerprint of the cell's resolved config, its folder included. The cell's process reads the grid
    again; with it, it checks that it runs the cell the command meant (a grid file or base config edited
    meanwhile would give another)."""
    text = json.dumps(
        to_dict(cell.cfg) if cell.cfg is not None else cell.overrides, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_command(
    grid_file: str, overrides: list[str], out: Path, index: int, digest: str, verbose: bool = False
) -> list[str]:
    own = ["--cell", str(index), "--cell-config", digest, "--cell-parent", str(os.getpid())]
    return [
        sys.executable,
        "-m",
        "declora",
        *(["-v"] if verbose else []),
        "compare",
        grid_file,
        *overrides,
        "--out",
        str(out),
        *own,
    ]


def the_cell(grid: Grid, index: int, digest: str) -> Grid:
    """In a cell's process: the grid narrowed to the cell the command meant, or a ConfigError if the grid
    now gives another cell at that place (nothing runs)."""
    narrowed = only_cell(grid, index)
    (cell,) = expand(narrowed)
    if cell_digest(cell) != digest:
        raise ConfigError(
            f"grid cell {cell.run_dir.name}: the grid file or its base config changed after this `declora "
            "compare --jobs` started, so the cell at this place is not the one it checked; nothing ran. "
            "Run the command again (cells run with the old config are then refused, named)"
        )
    return narrowed


def stop_with(parent_pid: int) -> None:
    """In a cell's process: stop as on SIGTERM (the last checkpoint kept) once the command that started it
    is gone (killed, or its terminal closed), instead of training on unattended."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="declora-parent-watch", daemon=True).start()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _ended(job: Job, code: int, total: int) -> tuple[str, bool]:
    """The line that says how a cell ended, and whether it failed."""
    took = f"{time.monotonic() - job.began:.0f} s"
    which = label(job.index, total, job.cell)
    if code < 0:  # a signal from outside: the kernel's out-of-memory killer, or someone's kill
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (out of memory, or a kill)" if -code == signal.SIGKILL else ""
        return f"{which}: killed by {name}{why} after {took}; log: {job.log}", True
    if code != 0:
        return f"{which}: failed (exit {code}): {_last_line(job.log)}; log: {job.log}", True
    try:
        state = cell_state(job.cell)
    except ConfigError as err:  # its folder no longer matches the grid: say so, stop no other cell
        return f"{which}: {err}", True
    if state == "diverged":
        return f"{which}: diverged (NaN or Inf), kept as it stopped ({took})", False
    return f"{which}: {'finished' if state == 'done' else state} ({took})", False


def _cells(count: int) -> str:
    return f"{count} cell" if count == 1 else f"{count} cells"


def _status(running: dict[int, Job], finished: int, total: int) -> str:
    def where(job: Job) -> str:
        which, done = label(job.index, total, job.cell), logged_rounds(job.cell.run_dir)
        rounds = job.cell.cfg.rounds if job.cell.cfg is not None else "?"
        return f"{which} round {done}/{rounds}" if done else f"{which} starting"

    return f"running: {'; '.join(where(j) for j in running.values())}; {finished} of {_cells(total)} finished"


def stop(running: dict[int, Job], say: Callable[[str], None]) -> None:
    """SIGTERM to every running cell (each unwinds as one run does: its last checkpoint kept; SIGINT would
    not do, a process started with SIGINT ignored keeps ignoring it), SIGKILL after STOP_WAIT_S."""
    if not running:
        return
    say(f"stopping {_cells(len(running))}: {', '.join(j.cell.run_dir.name for j in running.values())}")
    for job in running.values():
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < end and any(j.proc.poll() is None for j in running.values()):
        time.sleep(0.2)
    for job in running.values():
        if job.proc.poll() is None:
            job.proc.kill()
        job.proc.wait()


def run_parallel(
    grid: Grid,
    grid_file: str,
    overrides: list[str],
    jobs: int,
    deadline_s: float | None = None,
    say: Callable[[str], None] = say_now,
    status_every_s: float = 60.0,
    verbose: bool = False,
) -> Outcome:
    """Run the grid's unfinished cells, ``jobs`` at once, each ``declora compare grid_file overrides --out
    grid.out --cell K ...`` in a process of its own session (so a terminal's Ctrl-C reaches this process,
    which stops them, and not each cell twice). ``deadline_s``: stop the running cells then."""
    cells, states = checked_cells(grid)  # every cell checked before any process starts
    total = len(cells)
    todo = [k for k, state in enumerate(states) if state not in SKIPPED]
    for k, state in enumerate(states):
        if state in SKIPPED:
            say(f"{label(k, total, cells[k])}: {STATE_WORDS[state]}")
    outcome = Outcome(cells)
    if not todo:
        say(f"0 of {_cells(total)} to run")
        return outcome
    logs = grid.out / "cell_logs"
    logs.mkdir(parents=True, exist_ok=True)
    env, gpus = cell_env(jobs), visible_gpus()
    say(f"{len(todo)} of {_cells(total)} to run, {min(jobs, len(todo))} at once; their output: {logs}")
    began = time.monotonic()
    running: dict[int, Job] = {}
    finished, last_status = total - len(todo), began
    try:
        while running or (todo and not outcome.failed):  # after a failure no new cell starts
            now = time.monotonic()
            if deadline_s is not None and now - began > deadline_s:
                say(f"deadline of {deadline_s:g} s: {len(running)} running, {len(todo)} not started")
                outcome.stopped = True
                break
            for k, job in list(running.items()):
                code = job.proc.poll()
                if code is not None:
                    del running[k]
                    line, failed = _ended(job, code, total)
                    say(line)
                    finished += not failed
                    if failed:
                        outcome.failed.append(line)
                        if running and len(outcome.failed) == 1:
                            left = _cells(len(running))
                            say(f"no new cell starts after a failure; waiting for the {left} running")
            while todo and len(running) < jobs and not outcome.failed:
                k = todo.pop(0)
                running[k] = _start(k, cells[k], grid_file, overrides, grid.out, env, gpus, running, verbose)
                on = "" if running[k].gpu is None else f" on GPU {running[k].gpu}"
                say(f"{label(k, total, cells[k])}: {STATE_WORDS[states[k]]}{on}")
            if running and now - last_status >= status_every_s:
                say(_status(running, finished, total))
                last_status = now
            time.sleep(0.2)
    finally:  # Ctrl-C, SIGTERM, SIGHUP, the deadline or an error here: no cell is left running unattended
        stop(running, say)
    return outcome


def _start(
    k: int,
    cell: Cell,
    grid_file: str,
    overrides: list[str],
    out: Path,
    env: dict[str, str],
    gpus: list[str],
    running: dict[int, Job],
    verbose: bool,
) -> Job:
    """Cell ``k``'s process, its output appended to its log (a rerun keeps what an earlier try said)."""
    gpu = pick_gpu(cell, gpus, [j.gpu for j in running.values()])
    log = out / "cell_logs" / f"{cell.run_dir.name}.log"
    with log.open("a") as sink:
        sink.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: declora compare --jobs starts this cell ---\n")
        sink.flush()
        proc = subprocess.Popen(
            cell_command(grid_file, overrides, out, k, cell_digest(cell), verbose),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu},
            start_new_session=True,
        )
    return Job(k, cell, proc, log, time.monotonic(), gpu)
