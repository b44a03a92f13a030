"""RoLoRA-DFL: RoLoRA carried naively into decentralized FL; only the active factor is gossiped.

The "RoLoRA-in-DFL" baseline of ADF-LoRA (arXiv 2511.18291) and TAD-LoRA (arXiv 2602.00451), after
Chen et al.'s RoLoRA (NeurIPS 2025). docs/algorithms.md: phase mismatch.

Round t, phase p = phase(t) (the shared clock in ``alternating.py``):

    local: every active node trains only factor p (and a trained head)
    mix:   X_i <- sum_j W_ij(t) X_j   for X = factor p (and the head) ONLY

The frozen factor is never mixed while frozen, so after an A phase the A_i differ and mixing B alone
gives sum_j W_ij B_j A_i != sum_j W_ij B_j A_j: the cross-terms return (block-wise divergence). This
is the variant ADF-LoRA shows degrading; it is here as that baseline. The papers run it with T = 1;
T = cfg.algorithm.switch_interval (shared default 5), so set switch_interval=1 to match them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from declora.algorithms.alternating import PhaseClock, build_clock, end_of_round
from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule


@dataclass
class RoLoRADFL:
    fed: Federation
    name: str = "rolora_dfl"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    clock: PhaseClock = field(init=False)

    def __post_init__(self) -> None:
        self.acfg = self.cfg.algorithm
        self.clock, _ = build_clock(self.acfg, self.schedule, self.name)
        self.interval = self.clock.interval

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed, (self.clock.phase(t),)))

    def communicate(self, ctx: RoundContext) -> None:
        gossip_kinds(ctx, self.plan(ctx.round).train)
        end_of_round(ctx, self.clock, self.acfg.optimizer_policy)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
