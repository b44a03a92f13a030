"""``declora run --dry-run``: every check a run makes, its first rounds timed in memory, and the plan.

A run that would be refused is refused the same way (config, run folder, data, model, adapter). The
experiment is then built as the run builds it, its first two rounds train and communicate and one
evaluation scores them, all in memory, and the plan says what the whole run would do and cost at the
second round's rate: examples per node, messages, time, memory. The first round also pays one-off costs
(allocations, lazy set-up), which is why the second sets the rate. A checkpoint, the adapters' export
and the report are timed as the run writes them, into a temporary folder that is then removed. Nothing
is written to the run folder (it is not even made), and no tracker run is opened.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from declora.config import ConfigError, load_config
from declora.engine import Trial, trial_rounds
from declora.experiment import Experiment, build_experiment
from declora.run_start import check_folder
from declora.topology import graph_of, spectral_gap

if TYPE_CHECKING:
    from declora.compare import Cell, Grid

TRIAL_ROUNDS = 2
RUNS = ("new", "partial")  # the states of a grid cell that a grid runs
ONE_PROCESS = (
    "a dry run runs in one process: start it without torchrun (the plan is the same for any number of "
    "processes)"
)


def plan(exp: Experiment, overwrite: bool = False, setup_s: float = 0.0) -> list[str]:
    """The plan of a new run of ``exp``, one line per aspect, after its folder's checks (as ``run(exp,
    overwrite=overwrite)`` makes them) and a trial of its first rounds; ``setup_s``: the seconds
    build_experiment took, counted in the run's time. ``exp`` is spent: to run it, build a new Experiment.
    One process only: a multi-process run's plan is this one's with the nodes sliced."""
    if exp.group.world > 1:
        raise ConfigError(ONE_PROCESS)
    check_folder(exp.run_dir, resume=False, overwrite=overwrite)
    trial = trial_rounds(exp, TRIAL_ROUNDS)
    writes = time_writes(exp, trial)
    rows = [
        ("run folder", _folder(exp, overwrite)),
        ("nodes", _nodes(exp)),
        ("data", _data(exp)),
        ("labels", _labels(exp)),
        ("model", _model(exp)),
        ("training", _training(exp)),
        ("evaluation", _evaluation(exp)),
        ("messages", _messages(exp, trial)),
        ("time", _time(exp, trial, writes, setup_s)),
        ("memory", _memory(trial)),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {text}" for name, text in rows if text]


def _folder(exp: Experiment, overwrite: bool) -> str:
    replaced = exp.run_dir.is_dir() and any(exp.run_dir.iterdir())
    return f"{exp.run_dir} ({'replaced: --overwrite' if overwrite and replaced else 'new'})"


def _nodes(exp: Experiment) -> str:
    from declora.algorithms import NO_GOSSIP, SERVED

    cfg, t = exp.cfg, exp.cfg.topology
    device = f"{exp.fed.device} {cfg.precision}"
    if exp.n == 1:
        return f"1 node, {cfg.algorithm.name}; {device}"
    if cfg.algorithm.name in NO_GOSSIP:  # the graph is never read
        where = "a server" if cfg.algorithm.name in SERVED else "no messages"
        return f"{exp.n} nodes, {cfg.algorithm.name} ({where}); {device}"
    if exp.schedule.is_static:
        w = exp.schedule.matrix(0).numpy()
        degrees = [d for _, d in graph_of(w).degree()]
        low, high = min(degrees), max(degrees)
        degree = f"degree {low}" if low == high else f"degrees {low} to {high}"
        graph = f"{t.graph}, {degree}, spectral gap {spectral_gap(w):.3f}"
    else:
        graph = f"topology.schedule={t.schedule} (a graph drawn each round)"
    return f"{exp.n} nodes, {cfg.algorithm.name}, {graph}; {device}"


def _data(exp: Experiment) -> str:
    sizes = [node["size"] for node in exp.partition_summary]
    if len(sizes) == 1:
        return f"{sizes[0]:,} training rows"
    if len(set(sizes)) == 1:
        return f"{sum(sizes):,} training rows over the nodes, {sizes[0]:,} a node"
    return (
        f"{sum(sizes):,} training rows over the nodes, {min(sizes):,} to {max(sizes):,} a node "
        f"(median {statistics.median(sizes):,.0f})"
    )


def _labels(exp: Experiment) -> str:
    """How skewed the nodes' labels are (classification with two labels or more; '' otherwise)."""
    if exp.task.metric != "acc" or len(exp.label_names) < 2 or exp.n == 1:
        return ""
    shares = [max(node["label_counts"]) / node["size"] for node in exp.partition_summary if node["size"]]
    return f"a node's most common label: {min(shares):.0%} to {max(shares):.0%} of its rows"


