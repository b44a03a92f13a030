"""Compare methods like a paper does: a grid of runs, one folder per cell, and one table and figure set.

A grid file names a base config, fixed overrides, the axes to sweep and the seeds::

    base: configs/smoke.yaml
    out: runs/compare-smoke
    overrides: [rounds=6]
    grid:
      algorithm.name: [dec_lora, local, fedavg]
      topology.graph: [ring, complete]
    seeds: [0, 1]
    metric: acc_avg_factors        # the accuracy the table ranks
    target_accuracy: 0.6           # bytes needed to first reach it

A perplexity metric (``ppl_*``, task.kind=causal_lm) ranks the other way: best is the lowest, and
``target_accuracy`` is then a perplexity to get down to (first evaluation with metric <= target).

Cells already finished are skipped and half-finished ones resume, so a stopped grid continues.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from declora.allowed import CHOICES
from declora.config import Config, ConfigError, load_config, parse_override, python_value, read_yaml, to_dict
from declora.report import (
    diverged_at,
    lower_is_better,
    patience_stopped_at,
    read_metrics,
)
from declora.resume_rules import check_resume, resume_changes
from declora.validation import check_measured

log = logging.getLogger(__name__)
# The metrics a comparison can rank: every headline, and under attack the honest nodes' (declora.attack)
HEADLINES = (
    *(m for m in CHOICES["eval.headline"] if m != "auto"),
    *(f"{m}_honest_{w}" for m in ("acc", "ppl") for w in ("avg_factors", "mean", "min")),
)


@dataclass(frozen=True)
class Grid:
    base: str | None
    out: Path
    overrides: tuple[str, ...] = ()
    axes: dict[str, list[Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    metric: str = "acc_avg_factors"
    target_accuracy: float | None = None
    pair_within: tuple[str, ...] = ()  # axes whose values the paired table keeps apart (pair_groups)

    def __post_init__(self) -> None:  # a Grid built in Python gets what load_grid gives a file's
        object.__setattr__(self, "out", Path(self.out))
        _check_out(self.out)
        if isinstance(self.overrides, str) or isinstance(self.seeds, (str, int)):
            raise ConfigError("Grid: overrides and seeds are lists (of key=value strings, of integers)")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "seeds", tuple(python_value(list(self.seeds))))  # np.arange(3) too
        axes = {}
        for key, values in self.axes.items():
            if isinstance(values, np.ndarray) and values.ndim == 1:  # np.linspace(...): its numbers
                values = list(values)
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"Grid: axis {key!r} needs a non-empty list of values, got {values!r}")
            axes[key] = python_value(list(values))
        object.__setattr__(self, "axes", axes)
        for key in PER_CELL:
            if key in axes:
                raise ConfigError(f"grid.{key}: {PER_CELL[key]}, not a grid axis")
        for text in self.overrides:
            key = parse_override(text)[0]
            if key in PER_CELL:
                raise ConfigError(f"override {text!r}: {PER_CELL[key]}; edit the grid file")
        check_runs(self.seeds, self.metric, self.target_accuracy, "Grid: ")
        if isinstance(self.pair_within, str):
            raise ConfigError(f"pair_within is a list of axes, such as [{self.pair_within}]")
        object.__setattr__(self, "pair_within", tuple(self.pair_within))
        for key in self.pair_within:
            if key not in axes:
                raise ConfigError(f"pair_within: {key!r} is not an axis of the grid; its axes: {list(axes)}")
        if self.pair_within and set(self.pair_within) == set(axes):
            raise ConfigError(
                f"pair_within={list(self.pair_within)} names every axis: no method would be left to compare "
                "within a group; leave out the axis whose values are the methods"
            )


@dataclass(frozen=True)
class Cell:
    method: str  # the grid point without the seed: one row of the table, one line of a figure
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path
    cfg: Config | None = field(default=None, compare=False)  # the resolved config the grid asks for
    point: tuple[str, ...] = field(default=(), compare=False)  # the grid point's key=value words


GRID_KEYS = {"base", "out", "overrides", "grid", "seeds", "metric", "target_accuracy", "pair_within"}
# Keys the grid sets for each cell itself: an axis or override naming one would be overwritten unseen.
PER_CELL = {
    "seed": "each cell's seed comes from the grid's seeds list (a list such as seeds: [0, 1, 2])",
    "run_dir": "each cell's folder is named by the grid inside its out folder",
}


def load_grid(path: str | Path, overrides: tuple[str, ...] = (), out: str | None = None) -> Grid:
    """The grid file; ``overrides`` (``declora compare GRID key=value ...``) apply to every cell after
    the file's own, ``out`` replaces its output folder."""
    if not Path(path).is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    data = read_yaml(Path(path))
    if data is None:  # as declora run refuses an empty config: it would run the defaults of every key
        raise ConfigError(
            f"grid file {str(path)!r} holds no settings (it is empty or all comments); give at least a base "
            "config and the grid to sweep (README: Comparing methods)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown and not set(data) & GRID_KEYS and {f.name for f in dataclasses.fields(Config)} >= set(data):
        raise ConfigError(f"{path} is a run config, not a grid: run it with declora run {path}")
    if unknown:
        raise ConfigError(f"unknown grid key {unknown[0]!r} in {path}; allowed: {sorted(GRID_KEYS)}")
    _check_grid_types(path, data)
    axes = data.get("grid") or {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} must be a non-empty list, got {values!r}")
    for text in overrides:
        key = parse_override(text)[0]
        if key in axes:
            raise ConfigError(f"override {text!r}: {key} is set per cell by the grid; edit the grid file")
    base = data.get("base")
    if base is not None:  # a relative path: beside the grid file, else from the current directory
        beside = Path(path).parent / Path(base).expanduser()
        if beside.exists():
            base = str(beside)
        elif not Path(base).expanduser().exists():
            raise ConfigError(
                f"base: {base!r} in grid file {str(path)!r} does not exist, neither beside the grid file "
                f"({str(beside)!r}) nor from the current directory {str(Path.cwd())!r}"
            )
    return Grid(
        base=base,
        out=Path(out or data.get("out", f"runs/compare-{Path(path).stem}")),
        overrides=(*(data.get("overrides") or ()), *overrides),
        axes=axes,
        seeds=tuple(data["seeds"] if data.get("seeds") is not None else (0,)),
        metric=data.get("metric", "acc_avg_factors"),
        target_accuracy=data.get("target_accuracy"),
        pair_within=tuple(data.get("pair_within") or ()),
    )


def _check_out(out: Path) -> None:
    """The grid's folder holds its cells and tables: not a file, and not a run's own folder."""
    from declora.runfolder import is_run_folder

    if out.exists() and not out.is_dir():
        raise ConfigError(f"grid out={str(out)!r} is a file, not a folder; name the folder the cells go into")
    if is_run_folder(out):
        raise ConfigError(
            f"grid out={str(out)!r} is a run folder: the grid's cells and tables go into a folder of their "
            "own (default runs/compare-<grid file name>), not among a run's files"
        )


def check_metric(metric: Any, target: Any, where: str) -> None:
    """The metric a comparison ranks (one the runs log) and its target (a number or null)."""
    if metric not in HEADLINES:
        raise ConfigError(
            f"{where}metric={metric!r} is not a metric that runs log; choose one of {list(HEADLINES)}"
        )
    name = "--target" if where == "--" else f"{where}target_accuracy"
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target)
    ):
        raise ConfigError(f"{name}={target!r} must be a number (the metric's value to reach) or null")
    if target is not None and not lower_is_better(metric) and not 0 <= target <= 1:
        raise ConfigError(
            f"{name}={target!r}: {metric} is a fraction in [0, 1] (the tables show it in %); "
            f"for {target:g} % give {target / 100:g}"
        )


