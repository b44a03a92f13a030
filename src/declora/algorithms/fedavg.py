"""FedAvg-LoRA (FedIT): a server averages the factors of the participating nodes.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT), ICASSP 2024;
docs/algorithms.md. Each round every node trains locally, uploads (A_i, B_i, head_i), and the server sends
back

    A <- sum_i p_i A_i      B <- sum_i p_i B_i      (p_i uniform, as a complete graph with W = 11^T/n)

over the sampled participants, with p_i uniform or by data size (server.weighting), or any server
optimizer on the mean change (server.optimizer; algorithms/server.py, server_opt.py).

The mean of the factors is not the mean of the products B_i A_i (the cross-term error, see cross-term). The
``cross_term`` metric is taken at evaluation, after the aggregation, when every node holds the server model:
it is 0 here, and this gap is not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.server import ServerModel, active_nodes
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.schedules import Schedule


@dataclass
class FedAvg:
    fed: Federation
    name: str = "fedavg"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    # The server variants (ffa_lora, fedsa_lora, fed_sb) differ only in these: the factor kinds each
    # participant trains (a trained head is added) and, None meaning the same, those the server averages.
    TRAINS: ClassVar[tuple[str, ...]] = ("A", "B")
    AGGREGATES: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self) -> None:
        self.server = ServerModel(self.fed, self.cfg, self.schedule)

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed, self.TRAINS), active=active_nodes(self.cfg, t))

    def communicate(self, ctx: RoundContext) -> None:
        self.server.aggregate(ctx, self.AGGREGATES or self.plan(ctx.round).train)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds

    def state_dict(self) -> dict[str, Tensor]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
