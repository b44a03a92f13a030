"""``declora compare --jobs J``: a grid's cells in J processes give the sequential grid's numbers; Ctrl-C
stops every cell and the same command finishes the grid; a failed cell is named with its log."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import as_at_a_terminal, tiny_grid_file

from declora.compare import SKIPPED, cell_state, expand, load_grid, only_cell, run_grid
from declora.compare_jobs import cell_digest, cell_env, label, pick_gpu, run_parallel
from declora.config import ConfigError

pytestmark = pytest.mark.integration


def _grid(tmp_path: Path, tiny_bert: Path, seeds=(0, 1), more=()) -> Path:
    axes = {"algorithm.name": ["dec_lora", "fedavg"]}
    return tiny_grid_file(tmp_path, tiny_bert, more, grid=axes, seeds=list(seeds), metric="acc_node_mean")


def _compare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "declora", "compare", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _evals(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k.startswith(("acc_", "bytes"))}
        for r in records
        if r["event"] == "eval"
    ]


def test_only_cell_narrows_the_grid_to_each_cell_in_expands_order(tmp_path, tiny_bert):
    axes = {"algorithm.name": ["dec_lora", "fedavg"], "topology.graph": ["ring", "complete", "star"]}
    grid = load_grid(tiny_grid_file(tmp_path, tiny_bert, grid=axes), out=str(tmp_path / "out"))
    cells = expand(grid)
    assert len(cells) == 12
    for k, cell in enumerate(cells):
        (only,) = expand(only_cell(grid, k))
        assert (only.run_dir, only.overrides) == (cell.run_dir, cell.overrides)
    with pytest.raises(ConfigError, match=r"grid cell 12: the grid has 12 cells \(0 onwards\)"):
        only_cell(grid, 12)


def test_cells_in_parallel_processes_equal_the_sequential_grid(tmp_path, tiny_bert):
    path = _grid(tmp_path, tiny_bert)
    parallel = _compare(str(path), "--out", str(tmp_path / "par"), "--jobs", "2")
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    out = parallel.stdout
    assert "4 of 4 cells to run, 2 at once" in out
    assert out.count(": finished (") == 4 and "[4/4] algorithm.name=fedavg seed=1: running" in out
    serial = load_grid(path, out=str(tmp_path / "seq"))
    run_grid(serial)
    for cell in expand(serial):
        twin = tmp_path / "par" / cell.run_dir.name
        assert _evals(twin) == _evals(cell.run_dir)  # same seed, same process-independent numbers
        log = (tmp_path / "par" / "cell_logs" / f"{cell.run_dir.name}.log").read_text()
        assert "round 2/2" in log  # each cell's own progress lines
    with (tmp_path / "par" / "comparison.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert len(rows) == 2 and all(r["runs"] == "2" for r in rows.values())
    again = _compare(str(path), "--out", str(tmp_path / "par"), "--jobs", "2")  # nothing left to run
    assert again.returncode == 0 and "0 of 4 cells to run" in again.stdout
    assert again.stdout.count(": finished, skipped") == 4


def _start_grid(tmp_path: Path, tiny_bert: Path, rounds: int = 40) -> tuple[subprocess.Popen, list, Path]:
    """A --jobs 2 grid of ``rounds``-round cells, returned once a cell has checkpointed a round."""
    path = _grid(tmp_path, tiny_bert, more=(f"rounds={rounds}",))
    cmd = [sys.executable, "-m", "declora", "compare", str(path), "--jobs", "2"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, preexec_fn=as_at_a_terminal, **pipes)
    cells = expand(load_grid(path))
    end = time.monotonic() + 300
    while time.monotonic() < end and not any((c.run_dir / "state" / "latest.json").is_file() for c in cells):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    return proc, cells, path


def _cells_of(parent: int) -> list[str]:
    """The pids of the cell processes the command ``parent`` started (they name it: --cell-parent)."""
    found = subprocess.run(["pgrep", "-f", "--", f"--cell-parent {parent}"], capture_output=True, text=True)
    return found.stdout.split()


def _stop_grid(tmp_path, tiny_bert, sig: int, code: int, what: str) -> tuple[list, list[str], Path]:
    """Start a --jobs 2 grid, send the command ``sig`` once a cell has checkpointed: it exits ``code``,
    saying ``what`` and how to go on, after stopping its two cells as one run stops on SIGTERM."""
    # 200 rounds (about 10 s of a cell on an idle machine): with 40 (2 s) one cell once finished all its
    # rounds before the command's signal reached it, and so was not stopped
    proc, cells, path = _start_grid(tmp_path, tiny_bert, rounds=200)
    out = tmp_path / "grid"
    assert len(_cells_of(proc.pid)) == 2
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout[-2000:] + stderr[-2000:]
    assert "stopping 2 cells" in stdout and not _cells_of(proc.pid)
    assert f"declora: {what}; finished cells are kept: the same declora compare command continues" in stderr
    assert not (out / "comparison.md").exists()
    for cell in cells[:2]:  # the two that ran stopped as one run does on SIGTERM, keeping their checkpoint
        assert "declora: terminated" in (out / "cell_logs" / f"{cell.run_dir.name}.log").read_text()
    assert not (out / "cell_logs" / f"{cells[2].run_dir.name}.log").exists()  # never started
    states = [cell_state(c) for c in cells]
    assert "partial" in states and "done" not in states
    return cells, states, path


def test_ctrl_c_stops_every_cell_and_the_same_command_finishes_the_grid(tmp_path, tiny_bert):
    cells, states, path = _stop_grid(tmp_path, tiny_bert, signal.SIGINT, 130, "interrupted")
    out = tmp_path / "grid"
    again = _compare(str(path), "--jobs", "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    resumed = [c for c, state in zip(cells, states, strict=True) if state == "partial"]
    assert all(f"{label(cells.index(c), 4, c)}: resuming" in again.stdout for c in resumed)
    assert all(cell_state(c) in SKIPPED for c in cells) and (out / "comparison.md").is_file()
    log = (out / "cell_logs" / f"{resumed[0].run_dir.name}.log").read_text()  # both tries kept
    assert log.count("declora compare --jobs starts this cell") == 2 and "declora: terminated" in log


def test_a_closed_terminal_stops_every_cell_as_ctrl_c_does(tmp_path, tiny_bert):
    """SIGHUP: exit 129 and its own words; the cells stop and keep their checkpoints as under Ctrl-C, so
    the same command goes on from them (shown for Ctrl-C above)."""
    _stop_grid(tmp_path, tiny_bert, signal.SIGHUP, 129, "hung up (its terminal closed)")


def test_cells_stop_when_the_command_that_started_them_is_killed(tmp_path, tiny_bert):
    # rounds enough that no cell can finish in the second or two its watch takes to notice (with 40, both
    # cells of a fast machine once finished first); the grid is never run to its end here
    proc, cells, _ = _start_grid(tmp_path, tiny_bert, rounds=5000)
    assert len(_cells_of(proc.pid)) == 2
    proc.kill()  # SIGKILL: the command cannot stop its cells; each notices and stops itself
    proc.communicate(timeout=60)
    end = time.monotonic() + 60
    while _cells_of(proc.pid) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _cells_of(proc.pid)
    assert [cell_state(c) for c in cells[:2]].count("partial") >= 1


def test_a_failed_cell_is_named_with_its_log_and_no_new_cell_starts(tmp_path, tiny_bert):
    axes = {"algorithm.name": ["dec_lora", "fedavg", "local"]}
    path = tiny_grid_file(tmp_path, tiny_bert, grid=axes, seeds=[0])
    env = {**os.environ, "DECLORA_CRASH_AT": "round.logged"}  # every cell fails after its first round
    failed = _compare(str(path), "--jobs", "2", env=env)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    lines = failed.stderr.splitlines()
    named = [line for line in lines if line.startswith("declora: error: [")]
    assert len(named) == 2  # the two running cells, each with the last line of its log and the log's path
    assert all("failed (exit 1): declora.runfolder.CrashPoint: round.logged:1; log: " in s for s in named)
    assert "mend what failed and run the same command again" in lines[-1]
    cells = expand(load_grid(path))
    assert not cells[-1].run_dir.exists()  # the third cell did not start after the failures
    assert not (tmp_path / "grid" / "comparison.md").exists()


def test_a_cell_process_refuses_a_grid_changed_since_the_command_checked_it(tmp_path, tiny_bert):
    path = _grid(tmp_path, tiny_bert)
    cell = expand(load_grid(path))[0]
    wrong = _compare(str(path), "--cell", "0", "--cell-config", "0" * 16, "--cell-parent", str(os.getpid()))
    assert wrong.returncode == 2
    assert (
        wrong.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"declora: error: grid cell {cell.run_dir.name}: the grid file or its base config changed after "
            "this `declora compare --jobs` started"
        )
    )
    assert not cell.run_dir.exists()  # nothing ran
    alone = _compare(str(path), "--cell", "0")  # the flag given by hand
    assert alone.returncode == 2 and "--cell is the flag declora compare --jobs gives" in alone.stderr


def test_a_second_compare_on_a_grid_in_use_is_refused(tmp_path, tiny_bert):
    from declora.compare import holding_grid

    path = _grid(tmp_path, tiny_bert)
    with holding_grid(tmp_path / "grid"):  # as another declora compare holds it
        second = _compare(str(path), "--jobs", "2")
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"declora: error: grid folder {str(tmp_path / 'grid')!r} is in use by another declora compare: wait "
        "for it to finish or stop it; two grids writing one folder would run the same cells"
    )
    assert not (tmp_path / "grid").exists()  # the lock's folder, made and removed by the holder


def test_jobs_below_one_is_refused_before_any_work(tmp_path, tiny_bert):
    path = _grid(tmp_path, tiny_bert)
    bad = _compare(str(path), "--jobs", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "declora: error: --jobs 0: give how many cells run at once, 1 or more (1: one after another)"
    )
    assert not (tmp_path / "grid").exists()


def test_each_cell_takes_its_share_of_the_cpus_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("declora.compare_jobs.cpu_count", lambda: 16)
    assert cell_env(4)["OMP_NUM_THREADS"] == "4"
    assert cell_env(32)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting is kept
    assert cell_env(4)["OMP_NUM_THREADS"] == "3"


class _Started:
    """In place of subprocess.Popen: records each cell's command and environment, and ends at once with
    the exit status ``code`` (a negative one: killed by that signal)."""

    envs: list[dict] = []
    cmds: list[list[str]] = []
    code = 0

    def __init__(self, cmd, env=None, **kwargs):
        _Started.cmds.append(cmd)
        _Started.envs.append(env)

    def poll(self):
        return _Started.code


def test_with_several_gpus_each_cell_gets_the_least_busy_one(tmp_path, tiny_bert, monkeypatch):
    grid = load_grid(_grid(tmp_path, tiny_bert))  # device auto: 4 cells
    cells = expand(grid)
    assert pick_gpu(cells[0], ["0"], []) is None  # one GPU: nothing to spread
    assert pick_gpu(cells[0], ["0", "1", "2"], ["0", "2", None]) == "1"
    assert pick_gpu(cells[0], ["0", "1"], ["0", "1"]) == "0"  # a tie: the first
    on_cpu = expand(load_grid(_grid(tmp_path, tiny_bert, more=("device=cpu",))))
    assert pick_gpu(on_cpu[0], ["0", "1"], []) is None
    monkeypatch.setattr("declora.compare_jobs.visible_gpus", lambda: ["4", "7"])
    monkeypatch.setattr("declora.compare_jobs.subprocess.Popen", _Started)
    _Started.envs, _Started.cmds = [], []
    lines: list[str] = []
    run_parallel(grid, "grid.yaml", [], jobs=2, say=lines.append)
    # two at once, each on its own GPU; when both have ended the next two start on them again
    assert [env["CUDA_VISIBLE_DEVICES"] for env in _Started.envs] == ["4", "7", "4", "7"]
    assert "[2/4] algorithm.name=dec_lora seed=1: running on GPU 7" in lines
    cmd = _Started.cmds[1]  # the second cell's own process: its place, its config's fingerprint, our pid
    assert cmd[cmd.index("--cell") + 1] == "1" and cmd[cmd.index("--cell-parent") + 1] == str(os.getpid())
    assert cmd[cmd.index("--cell-config") + 1] == cell_digest(cells[1])


def test_a_cell_killed_by_a_signal_is_said_so(tmp_path, tiny_bert, monkeypatch):
    grid = load_grid(_grid(tmp_path, tiny_bert, seeds=(0,)))
    monkeypatch.setattr("declora.compare_jobs.subprocess.Popen", _Started)
    monkeypatch.setattr(_Started, "code", -signal.SIGKILL)
    lines: list[str] = []
    outcome = run_parallel(grid, "grid.yaml", [], jobs=1, say=lines.append)
    assert (
        len(outcome.failed) == 1
        and "[1/2] algorithm.name=dec_lora seed=0: killed by SIGKILL (out of " in (outcome.failed[0])
    )
    assert not any("fedavg" in line for line in lines[1:])  # no new cell after a failure


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch

    from declora.compare_jobs import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []  # no CUDA here: the variable names no GPU a cell could use
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for this process
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
