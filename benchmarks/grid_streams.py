"""One compare grid as parallel processes, stopped at a deadline, then the table of its finished cells.

``declora compare GRID --jobs J`` runs a grid's cells J at once, each in its own process, and writes the
table when every cell has finished. The GPU scripts (fidelity_gpu.sh, gpu_check.sh) have a fixed time on a
lent machine, so this adds a deadline: at --deadline-s the running cells are stopped (each keeps its last
checkpoint) and OUT/comparison.md, .csv and .png are written from the finished cells, the table saying how
many of the grid's cells that is. A later ``declora compare GRID --out OUT`` skips the finished cells and
resumes the rest.

    python benchmarks/grid_streams.py run GRID [--out OUT] [--jobs J] [--deadline-s S] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from the source tree, no install needed
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))

from declora.compare import SKIPPED, cell_state, group_cells, load_grid, pair_groups  # noqa: E402
from declora.compare_jobs import run_parallel  # noqa: E402
from declora.compare_table import write_comparison  # noqa: E402
from declora.config import ConfigError  # noqa: E402


def run_cells(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, tuple(args.overrides), args.out)
    began = time.monotonic()
    outcome = run_parallel(grid, args.grid, args.overrides, args.jobs, args.deadline_s or None)
    cells = outcome.cells
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="every cell not finished yet, then the table of the finished cells")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cells at once (default: CPUs)")
    p.add_argument("--deadline-s", type=float, default=0.0, help="stop the cells after this (0: never)")
    p.add_argument("grid")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default=None)
    p.set_defaults(func=run_cells)
    args, extra = parser.parse_known_args()  # key=value words after a flag land in extra
    if any(word.startswith("-") for word in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ConfigError as err:  # a bad grid or cell: one line, as declora compare says it
        print(f"grid_streams: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
