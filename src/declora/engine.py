"""The round loop, top to bottom: plan, train every active node at once, communicate, evaluate, save."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from declora.algorithms.base import RoundContext
from declora.checkpoint import load_checkpoint, save_checkpoint
from declora.config import save_config, to_dict
from declora.device import peak_gpu_memory_mb
from declora.evaluate import evaluate
from declora.experiment import Experiment
from declora.export import AdapterExport
from declora.heap import release_free_memory
from declora.report import write_report
from declora.schedules import describe
from declora.seeding import seed_for
from declora.trackers import Trackers, tracker_names

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
# Record keys that measure the machine, not the run: they differ between two runs of the same config.
MEASURED = ("wall_s", "tokens_per_s", "peak_mem_mb", "peak_gpu_mem_mb")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's round are dropped first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, round_done: int) -> None:
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("round", 0) <= round_done
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _start(exp: Experiment, metrics: MetricsLog) -> None:
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(exp.cfg, exp.run_dir / "config.yaml")
    metrics.path.write_text("")
    topology = {k: v for k, v in describe(exp.schedule).items() if not isinstance(v, (list, dict))}
    log.info("topology: %s", topology)
    metrics.write(
        {"event": "start", "round": 0, "nodes": exp.n, "config": to_dict(exp.cfg), "topology": topology}
    )
    metrics.write({"event": "partition", "round": 0, "nodes": exp.partition_summary})
    for i, node in enumerate(exp.partition_summary):
        log.info("node %d: %s", i, node)


class PhaseTimes:
    """Where a round's time goes on this process (logged per rank: rank_K.log in multi-process runs)."""

    def __init__(self, exp: Experiment, t: int) -> None:
        self.exp, self.t, self.seconds, self.mark, self.phase = exp, t, {}, time.perf_counter(), ""

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self.phase:
            self.seconds[self.phase] = now - self.mark
        self.exp.group.enter(self.t, phase)  # progress stamp; "round" waits for every rank
        self.phase, self.mark = phase, time.perf_counter()

    def done(self) -> None:
        self.seconds[self.phase] = time.perf_counter() - self.mark
        log.info("round %d: %s", self.t + 1, ", ".join(f"{k} {v:.3f} s" for k, v in self.seconds.items()))


def run(
    exp: Experiment, resume: bool = False, on_round: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) every round of ``exp``; returns the per-round records written to metrics.jsonl.

    Every process of a multi-process run runs this loop on its slice of the nodes; ``exp.group``
    gathers the per-node numbers, and rank 0 alone writes the run folder.
    """
    cfg, fed, group = exp.cfg, exp.fed, exp.group
    metrics = MetricsLog(exp.run_dir / METRICS)
    start, wall_before = 0, 0.0
    if resume:
        start, wall_before = load_checkpoint(exp)
        if group.is_main:
            metrics.truncate_after(start)
        log.info("resuming %s after round %d", exp.run_dir, start)
    elif group.is_main:
        _start(exp, metrics)
    sizes = torch.tensor([len(p) for p in exp.parts])  # this process's nodes
    board = Trackers(cfg, exp.run_dir) if tracker_names(cfg) and group.is_main else None
    export = AdapterExport(exp, resumed=resume)
    began = time.perf_counter()
    records = []
    for t in range(start, cfg.rounds):
        phases = PhaseTimes(exp, t)
        phases.enter("round")
        phases.enter("train")
        torch.manual_seed(seed_for(cfg.seed, "dropout", t))  # a resumed run draws the same dropout masks
        plan = exp.algorithm.plan(t)
        online = exp.local(exp.schedule.online(t))
        active = online if plan.active is None else exp.local(plan.active) & online
        names = list(fed.tensors(plan.train))
        exp.trainer.tokens = 0
        exp.trainer.correction = plan.correction  # FedProx's pull, SCAFFOLD's control variates, or None
        if exp.lr_schedule is not None:
            exp.optimizer.lr_scale = exp.lr_schedule.scale()
        loss, steps = exp.trainer.local_work(active, names, cfg.train.local_steps, cfg.train.local_unit)
        if exp.lr_schedule is not None:
            exp.lr_schedule.advance(active)
        phases.enter("communicate")
        speed = train_speed(exp, phases.seconds["train"])
        exp.exchange.ledger.start_round()
        W = exp.schedule.matrix(t)  # global (n, n)
        exp.algorithm.communicate(
            RoundContext(t, fed, W, online, exp.exchange, exp.optimizer, sizes, group.nodes)
        )
        loss = group.gather_nodes(loss)  # (n,)
        trained = loss[~loss.isnan()]
        record: dict[str, Any] = {
            "event": "round",
            "round": t + 1,
            "train_loss": float(trained.mean()) if len(trained) else math.nan,
            "local_steps": int(group.all_max(torch.tensor(steps))),
            "active_nodes": int(group.all_sum(active.sum())),
            **speed,
            **exp.exchange.ledger.round_summary(),
        }
        if exp.privacy is not None:  # every node's epsilon so far (declora.privacy)
            record.update(exp.privacy.summary(group))
        if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.rounds:
            phases.enter("evaluate")
            record.update(event="eval", **evaluate(exp))
        record.update(wall_s=wall_before + time.perf_counter() - began, **peak_memory(exp))
        if group.is_main:
            metrics.write(record)
        export.on_round(record)
        if board is not None:
            board(record)
        records.append(record)
        if on_round is not None:
            on_round(record)
        if (t + 1) % cfg.checkpoint_every == 0 or t + 1 == cfg.rounds:
            phases.enter("checkpoint")
            save_checkpoint(exp, t + 1, record["wall_s"])
        release_free_memory()  # see heap.py: without it resident memory creeps up round after round
        phases.done()
    if board is not None:
        board.close()
    group.enter(cfg.rounds, "finish")
    export.finish(records[-1] if records else None)
    if group.is_main:
        write_report(exp.run_dir)
    return records


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
