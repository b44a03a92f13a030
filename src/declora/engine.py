"""The round loop, top to bottom: plan, train every active node at once, communicate, evaluate, save."""

from __future__ import annotations

import copy
import logging
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from declora.algorithms.base import RoundContext
from declora.checkpoint import save_checkpoint
from declora.config import ConfigError
from declora.device import default_dtype, peak_gpu_memory_mb, reset_gpu_peak
from declora.dist import AgreedStop
from declora.evaluate import evaluate_all
from declora.experiment import Experiment
from declora.export import AdapterExport
from declora.heap import release_free_memory
from declora.patience import Patience
from declora.report import write_report
from declora.run_start import METRICS, MetricsLog, check_folder, resume_run, start_new_run
from declora.runfolder import crash_point, hold_run_folder
from declora.trackers import Trackers, tracker_names

log = logging.getLogger(__name__)


class StopRun(Exception):  # noqa: N818 (a signal, not an error)
    """Raise from ``run``'s ``on_round`` to end the run after that round (early stopping): the round is
    checkpointed, the adapters and the report are written, and ``run`` returns. A later
    ``run(..., resume=True)`` (on a new Experiment) continues to ``rounds``. Unlike a run's last round, the
    round it stops at is evaluated only when ``eval.every`` evaluates it: stop at such a round for the
    report and the adapters' cards to score the model they hold (a warning says so otherwise); the stop
    adds no evaluation, so a stopped and resumed run logs what an uninterrupted one does."""


# Record keys that measure the machine, not the run: they differ between two runs of the same config.
MEASURED = ("wall_s", "tokens_per_s", "peak_mem_mb", "peak_gpu_mem_mb")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PhaseTimes:
    """Where a round's time goes on this process (logged per rank: rank_K.log in multi-process runs)."""

    def __init__(self, exp: Experiment, t: int) -> None:
        self.exp, self.t, self.mark, self.phase = exp, t, time.perf_counter(), ""
        self.seconds: dict[str, float] = {}  # phase -> seconds this round

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self.phase:
            self.seconds[self.phase] = now - self.mark
        self.exp.group.enter(self.t, phase)  # progress stamp; "round" waits for every rank
        self.phase, self.mark = phase, now  # that wait counts in the phase it starts

    def done(self) -> None:
        self.seconds[self.phase] = time.perf_counter() - self.mark
        # "round" is the barrier every rank meets at a round's start: in one process, nothing to wait for
        shown = {("wait for the other ranks" if k == "round" else k): v for k, v in self.seconds.items()}
        if self.exp.group.world == 1:
            shown.pop("wait for the other ranks", None)
        log.info("round %d: %s", self.t + 1, ", ".join(f"{k} {v:.3f} s" for k, v in shown.items()))


