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
from declora.evaluate import evaluate
from declora.experiment import Experiment
from declora.model import averaged_factors, export_peft, node_slice
from declora.report import write_report
from declora.schedules import describe
from declora.seeding import seed_for

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


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


def run(
    exp: Experiment, resume: bool = False, on_round: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) every round of ``exp``; returns the per-round records written to metrics.jsonl."""
    cfg, fed = exp.cfg, exp.fed
    metrics = MetricsLog(exp.run_dir / METRICS)
    start, wall_before = 0, 0.0
    if resume:
        start, wall_before = load_checkpoint(exp)
        metrics.truncate_after(start)
        log.info("resuming %s after round %d", exp.run_dir, start)
    else:
        _start(exp, metrics)
    sizes = torch.tensor([len(p) for p in exp.parts])
    began = time.perf_counter()
    records = []
    for t in range(start, cfg.rounds):
        torch.manual_seed(seed_for(cfg.seed, "dropout", t))  # a resumed run draws the same dropout masks
        plan = exp.algorithm.plan(t)
        online = exp.schedule.online(t)
        active = online if plan.active is None else plan.active & online
        names = list(fed.tensors(plan.train))
        loss, steps = exp.trainer.local_work(active, names, cfg.train.local_steps, cfg.train.local_unit)
        exp.exchange.ledger.start_round()
        exp.algorithm.communicate(
            RoundContext(t, fed, exp.schedule.matrix(t), online, exp.exchange, exp.optimizer, sizes)
        )
        trained = loss[~loss.isnan()]
        record: dict[str, Any] = {
            "event": "round",
            "round": t + 1,
            "train_loss": float(trained.mean()) if len(trained) else math.nan,
            "local_steps": steps,
            "active_nodes": int(active.sum()),
            **exp.exchange.ledger.round_summary(),
        }
        if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.rounds:
            record.update(event="eval", **evaluate(exp))
        record.update(wall_s=wall_before + time.perf_counter() - began, peak_mem_mb=peak_memory_mb())
        metrics.write(record)
        records.append(record)
        if on_round is not None:
            on_round(record)
        if (t + 1) % cfg.checkpoint_every == 0 or t + 1 == cfg.rounds:
            save_checkpoint(exp, t + 1, record["wall_s"])
    export_adapters(exp)
    write_report(exp.run_dir)
    return records


def export_adapters(exp: Experiment) -> None:
    """The consensus adapter (averaged factors) and, with export=all, every node's adapter."""
    if exp.cfg.export == "none":
        return
    stacked = {k: v.detach() for k, v in exp.fed.tensors().items()}
    folder = exp.run_dir / "adapters"
    export_peft(exp.fed, averaged_factors(stacked), folder / "consensus")
    if exp.cfg.export == "all":
        for i in range(exp.n):
            export_peft(exp.fed, node_slice(stacked, i), folder / f"node_{i:03d}")
