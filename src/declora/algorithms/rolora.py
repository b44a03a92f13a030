"""RoLoRA: alternating LoRA with a server; only the active factor is trained and averaged.

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA" (RoLoRA),
NeurIPS 2025. docs/algorithms.md.

Round t, phase p = phase(t) (the shared clock in ``alternating.py``):

    local:  every participant trains only factor p (and a trained head); the other factor is frozen
    server: X <- sum_{i in S} p_i X_i  for X = factor p (and the head), p_i by server.weighting (uniform
            1/|S| by default) and moved by server.optimizer; the server model goes to every online node

The frozen factor is the same on every node (it was averaged in its own phase), so the server's
product is exact: mean_i(B_i) A = mean_i(B_i A). Half the communication of FedAvg-LoRA.
T = cfg.algorithm.switch_interval: RoLoRA itself alternates every round (T = 1); the config's shared
default is 5, so set switch_interval=1 for the paper. [M] first_phase (B) and the optimizer policy at a
switch (reset) are config fields; see ``alternating.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from declora.algorithms.alternating import PhaseClock, build_clock, end_of_round
from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.server import ServerModel, active_nodes
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.schedules import Schedule


@dataclass
class RoLoRA:
    fed: Federation
    name: str = "rolora"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    clock: PhaseClock = field(init=False)

    def __post_init__(self) -> None:
        self.acfg = self.cfg.algorithm
        self.server = ServerModel(self.fed, self.cfg, self.schedule)
        self.clock, _ = build_clock(self.acfg, self.schedule, self.name)
        self.interval = self.clock.interval

    def plan(self, t: int) -> RoundPlan:
        phase = (self.clock.phase(t),)
        return RoundPlan(train=trained_kinds(self.fed, phase), active=active_nodes(self.cfg, t))

    def communicate(self, ctx: RoundContext) -> None:
        self.server.aggregate(ctx, self.plan(ctx.round).train)
        end_of_round(ctx, self.clock, self.acfg.optimizer_policy)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds

    def state_dict(self) -> dict[str, Tensor]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