def run(
    exp: Experiment,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume) every round of ``exp``; returns the per-round records written to metrics.jsonl.

    Every process of a multi-process run runs this loop on its slice of the nodes; ``exp.group``
    gathers the per-node numbers, and rank 0 alone writes the run folder's shared files, holding its
    lock throughout (another process on the same folder is refused); every rank writes its own
    checkpoint shard and rank_K.log there. A new run needs an empty ``exp.run_dir`` (or
    ``overwrite``); a resume may change only RESUME_SAFE keys (declora.resume_rules). An Experiment runs
    once: to run or resume again, build a new one.

    ``on_round(record)`` is called after each round is logged and, when due, checkpointed; raising
    ``StopRun`` there ends the run after that round (early stopping); any other exception propagates and
    leaves the folder at its last checkpoint.
    """
    if not isinstance(exp, Experiment):  # run(cfg): the config, not what build_experiment makes of it
        raise TypeError(
            f"run takes an Experiment, got {type(exp).__name__}; build one with build_experiment(cfg)"
        )
    if on_round is not None and not callable(on_round):  # found before any round, not after the first
        raise TypeError(f"on_round must be a function of each round's record (or None), got {on_round!r}")
    _refuse_spent(exp)
    if resume and overwrite:
        raise ConfigError("resume=True and overwrite=True contradict each other: resume keeps the folder")
    if exp.group.is_main:  # refused before the lock, whose file a refused folder would otherwise keep
        check_folder(exp.run_dir, resume, overwrite)
    lock = hold_run_folder(exp.run_dir) if exp.group.is_main else None
    try:
        # Training needs autograd whatever the caller's mode (a notebook's torch.no_grad() or
        # inference_mode()), and the tensors made during the run in torch's default dtype must be fp32.
        with torch.inference_mode(False), torch.enable_grad(), default_dtype(torch.float32):
            return _run_rounds(exp, resume, on_round, overwrite)
    finally:
        if lock is not None:
            lock.close()


def _refuse_spent(exp: Experiment) -> None:
    """An Experiment runs (or is tried) once: after that its tensors, optimizer and streams are moved."""
    if exp.ran:
        raise ConfigError(
            f"this Experiment has already run (in {exp.run_dir}): its model, optimizer and data streams hold "
            "that run's state; build a new one with build_experiment(cfg) to run or resume again"
        )


@dataclass(frozen=True)
class Trial:
    """The first rounds of an experiment played in memory (``trial_rounds``): ``declora run --dry-run``."""

    records: list[dict[str, Any]]  # each round's record as run logs it before evaluation (bytes, speed...)
    seconds: list[dict[str, float]]  # each round's seconds per phase (train, communicate)
    eval_s: float  # one evaluation after the last of them
    peak: dict[str, float]  # peak_memory after it all
    evaluation: dict[str, Any]  # what that evaluation logged (the last record's eval keys)

    @property
    def round_s(self) -> float:
        """The last trial round's seconds: the rate, the first round also paying one-off costs."""
        return sum(self.seconds[-1].values())


def trial_rounds(exp: Experiment, rounds: int) -> Trial:
    """Play the first ``rounds`` rounds of ``exp`` as ``run`` does (local work, communication, the health
    check, the round's record) and evaluate once, writing nothing. ``exp`` is spent: its tensors,
    optimizer and streams have moved, so a run needs a new Experiment."""
    _refuse_spent(exp)
    exp.ran = True
    records, seconds = [], []
    with torch.inference_mode(False), torch.enable_grad(), default_dtype(torch.float32):
        for t in range(min(rounds, exp.cfg.rounds)):
            with _in_round(t, exp.cfg.algorithm.name, "nothing was written (a dry run)"):
                phases = PhaseTimes(exp, t)
                phases.enter("round")
                work, W, speed = train_and_communicate(exp, t, phases)
                loss = exp.group.gather_nodes(work.loss)  # (n,)
                check_health(exp, t, loss, work.active)
                records.append(round_record(exp, t, loss, work, W, speed))
                phases.done()
                seconds.append({k: v for k, v in phases.seconds.items() if k != "round"})
        began = time.perf_counter()
        evaluation = evaluate_all(exp)
        eval_s = time.perf_counter() - began
    return Trial(records, seconds, eval_s, peak_memory(exp), evaluation)


@contextmanager
def _in_round(
    t: int, algorithm: str, after: str = "the run folder keeps its last checkpoint"
) -> Iterator[None]:
    """An exception from round ``t``'s work (an algorithm's, a plugin's, an ``on_round``'s) keeps its type
    and says where it came from and ``after`` it; ``failed_in_round`` tells the command line it is not bad
    input."""
    try:
        yield
    except Exception as err:
        where = f"round {t + 1} (algorithm {algorithm})"
        err.add_note(f"declora: raised in {where}; {after}")
        setattr(err, FAILED_IN_ROUND, where)
        raise


FAILED_IN_ROUND = "declora_failed_in_round"  # set on an exception raised by a round's work


def failed_in_round(err: BaseException) -> str | None:
    """Which round's work raised ``err`` ("round 3 (algorithm dec_lora)"); None: it was raised before the
    rounds, by a check."""
    return getattr(err, FAILED_IN_ROUND, None)


