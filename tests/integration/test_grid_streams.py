"""benchmarks/grid_streams.py: a grid's cells as parallel processes give what ``declora compare`` gives."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_grid_file

from declora.compare import SKIPPED, cell_state, expand, load_grid, run_grid

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "grid_streams.py"


def _streams():
    spec = importlib.util.spec_from_file_location("grid_streams", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(tmp_path, tiny_bert, axes=None, seeds=(0, 1)) -> Path:
    axes = axes or {"algorithm.name": ["dec_lora", "fedavg"]}
    return tiny_grid_file(tmp_path, tiny_bert, grid=axes, seeds=list(seeds), metric="acc_node_mean")


def _evals(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k.startswith(("acc_", "bytes"))}
        for r in records
        if r["event"] == "eval"
    ]


def test_only_cell_narrows_the_grid_to_each_cell_in_expands_order(tmp_path, tiny_bert):
    axes = {"algorithm.name": ["dec_lora", "fedavg"], "topology.graph": ["ring", "complete", "star"]}
    grid = load_grid(_grid(tmp_path, tiny_bert, axes), out=str(tmp_path / "out"))
    cells = expand(grid)
    assert len(cells) == 12
    for k, cell in enumerate(cells):
        (only,) = expand(_streams().only_cell(grid, k))
        assert (only.run_dir, only.overrides) == (cell.run_dir, cell.overrides)


def test_cells_in_parallel_processes_equal_the_sequential_grid(tmp_path, tiny_bert):
    path = _grid(tmp_path, tiny_bert)
    parallel = subprocess.run(
        [sys.executable, str(SCRIPT), "run", str(path), "--out", str(tmp_path / "par"), "--jobs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    assert "4 of 4 cells finished" in parallel.stdout
    serial = load_grid(path, out=str(tmp_path / "seq"))
    run_grid(serial)
    for cell in expand(serial):
        twin = tmp_path / "par" / cell.run_dir.name
        assert _evals(twin) == _evals(cell.run_dir)  # same seed, same process-independent numbers
    # the folders are compare's own: a later compare finds every cell finished
    assert all(cell_state(c) in SKIPPED for c in expand(load_grid(path, out=str(tmp_path / "par"))))
    with (tmp_path / "par" / "comparison.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert len(rows) == 2 and all(r["runs"] == "2" for r in rows.values())
    assert (tmp_path / "par" / "comparison.md").read_text().startswith("4 of 4 cells finished")


def test_a_deadline_stops_the_cells_and_a_later_grid_finishes_them(tmp_path, tiny_bert):
    path = _grid(tmp_path, tiny_bert, seeds=(0,))
    out = tmp_path / "cut"
    cut = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "run",
            str(path),
            "--out",
            str(out),
            "--jobs",
            "1",
            "--deadline-s",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cut.returncode == 1, cut.stdout[-3000:] + cut.stderr[-3000:]
    assert "deadline: stopping 1 running cells, 1 not started" in cut.stdout
    assert not (out / "comparison.md").exists()  # no table of nothing
    grid = load_grid(path, out=str(out))
    run_grid(grid)
    assert all(cell_state(c) == "done" for c in expand(grid))