def _model(exp: Experiment) -> str:
    fed = exp.fed
    trained = fed.tensors()
    kinds = sorted({fed.kind_of(name) for name in trained}, key=["A", "B", "R", "head"].index)
    per_node = sum(x[0].numel() for x in trained.values())
    ours = {id(x) for x in trained.values()}  # a phase's frozen factor (requires_grad off) is still ours
    base_mb = sum(p.numel() * p.element_size() for p in fed.model.parameters() if id(p) not in ours) / 1e6
    shared = "one frozen base" if exp.n == 1 else "one frozen base for all nodes"
    return (
        f"{exp.cfg.model.name}, {shared} ({base_mb:,.1f} MB); {per_node:,} trained parameters a node "
        f"({', '.join(kinds)}; rank {exp.cfg.model.rank} on {len(fed.lora)} layers)"
    )


def _training(exp: Experiment) -> str:
    train, rounds = exp.cfg.train, exp.cfg.rounds
    sizes = [node["size"] for node in exp.partition_summary if node["size"]]
    if train.local_unit == "epochs":
        epochs = _count(train.local_steps, "local epoch")
        return (
            f"{_count(rounds, 'round')} × {epochs}: {rounds * train.local_steps} passes over each node's rows"
        )
    examples = rounds * train.local_steps * train.batch_size
    low, high = examples / max(sizes), examples / min(sizes)
    spread = f"{low:.1f}" if len(set(sizes)) == 1 else f"{low:.1f} to {high:.1f}"
    return (
        f"{_count(rounds, 'round')} × {_count(train.local_steps, 'local step')} × batch "
        f"{train.batch_size} = {examples:,} examples a node ({spread} passes over its rows)"
    )


def _evaluated_rounds(exp: Experiment) -> list[int]:
    rounds, every = exp.cfg.rounds, exp.cfg.eval.every
    return [t for t in range(1, rounds + 1) if t % every == 0 or t == rounds]


def _evaluation(exp: Experiment) -> str:
    at = _evaluated_rounds(exp)
    shown = ", ".join(map(str, at)) if len(at) <= 6 else f"{', '.join(map(str, at[:3]))}, ... {at[-1]}"
    times = "1 evaluation" if len(at) == 1 else f"{len(at)} evaluations"
    held_out = f"{len(exp.consensus_eval.labels):,} held-out rows"
    scored = f"the model on {held_out}" if exp.n == 1 else f"the consensus models on {held_out}"
    if exp.n > 1:
        scored += f", each node on {len(exp.node_eval.labels):,}"
    if exp.validation is not None:  # data.validation_fraction: every evaluation scores those rows too
        scored += f"; the same on {len(exp.validation[0].labels):,} validation rows"
    return f"{times} (after round {shown}): {scored}"