def _run_rounds(
    exp: Experiment,
    resume: bool,
    on_round: Callable[[dict[str, Any]], None] | None,
    overwrite: bool,
) -> list[dict[str, Any]]:
    cfg, group = exp.cfg, exp.group
    metrics = MetricsLog(exp.run_dir / METRICS)
    start, wall_before = 0, 0.0
    if resume:
        start, wall_before = resume_run(exp, metrics)
    elif group.is_main:
        start_new_run(exp, metrics, overwrite)
    saved = start  # the round of the last checkpoint on disk (0: none yet)
    reset_gpu_peak(exp.fed.device)
    exp.ran = True  # from here on its tensors, optimizer and streams are this run's
    board = Trackers(cfg, exp.run_dir) if tracker_names(cfg) and group.is_main else None
    try:
        records = _rounds(exp, metrics, start, saved, wall_before, resume, board, on_round)
    finally:  # a run stopped by an exception closes its tracker runs too
        if board is not None:
            board.close()
    if group.is_main:
        write_report(exp.run_dir)
    return records


def _rounds(
    exp: Experiment,
    metrics: MetricsLog,
    start: int,
    saved: int,
    wall_before: float,
    resume: bool,
    board: Trackers | None,
    on_round: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Rounds ``start`` to the end (or to a StopRun), then the adapters' export."""
    cfg, group = exp.cfg, exp.group
    export = AdapterExport(exp, resumed=resume)
    patience = Patience(cfg, _logged(exp, metrics) if resume and cfg.eval.patience else [])
    began = time.perf_counter()
    records = []
    for t in range(start, cfg.rounds):
        with _in_round(t, cfg.algorithm.name):
            phases = PhaseTimes(exp, t)
            phases.enter("round")
            work, W, speed = train_and_communicate(exp, t, phases)
            loss = group.gather_nodes(work.loss)  # (n,)
            try:
                check_health(exp, t, loss, work.active, saved)
            except NumericalError as err:
                if group.is_main:  # on record: the report says why the run stopped (a resume would repeat it)
                    metrics.write({"event": "diverged", "round": t + 1, "reason": str(err)})
                    crash_point("round.diverged")  # tests: rank 0 reaches the stop after its peers
                group.stop_together()
                raise
            crash_point("round.trained")
            record = round_record(exp, t, loss, work, W, speed)
            if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.rounds:
                phases.enter("evaluate")
                record.update(event="eval", **evaluate_all(exp))
            record.update(wall_s=wall_before + time.perf_counter() - began, **peak_memory(exp))
            if group.is_main:
                metrics.write(record)
            export.on_round(record)
            crash_point("round.logged")
            if board is not None:
                board(record)
            records.append(record)
            if (t + 1) % cfg.checkpoint_every == 0 or t + 1 == cfg.rounds:
                phases.enter("checkpoint")
                save_checkpoint(exp, t + 1, record["wall_s"])
                saved = t + 1
            if patience.after(record) and t + 1 < cfg.rounds:  # early stopping: no better validation score
                if saved != t + 1:
                    save_checkpoint(exp, t + 1, record["wall_s"])
                line = patience.line(t + 1)
                if group.is_main:
                    metrics.write(line)
                log.info("stopped after round %d of %d: %s", t + 1, cfg.rounds, line["reason"])
                phases.done()
                break
            if _stop_asked(exp, record, on_round, saved):
                phases.done()
                break
            release_free_memory()  # see heap.py: without it resident memory creeps up round after round
            phases.done()
    group.enter(cfg.rounds, "finish")
    export.finish(records[-1] if records else None)
    crash_point("exported")
    return records


@dataclass(frozen=True)
class LocalWork:
    """One round's local training on this process's nodes; the masks are (nodes here,) bool, ``up`` the
    global (n,) availability."""

    up: torch.Tensor
    online: torch.Tensor
    active: torch.Tensor  # online, picked by the algorithm and, asynchronous, publishing this round
    loss: torch.Tensor  # each of these nodes' mean loss, NaN where it did not train
    steps: int


def train_and_communicate(
    exp: Experiment, t: int, phases: PhaseTimes
) -> tuple[LocalWork, torch.Tensor, dict[str, float]]:
    """Round t's local steps on every active node, then its communication, booked on a fresh ledger
    round: the work, the round's global W(t) (n, n) and the training speed."""
    phases.enter("train")
    work = _local_work(exp, t)
    phases.enter("communicate")
    speed = train_speed(exp, phases.seconds["train"])
    exp.exchange.ledger.start_round()
    W = exp.schedule.matrix(t)
    sizes = torch.tensor([len(p) for p in exp.parts])  # this process's nodes
    exp.algorithm.communicate(
        RoundContext(t, exp.fed, W, work.online, exp.exchange, exp.optimizer, sizes, exp.group.nodes)
    )
    return work, W, speed


def _local_work(exp: Experiment, t: int) -> LocalWork:
    """Which nodes train this round and what, then their local steps, all nodes at once."""
    cfg = exp.cfg
    plan = exp.algorithm.plan(t)
    up = exp.schedule.online(t)  # (n,) global
    online = exp.local(up)
    active = online if plan.active is None else exp.local(plan.active) & online
    if exp.stragglers is not None:  # asynchronous: a slow node trains only in the rounds it publishes
        active = active & exp.local(exp.stragglers.begin_round(t, up))
    names = list(exp.fed.tensors(plan.train))
    exp.trainer.tokens = 0
    exp.trainer.correction = plan.correction  # FedProx's pull, SCAFFOLD's control variates, or None
    if exp.lr_schedule is not None:
        exp.optimizer.lr_scale = exp.lr_schedule.scale()
    loss, steps = exp.trainer.local_work(active, names, cfg.train.local_steps, cfg.train.local_unit)
    if exp.lr_schedule is not None:
        exp.lr_schedule.advance(active)
    return LocalWork(up, online, active, loss, steps)


def round_record(
    exp: Experiment, t: int, loss: torch.Tensor, work: LocalWork, W: torch.Tensor, speed: dict[str, float]
) -> dict[str, Any]:
    """The round's line of metrics.jsonl before evaluation: loss, steps, nodes, speed, bytes, and the
    stragglers' clock and the privacy budget where a run has them. ``loss``: every node's, gathered (n,)."""
    group = exp.group
    losses = loss[~loss.isnan()]  # the nodes that trained
    record: dict[str, Any] = {
        "event": "round",
        "round": t + 1,
        "train_loss": float(losses.mean()) if len(losses) else None,  # null: no node trained
        "local_steps": int(group.all_max(torch.tensor(work.steps))),
        "active_nodes": int(group.gather_nodes(work.active).sum()),  # replicas: each rank has every node
        **speed,
        **exp.exchange.ledger.round_summary(),
    }
    if exp.stragglers is not None:  # the simulated clock (declora.stragglers)
        trained = group.gather_nodes(work.active)  # (n,) bool
        record.update(exp.stragglers.end_round(t, W, work.up, trained, record["bytes_node_max"]))
    if exp.privacy is not None:  # every node's epsilon so far (declora.privacy)
        record.update(exp.privacy.summary(exp.group))
    return record


def _logged(exp: Experiment, metrics: MetricsLog) -> list[dict[str, Any]]:
    """The records a resumed run logged before its checkpoint, read on rank 0 and given to every rank (so
    that every rank counts the same evaluations and stops alike)."""
    return exp.group.broadcast([r for _, r in metrics.records()] if exp.group.is_main else None)


def _stop_asked(
    exp: Experiment, record: dict[str, Any], on_round: Callable[[dict[str, Any]], None] | None, saved: int
) -> bool:
    """Hand the record to ``on_round``; on a StopRun (from any rank) checkpoint this round and say stop."""
    cfg, group, t = exp.cfg, exp.group, record["round"] - 1
    stop = False
    if on_round is not None:
        try:
            on_round(copy.deepcopy(record))  # a callback that edits it changes no card or record
        except StopRun:
            stop = True
    if not bool(group.all_max(torch.tensor(int(stop)))):  # one rank's stop stops every rank
        return False
    if saved != t + 1:
        save_checkpoint(exp, t + 1, record["wall_s"])
    log.info("stopped after round %d of %d (StopRun)", t + 1, cfg.rounds)
    if record["event"] != "eval" and group.is_main:
        log.warning(
            "StopRun after round %d, which eval.every=%d does not evaluate: the report and the "
            "adapters' cards hold no score of the model they save; stop at an evaluated round",
            t + 1,
            cfg.eval.every,
        )
    return True


def train_speed(exp: Experiment, seconds: float) -> dict[str, float]:
    """Tokens trained this round (every process) and their rate over the slowest process's train time."""
    tokens = int(exp.group.all_sum(torch.tensor(exp.trainer.tokens)))
    slowest = float(exp.group.all_max(torch.tensor(seconds)))
    return {"train_tokens": tokens, "tokens_per_s": tokens / slowest if slowest > 0 else 0.0}


def peak_memory(exp: Experiment) -> dict[str, float]:
    """Peak resident memory of the largest process, and on a GPU its peak allocated GPU memory too."""
    out = {"peak_mem_mb": float(exp.group.all_max(torch.tensor(peak_memory_mb())))}
    gpu = peak_gpu_memory_mb(exp.fed.device)
    if gpu is not None:
        out["peak_gpu_mem_mb"] = float(exp.group.all_max(torch.tensor(gpu)))
    return out


class NumericalError(AgreedStop, ArithmeticError):
    """A NaN or Inf in a loss or a node's tensor: the run stops at that round (every rank of a launch, on
    the numbers they reduced together)."""


def check_health(exp: Experiment, t: int, loss: torch.Tensor, active: torch.Tensor, saved: int = 0) -> None:
    """Stop at round t+1 if a trained node's loss (n,) or any node's tensor after communication is NaN or
    Inf, naming the node, the tensor and ``saved``, the round of the last checkpoint (0: none). A bad loss
    names its lowest node; otherwise the earliest bad tensor names, of the nodes where it is bad, the
    lowest. The ranks of a launch agree on the minimum of what each found, so for the same bad values they
    name what one process names; after a non-finite message, though, which nodes it reaches can differ:
    a node's weighted mix adds 0 x Inf = NaN from every node it mixes with, and each rank mixes its own."""
    names, n = list(exp.fed.tensors()), exp.n
    none = (len(names) + 1) * n  # above every code: k * n + node, k = 0 for the loss, 1 + tensor index
    bad = none
    trained = exp.group.gather_nodes(active)  # (n,) bool; the loss is every node's, the same on every rank
    for node in torch.nonzero(trained & ~torch.isfinite(loss)).flatten().tolist():
        bad = node
        break
    # (tensors, n_local): one copy to the host for all tensors, not one per tensor (a GPU waits for each)
    finite = torch.stack([torch.isfinite(v.detach()).flatten(1).all(1) for v in exp.fed.tensors().values()])
    finite = finite.cpu()
    if bad == none and not bool(finite.all()):
        ks, rows = (~finite).nonzero(as_tuple=True)
        bad = int(((1 + ks) * n + exp.group.nodes[rows]).min())
    bad = -int(exp.group.all_max(torch.tensor(-bad)))  # the minimum over the ranks
    if bad == none:
        return
    k, node = divmod(bad, n)
    what = "its training loss" if k == 0 else f"tensor {names[k - 1]} after communication"
    last = f"last checkpoint: round {saved}" if saved else "no checkpoint yet"
    fix = "a lower train.lr or a max_grad_norm"
    if exp.privacy is not None:  # the DP noise is the likelier cause: its std is sigma x clip
        sigma, clip = exp.privacy.sigma, exp.cfg.privacy.clip
        fix = f"less DP noise (noise multiplier {sigma:g} x privacy.clip {clip:g}), or {fix}"
    raise NumericalError(
        f"round {t + 1}: node {node}: {what} is NaN or Inf; the run stops here ({last}); try {fix}"
    )
