"""Dec-LoRA: decentralized LoRA, both factors gossiped.

Ghiasvand, Alizadeh, Pedarsani. "Decentralized Low-Rank Fine-Tuning of Large Language Models."
arXiv 2501.15361 (REALM @ ACL 2025). docs/algorithms.md.

Each round, node i trains (A_i, B_i) (and a trained head) locally, then mixes with its neighbours:

    A_i <- sum_j W_ij A_j        B_i <- sum_j W_ij B_j        head_i <- sum_j W_ij head_j

With W = I this is local-only training; with W = 11^T/n it is FedAvg of the factors (FedIT).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.model import Federation


@dataclass
class DecLoRA:
    fed: Federation
    name: str = "dec_lora"
    single_node: bool = False
    cfg: object = None  # the run's Config and schedule: every algorithm is built with them; unused here
    schedule: object = None

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        gossip_kinds(ctx, self.plan(ctx.round).train)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