def _check_grid_types(path: str | Path, data: dict[str, Any]) -> None:
    """Each key of a grid file has its shape, checked before any cell is expanded or run."""
    where = f"grid file {path}: "
    if not isinstance(data.get("grid") or {}, dict):
        raise ConfigError(f"{where}grid must map each key to its list of values, got {data['grid']!r}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}overrides must be a list of key=value strings, got {overrides!r}")
    for text in overrides:
        try:
            parse_override(text)
        except ConfigError as err:
            raise ConfigError(f"{where}overrides: {err}") from err
    for key in ("base", "out"):
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            raise ConfigError(f"{where}{key} must be a path, got {data[key]!r}")
    within = data.get("pair_within") or []
    if not isinstance(within, list) or not all(isinstance(k, str) for k in within):
        raise ConfigError(
            f"{where}pair_within must be a list of grid axes, such as [topology.p], got {within!r}"
        )
    seeds = data["seeds"] if data.get("seeds") is not None else [0]
    if not isinstance(seeds, list):
        raise ConfigError(f"{where}seeds must be a list of integers such as [0, 1, 2], got {seeds!r}")
    check_runs(seeds, data.get("metric", "acc_avg_factors"), data.get("target_accuracy"), where)


def check_runs(seeds: Any, metric: Any, target: Any, where: str) -> None:
    """The seeds, metric and target of a grid, from a file (load_grid) or built in Python (Grid): checked
    in this one place, before any cell runs."""
    if not len(seeds):
        raise ConfigError(f"{where}seeds is empty; give at least one, such as [0] (or leave it out: [0])")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"{where}seeds must be a list of integers such as [0, 1, 2], got {list(seeds)!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"{where}seeds={list(seeds)} repeats a seed; each seed is one run folder per method"
        )
    check_metric(metric, target, where)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def expand(grid: Grid) -> list[Cell]:
    """Every combination of the axes, times every seed; validated before anything runs."""
    keys = list(grid.axes)
    cells = []
    seen: dict[str, str] = {}  # each cell's config (without its folder) -> its grid point
    for values in itertools.product(*(grid.axes[k] for k in keys)):
        point = [
            f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in zip(keys, values, strict=True)
        ]
        method = ",".join(point) or "base"
        for seed in grid.seeds:
            run_dir = grid.out / _slug(f"{method},seed={seed}")
            overrides = (*grid.overrides, *point, f"seed={seed}", f"run_dir={run_dir}")
            try:  # a typo in any cell stops the grid before any run, naming the cell
                cfg = load_config(grid.base, overrides)
                check_measured(cfg, grid.metric, "metric")  # else the cell would vanish from the table
                if "_honest_" in grid.metric and cfg.attack.kind == "none":
                    raise ConfigError(
                        f"metric={grid.metric}: the honest nodes' metrics are logged under an attack only, "
                        "and this cell has attack.kind=none; rank by its acc_* / ppl_* metric instead"
                    )
            except ConfigError as e:
                raise ConfigError(f"grid cell {method}: {e}") from None
            _refuse_same_run(seen, cfg, method)
            cells.append(Cell(method, seed, overrides, run_dir, cfg, point=tuple(point)))
    return cells


