"""Local-only training: every node trains on its own data and never communicates (W = I).

The lower reference of every decentralized paper (docs/algorithms.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.model import Federation


@dataclass
class LocalOnly:
    fed: Federation
    name: str = "local"
    single_node: bool = False
    cfg: object = None  # the run's Config and schedule: every algorithm is built with them; unused here
    schedule: object = None

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        return None  # nothing is sent: the bytes ledger stays at zero

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