def _messages(exp: Experiment, trial: Trial) -> str:
    last = trial.records[-1]
    per_round, rounds = last["bytes_round"], exp.cfg.rounds
    if not any(record["bytes_round"] for record in trial.records):
        return f"none in {_count(len(trial.records), 'trial round')}"
    node = f"{last['bytes_node_mean'] / 1e6:,.2f} MB a node"
    return (
        f"{per_round / 1e6:,.2f} MB in round {last['round']} ({node}); at that rate "
        f"{per_round * rounds / 1e6:,.2f} MB in {_count(rounds, 'round')}"
    )


@dataclass(frozen=True)
class Writes:
    """Seconds of what a run writes besides its rounds: one checkpoint, one export, the report."""

    checkpoint_s: float
    export_s: float
    report_s: float


def time_writes(exp: Experiment, trial: Trial) -> Writes:
    """A checkpoint of the trial's last round, the adapters' export and the report, written as the run
    writes them into a temporary folder that is removed afterwards: their seconds. ``exp.run_dir`` points
    there meanwhile, so the run folder is never touched."""
    from declora.checkpoint import save_checkpoint
    from declora.config import save_config
    from declora.export import AdapterExport
    from declora.report import write_report

    last = {**trial.records[-1], "event": "eval", **trial.evaluation, "wall_s": 0.0}
    real = exp.run_dir
    with tempfile.TemporaryDirectory(prefix="declora-dry-run-") as folder:
        exp.run_dir = Path(folder) / real.name
        try:
            exp.run_dir.mkdir()
            began = time.perf_counter()
            save_checkpoint(exp, last["round"], 0.0)
            checkpoint_s = time.perf_counter() - began
            began = time.perf_counter()
            AdapterExport(exp, resumed=False).write(last)  # nothing with export=none, as in the run
            export_s = time.perf_counter() - began
            save_config(exp.cfg, exp.run_dir / "config.yaml")
            lines = [*trial.records[:-1], last]
            (exp.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            began = time.perf_counter()
            write_report(exp.run_dir)
            report_s = time.perf_counter() - began
        finally:
            exp.run_dir = real
    return Writes(checkpoint_s, export_s, report_s)


def _checkpoints(exp: Experiment) -> int:
    rounds, every = exp.cfg.rounds, exp.cfg.checkpoint_every
    return sum(1 for t in range(1, rounds + 1) if t % every == 0 or t == rounds)


def _exports(exp: Experiment) -> int:
    """How many times the run writes its adapters: once, or (export_round=best) at most at every
    evaluation that improves on the last."""
    if exp.cfg.export == "none":
        return 0
    return len(_evaluated_rounds(exp)) if exp.cfg.export_round == "best" else 1


def run_seconds(exp: Experiment, trial: Trial, writes: Writes, setup_s: float) -> float:
    """The whole run's time at the trial's rates: its set-up, its rounds at the last trial round's rate,
    its evaluations, checkpoints and exports, and its report."""
    rounds = exp.cfg.rounds * trial.round_s + len(_evaluated_rounds(exp)) * trial.eval_s
    written = _checkpoints(exp) * writes.checkpoint_s + _exports(exp) * writes.export_s + writes.report_s
    return setup_s + rounds + written


def _time(exp: Experiment, trial: Trial, writes: Writes, setup_s: float) -> str:
    total = _about(run_seconds(exp, trial, writes, setup_s))
    setup = f"set-up {setup_s:.1f} s, " if setup_s else ""
    saved = f"{_short(writes.checkpoint_s)} a checkpoint ({_checkpoints(exp)})"
    exports = _exports(exp)
    export = f", {_short(writes.export_s)} an export" + (f" (up to {exports})" if exports > 1 else "")
    written = f"{saved}{export if exports else ''}, {_short(writes.report_s)} the report"
    trackers = " (trackers not counted)" if exp.cfg.log.trackers else ""
    sooner = ", less if eval.patience stops it early" if exp.cfg.eval.patience else ""
    return f"{setup}{_rates(trial)}, {written}: {total} in all{sooner}{trackers}"


def _short(seconds: float) -> str:
    """A short time: "12 ms", "0.6 s"."""
    return f"{1000 * seconds:.0f} ms" if seconds < 0.1 else f"{seconds:.1f} s"


def _rates(trial: Trial, phases: bool = True) -> str:
    """The last trial round's seconds (and its phases'), and the evaluation's."""
    each = f" ({', '.join(f'{name} {s:.2f}' for name, s in trial.seconds[-1].items())})" if phases else ""
    return f"{trial.round_s:.2f} s a round{each}, {trial.eval_s:.1f} s an evaluation"


def _memory(trial: Trial) -> str:
    text = f"peak {trial.peak['peak_mem_mb']:,.0f} MB resident"
    if "peak_gpu_mem_mb" in trial.peak:
        text += f", {trial.peak['peak_gpu_mem_mb']:,.0f} MB of GPU memory allocated"
    return text


def _count(k: int, thing: str) -> str:
    return f"{k} {thing}" if k == 1 else f"{k} {thing}s"


def _about(seconds: float) -> str:
    """An estimate of a time, as people say it: "about 2 min 37 s"."""
    if seconds < 0.5:
        return "under a second"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"about {hours} h {minutes:02d} min"
    return f"about {minutes} min {secs:02d} s" if minutes else f"about {secs} s"


def grid_plan(grid: Grid, say: Callable[[str], None]) -> None:
    """``declora compare GRID --dry-run``: every cell checked as the grid checks them and what the grid
    would do with it, then one cell of each method that would run timed as a run's dry run times it, and
    the grid's time one cell after another. Nothing is written, not even the grid's folder."""
    from declora.compare import STATE_WORDS, checked_cells

    cells, states = checked_cells(grid)
    say(f"dry run of a grid of {_count(len(cells), 'cell')} in {grid.out}: nothing is kept")
    todo: dict[str, list[float]] = {}  # method -> the share of a whole run each of its cells has left
    for k, (cell, state) in enumerate(zip(cells, states, strict=True)):
        left = _share_left(cell) if state == "partial" else 1.0
        word = {"new": "would run", "partial": f"would resume ({left:.0%} of it left)"}
        say(f"  [{k + 1}/{len(cells)}] {cell.method} seed={cell.seed}: {word.get(state, STATE_WORDS[state])}")
        if state in RUNS:
            todo.setdefault(cell.method, []).append(left)
    if not todo:
        say("every cell is finished: the grid would only write its table")
        return
    say(f"timing one cell of each method that would run ({TRIAL_ROUNDS} rounds and an evaluation each):")
    total = 0.0
    for method, shares in todo.items():
        cell = next(c for c, st in zip(cells, states, strict=True) if c.method == method and st in RUNS)
        began = time.perf_counter()
        exp = build_experiment(cell.cfg or load_config(grid.base, cell.overrides), cell.run_dir)
        setup_s = time.perf_counter() - began
        trial = trial_rounds(exp, TRIAL_ROUNDS)
        seconds = run_seconds(exp, trial, time_writes(exp, trial), setup_s)
        total += sum(setup_s + share * (seconds - setup_s) for share in shares)  # each cell sets up whole
        say(f"  {method}: set-up {setup_s:.1f} s, {_rates(trial, phases=False)}: {_about(seconds)} a run")
    cpus = "--jobs J runs J at once, each with 1/J of the CPUs"
    say(
        f"{_about(total)} for the {_count(sum(map(len, todo.values())), 'cell')} to run, one after "
        f"another ({cpus})"
    )


def _share_left(cell: Cell) -> float:
    """The share of a half-finished cell's rounds still to run (from its last checkpoint)."""
    from declora.runfolder import read_checkpoint_json

    assert cell.cfg is not None  # compare.expand resolves every cell's config
    done = read_checkpoint_json(cell.run_dir / "state" / "latest.json")["round"]
    return max(0.0, (cell.cfg.rounds - done) / cell.cfg.rounds)