def _refuse_same_run(seen: dict[str, str], cfg: Config, method: str) -> None:
    """Two grid points that give one config (a repeated value; 0.001 and "1e-3") would train one run twice,
    or two folders of one run, and count it twice in the table."""
    tree = to_dict(cfg)
    tree.pop("run_dir")
    key = json.dumps(tree, sort_keys=True, default=str)
    if key in seen:
        raise ConfigError(f"grid cells {seen[key]} and {method} are one run (the same config); drop one")
    seen[key] = method


SKIPPED = ("done", "diverged")  # cell states a grid does not run again
STATE_WORDS = {  # what the command line says of a cell in each state as the grid reaches it
    "done": "finished, skipped",
    "diverged": "diverged before (NaN or Inf), skipped: delete its folder to run it again",
    "partial": "resuming",
    "new": "running",
}


def cell_state(cell: Cell) -> str:
    """ "done", "diverged" (stopped on NaN or Inf: skipped, like done), "partial" (a checkpoint to resume
    from) or "new". A cell whose folder was run with a config the grid no longer asks for (beyond what a
    resume may change) is refused, never reported as finished with its old numbers."""
    from declora.runfolder import check_checkpoint_kept, check_new_run, logged_rounds, read_checkpoint_json
    from declora.trackers import reading_saved_config

    latest = cell.run_dir / "state" / "latest.json"
    diverged = _diverged(cell.run_dir)
    if not diverged and not latest.is_file() and logged_rounds(cell.run_dir) == 0:
        # nothing done yet (or a start that failed): whatever is there is replaced, but a folder of other
        # files is refused before any cell runs
        check_new_run(cell.run_dir, overwrite=True)
        return "new"
    with reading_saved_config():  # compared with; the grid's config is the one checked and run
        saved = load_config(cell.run_dir / "config.yaml")
    cfg = cell.cfg or saved
    rounds_done = read_checkpoint_json(latest)["round"] if latest.is_file() else None
    try:
        check_resume(saved, cfg, rounds_done)
    except ConfigError as err:
        raise ConfigError(
            f"grid cell {cell.run_dir} was run with another config than the grid now gives it ({err}); "
            "delete that folder to rerun the cell, or restore the grid"
        ) from err
    if diverged:  # a result of the grid (too high a learning rate, say): running it again repeats it
        return "diverged"
    if rounds_done is None:  # rounds logged, stopped before the first checkpoint: it starts again
        check_checkpoint_kept(
            cell.run_dir, saved.checkpoint_every, saved.rounds, "delete that folder to rerun the cell"
        )
        return "new"
    stopped = patience_stopped_at(read_metrics(cell.run_dir / "metrics.jsonl")) == rounds_done  # early
    finished = (rounds_done >= cfg.rounds or stopped) and (cell.run_dir / "report.md").is_file()
    done = finished and _exported(cell.run_dir, cfg)
    # A finished cell asked for the same rounds is done whatever the speed settings (threads, device, ...);
    # only another export makes it resume, to write the adapters the grid now asks for, or, for a cell
    # early stopping ended, another eval.patience.
    changed = resume_changes(saved, cfg)
    again = "export" in changed or (stopped and "eval.patience" in changed)
    return "done" if done and not again else "partial"


