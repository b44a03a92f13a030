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

import csv
import dataclasses
import io
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

from declora.config import Config, ConfigError, load_config, parse_override, python_value, read_yaml, to_dict
from declora.report import (
    PRIVACY_KEY,
    best_final,
    display_scale,
    diverged_at,
    lower_is_better,
    planned_rounds,
    read_metrics,
    run_config,
    stopped_early,
)
from declora.validation import CHOICES, check_measured, check_resume, resume_changes

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
    finished = rounds_done >= cfg.rounds and (cell.run_dir / "report.md").is_file()
    done = finished and _exported(cell.run_dir, cfg)
    # A finished cell asked for the same rounds is done whatever the speed settings (threads, device, ...);
    # only another export makes it resume, to write the adapters the grid now asks for.
    return "done" if done and "export" not in resume_changes(saved, cfg) else "partial"


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
                check_inputs(cell.cfg or load_config(grid.base, cell.overrides))
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


# ---------------------------------------------------------------- the table


def reaches(metric: str, value: float, target: float) -> bool:
    """Whether ``value`` of ``metric`` is at the target or better (a perplexity at or below it)."""
    return value <= target if lower_is_better(metric) else value >= target


def run_summary(records: list[dict[str, Any]], metric: str, target: float | None) -> dict[str, float]:
    """Best (highest accuracy, lowest perplexity), final, bytes sent, bytes at the first evaluation that
    reached the target (NaN if none did) and wall time of one run's evaluations of ``metric``."""
    evals = [r for r in records if r.get("event") == "eval" and r.get(metric) is not None]
    if not evals:
        return {}
    hits = [r["bytes_total"] for r in evals if target is not None and reaches(metric, r[metric], target)]
    reached = hits[0] if hits else math.nan
    spent = [r[PRIVACY_KEY] for r in records if isinstance(r.get(PRIVACY_KEY), (int, float))]
    return {
        "best": best_final(evals, metric)["best"],
        "final": evals[-1][metric],
        "bytes_total": evals[-1]["bytes_total"],
        "bytes_to_target": reached,
        "wall_s": evals[-1]["wall_s"],
        "epsilon": spent[-1] if spent else math.nan,  # a private run's largest epsilon spent, at the end
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0) of the finite values; NaN when there are none."""
    arr = np.asarray(xs, dtype=float)
    arr = arr[np.isfinite(arr)]
    return (float(arr.mean()), float(arr.std())) if len(arr) else (math.nan, math.nan)


SUMMARY_KEYS = ("best", "final", "bytes_total", "bytes_to_target", "wall_s")


def comparison_rows(runs: dict[str, list[Path]], metric: str, target: float | None) -> list[dict[str, Any]]:
    """One row per method: mean and population std over its runs (seeds) of each summary number, over the
    runs that logged ``metric`` (``runs`` of ``of``; a method with none keeps its row, all NaN).
    ``bytes_to_target`` is the mean over the ``reached`` runs that reached the target."""
    rows = []
    for method, dirs in runs.items():
        records = [read_metrics(d / "metrics.jsonl") for d in dirs]
        # a diverged run's last evaluation is from before its NaN: not a final to average with the others
        diverged = [diverged_at(r) is not None for r in records]
        kept = [r for r, bad in zip(records, diverged, strict=True) if not bad]
        # a final of Inf or NaN is left out with its run: best, final and runs then cover the same runs
        summaries = [s for r in kept if (s := run_summary(r, metric, target)) and math.isfinite(s["final"])]
        row: dict[str, Any] = {"method": method, "runs": len(summaries), "of": len(dirs)}
        planned = [planned_rounds(run_config(d)) for d in dirs]
        row["unfinished"] = sum(
            stopped_early(r, n) is not None and not bad
            for r, n, bad in zip(records, planned, diverged, strict=True)
        )
        for key in SUMMARY_KEYS:
            row[key], row[f"{key}_std"] = _mean_std([s[key] for s in summaries])
        row["reached"] = sum(not math.isnan(s["bytes_to_target"]) for s in summaries)
        row["diverged"] = sum(diverged)  # the CSV columns after the first ones: they keep their places
        row["epsilon"], row["epsilon_std"] = _mean_std([s["epsilon"] for s in summaries])  # NaN: not private
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]], metric: str, target: float | None) -> str:
    k = display_scale(metric)  # accuracies in %, perplexities as they are

    def acc(r: dict[str, Any], key: str) -> str:  # one run has no spread to show (not a spread of 0)
        spread = f" ± {k * r[key + '_std']:.2f}" if r["runs"] > 1 else ""
        return f"{k * r[key]:.2f}{spread}"

    def to_target(r: dict[str, Any]) -> str:
        if target is None:
            return "n/a"
        if not r["reached"]:
            return "not reached"
        mb = f"{r['bytes_to_target'] / 1e6:.2f}"
        return mb if r["reached"] == r["runs"] else f"{mb} ({r['reached']} of {r['runs']} runs)"

    if lower_is_better(metric):
        what = f"Perplexity: {metric}, best = lowest"
        target_txt = f"{target:.2f} (first evaluation at or below it)" if target is not None else "n/a"
    else:
        what = f"Accuracy: {metric} in %"
        target_txt = f"{100 * target:.1f}%" if target is not None else "n/a"
    private = any(math.isfinite(r.get("epsilon", math.nan)) for r in rows)  # a privacy/utility comparison
    eps_head, eps_rule, eps_none = (" ε spent |", "---:|", " – |") if private else ("", "", "")

    def eps(r: dict[str, Any]) -> str:
        if not math.isfinite(r["epsilon"]):
            return " not private |"
        return (
            f" {r['epsilon']:.2f} |" if r["runs"] == 1 else f" {r['epsilon']:.2f} ± {r['epsilon_std']:.2f} |"
        )

    lines = [
        f"{what} (mean ± population std over runs); MB = 1e6 bytes; target {target_txt}.",
        "",
        "| method | runs | best | final | MB sent | MB to target | wall s |" + eps_head,
        "|---|---:|---:|---:|---:|---:|---:|" + eps_rule,
    ]
    for r in rows:
        runs = str(r["runs"]) if r["runs"] == r["of"] else f"{r['runs']} of {r['of']}"
        if r["unfinished"]:
            runs += f" ({r['unfinished']} not finished)"
        if r["diverged"]:
            runs += f" ({r['diverged']} diverged)"
        if not r["runs"] and r["diverged"] == r["of"]:
            lines.append(f"| {r['method']} | {runs} | diverged (NaN or Inf) | – | – | – | – |" + eps_none)
            continue
        if not r["runs"]:
            lines.append(f"| {r['method']} | {runs} | no evaluation of {metric} | – | – | – | – |" + eps_none)
            continue
        lines.append(
            f"| {r['method']} | {runs} | {acc(r, 'best')} | {acc(r, 'final')} | "
            f"{r['bytes_total'] / 1e6:.2f} | {to_target(r)} | {r['wall_s']:.1f} |"
            + (eps(r) if private else "")
        )
    if private:
        lines += ["", "ε spent: the largest epsilon any node spent by the end (privacy_epsilon_max)."]
    if any(r["runs"] + r["diverged"] < r["of"] for r in rows):
        lines += ["", f"Runs without an evaluation of {metric} (not finished, or not measured) are left out."]
    if any(r["diverged"] for r in rows):
        lines += ["", "A diverged run (a NaN or Inf stopped it) is out of its method's numbers and curve."]
    if any(r["unfinished"] for r in rows):
        lines += [
            "",
            "A run not finished (stopped, or still running) enters with its last evaluation as final.",
        ]
    if len(rows) > 1 and all(r["runs"] <= 1 for r in rows):
        lines += ["", "One run per method: no spread, and no paired comparison (it needs two seeds or more)."]
    return "\n".join(lines)


def final_by_seed(dirs: list[Path], metric: str) -> dict[int, float]:
    """Each finished run's last evaluated value of ``metric``, keyed by the run's seed (from its
    config.yaml). A run stopped before its last round is left out: its last value is of another round
    than the other method's, and a pair of two rounds is no paired difference; so is a final that is not
    finite."""
    finals = {}
    for d in dirs:
        records = read_metrics(d / "metrics.jsonl")
        evals = [r[metric] for r in records if r.get(metric) is not None]
        if not evals or not (d / "config.yaml").is_file():
            continue
        config = read_yaml(d / "config.yaml") or {}
        # a final of Inf or NaN (an fp32 perplexity past exp(88.7)) is no number to difference
        if stopped_early(records, planned_rounds(config)) is None and math.isfinite(evals[-1]):
            finals[int(config.get("seed", 0))] = evals[-1]
    return finals


def _seed_of(run_dir: Path) -> int | None:
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    return int(config.get("seed", 0)) if isinstance(config, dict) else None


def format_paired(runs: dict[str, list[Path]], metric: str, groups: dict[str, str] | None = None) -> str:
    """Every method against the first, paired by seed (declora.paired): per-seed differences of the final
    value, mean ± SE and the 95% t-interval. With ``groups`` (method -> its group, ``pair_groups``), every
    method against the first of its own group, one table per group. A method that shares fewer than two
    finished seeds with its reference is named in a note under the table; empty when every method has
    one run (the table says so)."""
    if len(runs) < 2 or all(len(dirs) <= 1 for dirs in runs.values()):  # the table's note says it
        return ""
    if not groups:
        return _paired_table(runs, list(runs), metric)
    labels = list(dict.fromkeys(groups[m] for m in runs))
    tables = [_paired_table(runs, [m for m in runs if groups[m] == g], metric, g) for g in labels]
    return "\n\n".join(t for t in tables if t)


def pair_groups(cells: list[Cell], within: tuple[str, ...]) -> dict[str, str] | None:
    """Each cell's method -> the values of the ``within`` axes at its grid point ("topology.p=0.1"):
    the paired table then compares methods only with the same values. None without ``within``."""
    if not within:
        return None
    return {c.method: ",".join(w for w in c.point if w.split("=", 1)[0] in within) for c in cells}


def _paired_table(runs: dict[str, list[Path]], methods: list[str], metric: str, group: str = "") -> str:
    """The paired table of ``methods[1:]`` against ``methods[0]`` (all of one ``group``, if given)."""
    from declora.paired import is_exact, paired_difference

    if len(methods) < 2:
        return ""
    k = display_scale(metric)
    ref = final_by_seed(runs[methods[0]], metric)
    lines, unpaired = [], []
    for method in methods[1:]:
        other = final_by_seed(runs[method], metric)
        shared = len(set(ref) & set(other))
        if shared < 2:
            unpaired.append(f"{method} ({shared} finished seed{'' if shared == 1 else 's'} shared)")
            continue
        d = paired_difference(other, ref, exact=is_exact(metric))
        everyone = {s for p in (*runs[methods[0]], *runs[method]) if (s := _seed_of(p)) is not None}
        left_out = sorted(everyone - set(d.seeds))  # not finished (or not run) by one of the two
        seeds = (
            f"{len(d.seeds)} (seed {', '.join(map(str, left_out))}: not finished by both, or not finite)"
            if left_out
            else str(len(d.seeds))
        )
        per_seed = ", ".join(_signed(k * x) for x in d.diffs)
        decided = "yes" if d.lo > 0 or d.hi < 0 else "no"
        interval = f"{k * d.lo:+.2f} to {k * d.hi:+.2f}"  # signed, so that "-0.00 to" reads as "no"
        if math.isnan(d.lo):  # every seed gave the same difference
            interval, decided = "none (no spread between seeds)", "undecided"
        lines.append(
            f"| {method} | {seeds} | {per_seed} | {_signed(k * d.mean)} ± {k * d.se:.2f} | "
            f"{interval} | {decided} |"
        )
    # said, not dropped: a method missing from the paired table would read as one that was compared
    unpaired_lead, paired_lead = (
        (f"Within {group}, not", f"Within {group}, paired") if group else ("Not", "Paired")
    )
    note = (
        f"{unpaired_lead} paired with **{methods[0]}** (a paired difference needs two seeds both finished): "
        + ", ".join(unpaired)
        + "."
        if unpaired
        else ""
    )
    if not lines:
        return note
    head = [
        f"{paired_lead} by seed against **{methods[0]}** (final {metric}; same seed = same partition, "
        "batches and test set): difference per seed, mean ± standard error, 95% t-interval, and whether "
        "it excludes 0.",
        "",
        "| method | seeds | per seed | mean ± SE | 95% interval | excludes 0 |",
        "|---|---:|---|---:|---|---|",
    ]
    return "\n".join(head + lines + (["", note] if note else []))


def _signed(x: float) -> str:
    """``x`` to two decimals with its sign; a difference that rounds to zero reads 0.00, not -0.00."""
    text = f"{x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_comparison(
    runs: dict[str, list[Path]],
    out: Path,
    metric: str,
    target: float | None,
    groups: dict[str, str] | None = None,
) -> str:
    from declora.compare_plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs, metric, target)
    table = format_comparison(rows, metric, target)
    if note := attacked_note(runs, metric):
        table = f"{table}\n\n{note}"
    paired = format_paired(runs, metric, groups)
    if paired:
        table = f"{table}\n\n{paired}"
    (out / "comparison.md").write_text(table + "\n\n![curves](comparison.png)\n")
    (out / "comparison.csv").write_text(rows_csv(rows))
    plot_comparison(runs, out / "comparison.png", metric)
    return table


# A metric over every node and its counterpart over the honest nodes alone (logged under attack).
HONEST_TWIN = {
    f"{m}_{w}": f"{m}_honest_{h}"
    for m in ("acc", "ppl")
    for w, h in (("avg_factors", "avg_factors"), ("avg_product", "avg_factors"), ("node_mean", "mean"))
}


def attacked_note(runs: dict[str, list[Path]], metric: str) -> str | None:
    """Where some runs had attacking nodes and ``metric`` counts them too (the mean over every node, the
    average of every node's factors), a line saying so and naming the honest nodes' metric. None
    otherwise: the metric is already the honest nodes', a server's model, or no run was attacked."""
    twin = HONEST_TWIN.get(metric)
    if twin is None:
        return None
    attacked = [
        method
        for method, dirs in runs.items()
        if any(
            r.get("attackers")
            for d in dirs
            for r in read_metrics(d / "metrics.jsonl")
            if r.get("event") == "start"
        )
    ]
    if not attacked:
        return None
    shown = ", ".join(attacked[:3]) + (f" and {len(attacked) - 3} more" if len(attacked) > 3 else "")
    return (
        f"Under attack: {shown} ran with attacking nodes, and {metric} counts the attackers' models too; "
        f"rank by {twin} (--metric {twin}, or a grid's metric: {twin}) for what the honest nodes reached."
    )


def group_cells(cells: list[Cell]) -> dict[str, list[Path]]:
    runs: dict[str, list[Path]] = {}
    for cell in cells:
        runs.setdefault(cell.method, []).append(cell.run_dir)
    return runs
