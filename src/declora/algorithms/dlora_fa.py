"""DLoRA-FA: decentralized LoRA with A frozen at the shared init; only B (and a head) is gossiped.

Saadati et al., "DeCAF: Decentralized Consensus-And-Factorization for Low-Rank Adaptation of Foundation
Models." arXiv 2505.21382, the DLoRA-FA baseline. docs/algorithms.md: cross-term, initialization.

Every node starts from the same A^0 (model.init_seed) and B^0 = 0. Each round node i trains B_i (and a
trained head) and mixes:

    B_i <- sum_j W_ij B_j        head_i <- sum_j W_ij head_j        A_i = A^0 forever

Since A is shared, mixing B mixes the products exactly: (sum_j W_ij B_j) A^0 = sum_j W_ij B_j A^0.
Half the communication and trainable parameters of DLoRA for square layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule


@dataclass
class DLoRAFA:
    fed: Federation
    name: str = "dlora_fa"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed, ("B",)))

    def communicate(self, ctx: RoundContext) -> None:
        gossip_kinds(ctx, self.plan(ctx.round).train)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
