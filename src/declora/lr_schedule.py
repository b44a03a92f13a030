"""Learning-rate schedules across rounds, kept per node (train.schedule, train.warmup_rounds).

Node i's learning rate in its k-th round of local training (k = 0, 1, ...; rounds it sat out do not count)
is train.lr (and head_lr) times

    warm-up   (k + 1) / w                                   for k < w = train.warmup_rounds
    constant  1
    cosine    (1 + cos(pi (k - w) / (R - w))) / 2           R = rounds: 1 after warm-up, towards 0 at R
    linear    1 - (k - w) / (R - w)

constant with no warm-up is the plain optimizer (no scale at all). Each node's k is part of the
checkpoint, so a resumed run continues every node's schedule where it stopped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SHAPES = ("constant", "cosine", "linear")


def multiplier(shape: str, k: Tensor, warmup: int, rounds: int) -> Tensor:
    """(n,) learning-rate factors for nodes in their k-th round (k: (n,) long)."""
    k = k.double()
    span = max(rounds - warmup, 1)
    frac = ((k - warmup) / span).clamp(0.0, 1.0)
    after = {
        "constant": torch.ones_like(k),
        "cosine": (1 + torch.cos(math.pi * frac)) / 2,
        "linear": 1 - frac,
    }[shape]
    warm = (k + 1) / warmup if warmup > 0 else torch.ones_like(k)
    return torch.where(k < warmup, warm, after).float()


class RoundSchedule:
    """Every node's count of rounds trained, and the optimizer's per-node lr scale it gives."""

    def __init__(self, shape: str, warmup: int, rounds: int, n: int) -> None:
        if shape not in SHAPES:
            raise ValueError(f"train.schedule={shape!r} is not allowed; choose one of {list(SHAPES)}")
        self.shape, self.warmup, self.rounds = shape, warmup, rounds
        self.progress = torch.zeros(n, dtype=torch.long)  # (n,) rounds each node has trained

    @property
    def active(self) -> bool:
        return self.shape != "constant" or self.warmup > 0

    def scale(self) -> Tensor | None:
        """(n,) factors for this round's local work, or None (plain optimizer)."""
        return multiplier(self.shape, self.progress, self.warmup, self.rounds) if self.active else None

    def advance(self, trained: Tensor) -> None:
        self.progress += trained.cpu().long()

    def state_dict(self) -> dict[str, Tensor]:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "progress" in state:
            self.progress.copy_(state["progress"])
