"""benchmarks/grid_streams.py: ``declora compare --jobs`` stopped at a deadline, then the table of the
finished cells (the parallel cells themselves: test_compare_jobs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_grid_file

from declora.compare import cell_state, expand, load_grid, only_cell, run_grid

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "grid_streams.py"


def _streams(path: Path, out: Path, deadline_s: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "run",
        str(path),
        "--out",
        str(out),
        "--jobs",
        "1",
        "--deadline-s",
        deadline_s,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_a_deadline_stops_the_cells_and_a_later_grid_finishes_them(tmp_path, tiny_bert):
    axes = {"algorithm.name": ["dec_lora", "fedavg", "local"]}
    path = tiny_grid_file(tmp_path, tiny_bert, grid=axes, seeds=[0], metric="acc_node_mean")
    out = tmp_path / "cut"
    grid = load_grid(path, out=str(out))
    run_grid(only_cell(grid, 1))  # fedavg finished before
    cut = _streams(path, out, "0.5")
    assert cut.returncode == 1, cut.stdout[-3000:] + cut.stderr[-3000:]
    assert "[2/3] algorithm.name=fedavg seed=0: finished, skipped" in cut.stdout
    assert "deadline of 0.5 s: 1 running, 1 not started" in cut.stdout
    assert "stopping 1 cell: algorithm.name=dec_lora_seed=0" in cut.stdout
    assert "1 of 3 cells finished" in cut.stdout
    table = (out / "comparison.md").read_text()  # the finished cell's, saying it is one of three
    assert table.startswith("1 of 3 cells finished") and "fedavg" in table and "dec_lora" not in table
    run_grid(grid)  # a later grid resumes the stopped cell and runs the one never started
    assert all(cell_state(c) == "done" for c in expand(grid))
