"""ADF-LoRA: alternating LoRA in decentralized FL, with a global phase and both factors mixed.

Wang, Li, Zhou, Li, Liu. "ADF-LoRA." arXiv 2511.18291 (2025). docs/algorithms.md: phase mismatch.

Round t, phase p = phase(t) (the shared clock in ``alternating.py``; T = switch_interval, default 5):

    local: every active node trains only factor p (and a trained head); the other factor is frozen
    mix:   A_i <- sum_j W_ij(t) A_j      B_i <- sum_j W_ij(t) B_j      head_i <- sum_j W_ij(t) head_j

Mixing BOTH factors every round keeps the frozen one in consensus, so the cross-terms of naive
RoLoRA-in-DFL (only the active factor mixed) do not come back. The paper freezes the classifier head:
set model.head=frozen for its setting. [M] first_phase (B) and optimizer_policy at a switch (reset) are
config fields; see ``alternating.py``. switch_interval="auto" is TAD-LoRA's rule (tad_lora).
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
class ADFLoRA:
    fed: Federation
    name: str = "adf_lora"
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
        gossip_kinds(ctx, trained_kinds(ctx.fed, ("A", "B")))
        end_of_round(ctx, self.clock, self.acfg.optimizer_policy)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
