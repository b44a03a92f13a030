"""One compare grid as parallel processes on one machine, stopped at a deadline, then its table.

``declora compare`` runs a grid's cells one after another. On a GPU a small model's run is bound by kernel
launches and Python, not by the device, so several processes share it well; on a many-core CPU each
process can take one thread. This runs each cell as ``python grid_streams.py cell GRID --index K`` in its
own process, at most --jobs at once, stops the cells still running at --deadline-s (SIGINT, then SIGKILL)
and writes OUT/comparison.md, .csv and .png from the finished cells (the table says how many of the grid's
cells that is). The cell folders are the ones ``declora compare`` makes, so a later ``declora compare GRID
--out OUT`` skips the finished cells and resumes the rest.

    python benchmarks/grid_streams.py run GRID [--out OUT] [--jobs J] [--deadline-s S] [key=value ...]

On a CPU add ``threads=1`` (or CPUs / J): J processes of several threads each oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from the source tree, no install needed

from declora.compare import (  # noqa: E402 (after the path)
    SKIPPED,
    Grid,
    cell_state,
    expand,
    group_cells,
    load_grid,
    pair_groups,
    run_grid,
    write_comparison,
)


def only_cell(grid: Grid, index: int) -> Grid:
    """The grid narrowed to its ``index``-th cell, in expand's order (axes' product outside, seeds inside)."""
    combos = list(itertools.product(*grid.axes.values()))
    values = combos[index // len(grid.seeds)]
    axes = {key: [value] for key, value in zip(grid.axes, values, strict=True)}
    return dataclasses.replace(grid, axes=axes, seeds=(grid.seeds[index % len(grid.seeds)],))


def run_cells(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, tuple(args.overrides), args.out)
    cells = expand(grid)  # every cell's config checked before any process starts
    began = time.monotonic()
    deadline = began + args.deadline_s if args.deadline_s else None
    logs = grid.out / "cell_logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = [k for k, cell in enumerate(cells) if cell_state(cell) not in SKIPPED]
    running: dict[int, subprocess.Popen] = {}
    print(f"{args.grid}: {len(todo)} of {len(cells)} cells to run, {args.jobs} at once", flush=True)
    while todo or running:
        if deadline is not None and time.monotonic() > deadline:
            print(f"deadline: stopping {len(running)} running cells, {len(todo)} not started", flush=True)
            stop(list(running.values()))
            break
        for k, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"  {cells[k].run_dir.name}: exit {running.pop(k).returncode}", flush=True)
        while todo and len(running) < args.jobs:
            k = todo.pop(0)
            cmd = [sys.executable, __file__, "cell", args.grid, "--index", str(k), *args.overrides]
            if args.out:
                cmd += ["--out", args.out]
            with (logs / f"{cells[k].run_dir.name}.log").open("w") as log:
                running[k] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1)
    done = [c for c in cells if cell_state(c) in SKIPPED]
    took = time.monotonic() - began
    print(f"{args.grid}: {len(done)} of {len(cells)} cells finished, {took:.0f} s", flush=True)
    if done:
        groups = pair_groups(done, grid.pair_within)
        table = write_comparison(group_cells(done), grid.out, grid.metric, grid.target_accuracy, groups)
        md = grid.out / "comparison.md"
        md.write_text(f"{len(done)} of {len(cells)} cells finished ({took:.0f} s).\n\n{md.read_text()}")
        print(table)
    return 0 if len(done) == len(cells) else 1


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT (a run saves what it can), then SIGKILL after 10 s."""
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    end = time.monotonic() + 10
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def run_cell(args: argparse.Namespace) -> int:
    grid = only_cell(load_grid(args.grid, tuple(args.overrides), args.out), args.index)
    (cell,) = run_grid(grid)
    print(f"{cell.run_dir.name}: {cell_state(cell)}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="every cell not finished yet, then the grid's table")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cells at once (default: CPUs)")
    p.add_argument("--deadline-s", type=float, default=0.0, help="stop the cells after this (0: never)")
    p.set_defaults(func=run_cells)
    q = sub.add_parser("cell", help="one cell (run by `run`)")
    q.add_argument("--index", type=int, required=True, help="the cell's place in the grid's order")
    q.set_defaults(func=run_cell)
    for x in (p, q):
        x.add_argument("grid")
        x.add_argument("overrides", nargs="*")
        x.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()  # key=value words after a flag land in extra
    if any(word.startswith("-") for word in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
