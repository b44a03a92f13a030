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

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from declora.compare import SKIPPED, STATE_WORDS, Cell, Grid, cell_state, checked_cells
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
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(k) for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def pick_gpu(cell: Cell, gpus: list[str], busy: list[str | None]) -> str | None:
    """With several GPUs, a cell that asks for CUDA without naming one (device auto or cuda) gets the GPU
    the fewest running cells have, as its only visible GPU; None leaves its environment as it is (one GPU,
    the CPU, or a cell that names cuda:K itself)."""
    device = cell.cfg.device if cell.cfg is not None else "auto"
    if len(gpus) < 2 or device not in ("auto", "cuda"):
        return None
    return min(gpus, key=lambda gpu: (busy.count(gpu), gpus.index(gpu)))


def cell_command(grid_file: str, overrides: list[str], out: Path, index: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "declora",
        "compare",
        grid_file,
        *overrides,
        "--out",
        str(out),
        "--cell",
        str(index),
    ]


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _ended(job: Job, code: int, total: int) -> tuple[str, bool]:
    """The line that says how a cell ended, and whether it failed."""
    took = f"{time.monotonic() - job.began:.0f} s"
    which = label(job.index, total, job.cell)
    if code != 0:
        return f"{which}: failed (exit {code}): {_last_line(job.log)}; log: {job.log}", True
    state = cell_state(job.cell)
    if state == "diverged":
        return f"{which}: diverged (NaN or Inf), kept as it stopped ({took})", False
    return f"{which}: {'finished' if state == 'done' else state} ({took})", False


def _status(running: dict[int, Job], finished: int, total: int) -> str:
    def where(job: Job) -> str:
        done, rounds = logged_rounds(job.cell.run_dir), job.cell.cfg.rounds if job.cell.cfg else "?"
        return f"{job.cell.run_dir.name} round {done}/{rounds}"

    return f"running: {', '.join(where(j) for j in running.values())}; {finished} of {total} cells finished"


def stop(running: dict[int, Job], say: Callable[[str], None]) -> None:
    """SIGINT to every running cell (each saves and exits as one run does on Ctrl-C), SIGKILL after
    STOP_WAIT_S."""
    if not running:
        return
    say(f"stopping {len(running)} running cells: {', '.join(j.cell.run_dir.name for j in running.values())}")
    for job in running.values():
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGINT)
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
) -> Outcome:
    """Run the grid's unfinished cells, ``jobs`` at once, each ``declora compare grid_file overrides --out
    grid.out --cell K`` in a process of its own session (so a terminal's Ctrl-C reaches this process,
    which stops them, and not each cell twice). ``deadline_s``: stop the running cells then."""
    cells, states = checked_cells(grid)  # every cell checked before any process starts
    total = len(cells)
    todo = [k for k, state in enumerate(states) if state not in SKIPPED]
    for k, state in enumerate(states):
        if state in SKIPPED:
            say(f"{label(k, total, cells[k])}: {STATE_WORDS[state]}")
    logs = grid.out / "cell_logs"
    logs.mkdir(parents=True, exist_ok=True)
    env, gpus = cell_env(jobs), visible_gpus()
    say(f"{len(todo)} of {total} cells to run, {min(jobs, len(todo))} at once; their output: {logs}")
    began = time.monotonic()
    outcome = Outcome(cells)
    running: dict[int, Job] = {}
    finished, last_status = total - len(todo), began
    try:
        while running or (todo and not outcome.failed):  # after a failure no new cell starts
            now = time.monotonic()
            if deadline_s is not None and now - began > deadline_s:
                say(f"deadline of {deadline_s:g} s: {len(running)} cells running, {len(todo)} not started")
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
            while todo and len(running) < jobs and not outcome.failed:
                k = todo.pop(0)
                gpu = pick_gpu(cells[k], gpus, [j.gpu for j in running.values()])
                its_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
                log = logs / f"{cells[k].run_dir.name}.log"
                with log.open("w") as sink:
                    proc = subprocess.Popen(
                        cell_command(grid_file, overrides, grid.out, k),
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        env=its_env,
                        start_new_session=True,
                    )
                running[k] = Job(k, cells[k], proc, log, time.monotonic(), gpu)
                on = "" if gpu is None else f" on GPU {gpu}"
                say(f"{label(k, total, cells[k])}: {STATE_WORDS[states[k]]}{on}")
            if running and now - last_status >= status_every_s:
                say(_status(running, finished, total))
                last_status = now
            time.sleep(0.2)
    finally:  # Ctrl-C, SIGTERM, the deadline or an error here: no cell is left running unattended
        stop(running, say)
    return outcome
