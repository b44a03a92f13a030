"""``declora run --dry-run``: every check a run makes, its first rounds timed in memory, and the plan.

A run that would be refused is refused the same way (config, run folder, data, model, adapter). The
experiment is then built as the run builds it, its first two rounds train and communicate and one
evaluation scores them, all in memory, and the plan says what the whole run would do and cost at the
second round's rate: examples per node, messages, time, memory. The first round also pays one-off costs
(allocations, lazy set-up), which is why the second sets the rate. Nothing is written: no run folder,
checkpoint, metrics, tracker run or adapter.
"""

from __future__ import annotations

import statistics

from declora.config import ConfigError
from declora.engine import Trial, trial_rounds
from declora.experiment import Experiment
from declora.run_start import check_folder
from declora.topology import spectral_gap

TRIAL_ROUNDS = 2
ONE_PROCESS = (
    "a dry run runs in one process: start it without torchrun (the plan is the same for any number of "
    "processes)"
)


def plan(exp: Experiment, overwrite: bool = False) -> list[str]:
    """The plan of a new run of ``exp``, one line per aspect, after its folder's checks (as ``run(exp,
    overwrite=overwrite)`` makes them) and a trial of its first rounds. ``exp`` is spent: to run it, build
    a new Experiment. One process only: a multi-process run's plan is this one's with the nodes sliced."""
    if exp.group.world > 1:
        raise ConfigError(ONE_PROCESS)
    check_folder(exp.run_dir, resume=False, overwrite=overwrite)
    trial = trial_rounds(exp, TRIAL_ROUNDS)
    rows = [
        ("run folder", _folder(exp, overwrite)),
        ("nodes", _nodes(exp)),
        ("data", _data(exp)),
        ("labels", _labels(exp)),
        ("model", _model(exp)),
        ("training", _training(exp)),
        ("evaluation", _evaluation(exp)),
        ("messages", _messages(exp, trial)),
        ("time", _time(exp, trial)),
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
        degrees = (w != 0).sum(1) - 1
        low, high = int(degrees.min()), int(degrees.max())
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


def _time(exp: Experiment, trial: Trial) -> str:
    last = trial.seconds[-1]
    round_s = sum(last.values())
    total = exp.cfg.rounds * round_s + len(_evaluated_rounds(exp)) * trial.eval_s
    phases = ", ".join(f"{name} {s:.2f}" for name, s in last.items())
    return (
        f"{round_s:.2f} s a round ({phases}), {trial.eval_s:.1f} s an evaluation: about "
        f"{_duration(total)} in all (checkpoints and exports not counted)"
    )


def _memory(trial: Trial) -> str:
    text = f"peak {trial.peak['peak_mem_mb']:,.0f} MB resident"
    if "peak_gpu_mem_mb" in trial.peak:
        text += f", {trial.peak['peak_gpu_mem_mb']:,.0f} MB of GPU memory allocated"
    return text


def _count(k: int, thing: str) -> str:
    return f"{k} {thing}" if k == 1 else f"{k} {thing}s"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
