"""Centralized LoRA: one node holds the union of the nodes' data; the upper reference (docs/algorithms.md).

The same adapter, optimizer and local-step code as every other algorithm, with n = 1 and nothing sent.
Compare at equal examples seen by giving it ``train.batch_size`` = nodes x the federated batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.model import Federation


@dataclass
class Centralized:
    fed: Federation
    name: str = "centralized"
    single_node: bool = True
    cfg: object = None  # the run's Config and schedule: every algorithm is built with them; unused here
    schedule: object = None

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        return None

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
