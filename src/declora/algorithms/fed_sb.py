"""Fed-SB: federated LoRA-SB, a trained r x r matrix between frozen shared factors.

Singhal, Ponkshe, Vartak, Varshney, Vepakomma. "Fed-SB: A Silver Bullet for Extreme Communication
Efficiency and Performance in (Private) Federated LoRA Fine-Tuning." arXiv 2502.15436 (ES-FoMo @ ICML 2025).

Every node holds the same frozen A (model.init_seed) and B (seeded from model.init_seed, per module) and
trains its own R_i (n, r, r), starting at 0:

    delta W_i = s B R_i A

A server averages R (and a trained head) over the participants S; the decentralized variant ``dec_sb``
gossips R_i <- sum_j W_ij R_j. Both are exact: B (sum_j w_j R_j) A = sum_j w_j B R_j A, with no cross
term, so the mean adapter is the adapter of the mean. A message is r^2 floats per module, independent of
the layer's width. PEFT export folds R into B (B R, a plain rank-r LoRA).

Here B is a seeded Kaiming-uniform draw, not the paper's LoRA-SB initialisation from the truncated SVD
of a first full-gradient step (not built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.fedavg import FedAvg
from declora.algorithms.mixing import gossip_kinds
from declora.model import Federation


@dataclass
class FedSB(FedAvg):
    name: str = "fed_sb"
    middle: bool = True  # build_experiment adds R to every adapted layer (model.add_middle_factors)
    TRAINS: ClassVar[tuple[str, ...]] = ("R",)


@dataclass
class DecSB:
    fed: Federation
    name: str = "dec_sb"
    single_node: bool = False
    cfg: object = None
    schedule: object = None
    middle: bool = True

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed, ("R",)))

    def communicate(self, ctx: RoundContext) -> None:
        gossip_kinds(ctx, self.plan(ctx.round).train)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
