"""What unit tests on a whole tiny experiment share: the data, the experiment, and a round's context."""

from __future__ import annotations

from pathlib import Path

import torch

from declora.algorithms.base import RoundContext
from declora.config import load_config
from declora.experiment import Experiment, build_experiment


def tiny_experiment(tiny_bert: Path, tiny_data: Path, tmp_path: Path, *overrides: str) -> Experiment:
    """4 nodes of the tiny BERT (rank 4, 16 tokens, batches of 4) on ``tiny_data``, one thread, no export,
    run folder ``tmp_path / "run"``; then ``overrides``."""
    return build_experiment(
        load_config(
            None,
            [
                f"model.name={tiny_bert}",
                f"data.dataset={tiny_data}",
                "model.rank=4",
                "model.max_length=16",
                "nodes=4",
                "train.batch_size=4",
                "algorithm.server_lr=0.01",
                "export=none",
                "threads=1",
                f"run_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )
    )


def perturb(exp: Experiment, seed: int = 0, same: bool = True) -> None:
    """Random factors (by default the same on every node: a server model with B != 0) and a fresh
    algorithm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in exp.fed.tensors(("A", "B")).values():
            p.copy_(0.1 * torch.randn(p.shape[1:] if same else p.shape, generator=g).expand_as(p))
    exp.algorithm = type(exp.algorithm)(exp.fed, cfg=exp.cfg, schedule=exp.schedule)


def round_context(exp: Experiment, t: int = 0) -> RoundContext:
    """Round ``t`` with every node active."""
    sizes = torch.tensor([len(p) for p in exp.parts])
    ones = torch.ones(exp.n, dtype=torch.bool)
    return RoundContext(t, exp.fed, exp.schedule.matrix(t), ones, exp.exchange, exp.optimizer, sizes)