def _diverged(run_dir: Path) -> bool:
    """Whether the run stopped on a NaN or Inf (its metrics.jsonl says so)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and diverged_at(read_metrics(metrics)) is not None


def _exported(run_dir: Path, cfg: Config) -> bool:
    """The run's adapters are complete (report.md alone can come from ``declora report`` after a kill in
    the export)."""
    from declora.runfolder import replaced_whole

    return cfg.export == "none" or replaced_whole(run_dir / "adapters")


def only_cell(grid: Grid, index: int) -> Grid:
    """The grid narrowed to its ``index``-th cell in expand's order (the axes' product outside, the seeds
    inside): what ``declora compare --jobs`` gives each cell's own process."""
    combos = list(itertools.product(*grid.axes.values()))
    if not 0 <= index < len(combos) * len(grid.seeds):
        raise ConfigError(
            f"grid cell {index}: the grid has {len(combos) * len(grid.seeds)} cells (0 onwards)"
        )
    values = combos[index // len(grid.seeds)]
    axes = {key: [value] for key, value in zip(grid.axes, values, strict=True)}
    return dataclasses.replace(grid, axes=axes, seeds=(grid.seeds[index % len(grid.seeds)],))


def checked_cells(grid: Grid) -> tuple[list[Cell], list[str]]:
    """Every cell and its state, checked before any cell runs: a stale cell stops the grid, and so does a
    cell whose data or model is wrong."""
    from declora.experiment import check_inputs

    cells = expand(grid)
    states = [cell_state(cell) for cell in cells]
    for cell, state in zip(cells, states, strict=True):
        if state not in SKIPPED:
            try:
                check_inputs(cell.cfg or load_config(grid.base, cell.overrides), grid.metric)
            except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
                # the cell named as the progress lines name it, not by its folder's name
                raise ConfigError(f"grid cell {cell.method} seed={cell.seed}: {err}") from err
    return cells, states


@contextmanager
def holding_grid(out: Path) -> Iterator[None]:
    """This command's hold on the grid's output folder: a second ``declora compare`` on it is refused
    (both would start the same cells). A folder made here that holds nothing but the lock at the end (the
    grid was refused at its check) is removed again."""
    from declora.runfolder import LOCK, FolderInUse, hold_run_folder

    made = not out.exists()
    try:
        lock = hold_run_folder(out)
    except FolderInUse:
        raise ConfigError(
            f"grid folder {str(out)!r} is in use by another declora compare: wait for it to finish or stop "
            "it; two grids writing one folder would run the same cells"
        ) from None
    try:
        yield
    finally:
        lock.close()
        if made and [entry.name for entry in out.iterdir()] == [LOCK]:
            shutil.rmtree(out, ignore_errors=True)


def run_grid(grid: Grid, on_cell: Any = None, on_round: Any = None) -> list[Cell]:
    """Run every cell not finished yet; ``on_cell(k, total, cell, state)`` before each, ``on_round(record)``
    after each round of a cell that runs (the command line's progress bar). A cell that diverges (a NaN or
    Inf: too high a learning rate, say) is a result of the grid: it is warned about, kept as it stopped,
    shown as diverged in the table, and the grid goes on; later calls skip it."""
    from declora.engine import NumericalError, run
    from declora.experiment import build_experiment

    cells, states = checked_cells(grid)
    for k, (cell, state) in enumerate(zip(cells, states, strict=True)):
        if on_cell is not None:
            on_cell(k, len(cells), cell, state)
        if state in SKIPPED:
            continue
        cfg = cell.cfg or load_config(grid.base, cell.overrides)
        # "new": whatever a failed start left in the folder (no checkpoint) is replaced
        exp = build_experiment(cfg, cell.run_dir)
        resume = state == "partial"
        try:
            run(exp, resume=resume, on_round=on_round, overwrite=not resume)
        except NumericalError as err:
            log.warning(
                "grid cell %s diverged: %s; the grid goes on (the cell stays as it stopped: delete its "
                "folder to run it again)",
                cell.run_dir.name,
                err,
            )
    return cells


def pair_groups(cells: list[Cell], within: tuple[str, ...]) -> dict[str, str] | None:
    """Each cell's method -> the values of the ``within`` axes at its grid point ("topology.p=0.1"):
    the paired table then compares methods only with the same values. None without ``within``."""
    if not within:
        return None
    return {c.method: ",".join(w for w in c.point if w.split("=", 1)[0] in within) for c in cells}


def group_cells(cells: list[Cell]) -> dict[str, list[Path]]:
    runs: dict[str, list[Path]] = {}
    for cell in cells:
        runs.setdefault(cell.method, []).append(cell.run_dir)
    return runs
