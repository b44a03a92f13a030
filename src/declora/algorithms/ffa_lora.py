"""FFA-LoRA: federated LoRA with A frozen at the shared init; a server averages only B (and a head).

Sun, Li, Li, Ding. "Improving LoRA in Privacy-preserving Federated Learning." ICLR 2024.
docs/algorithms.md: cross-term, initialization.

Every node starts from the same A^0 (model.init_seed) and B^0 = 0. Each round the participants S
train B_i (and a trained head), and the server sends back

    B <- (1/|S|) sum_{i in S} B_i        head <- (1/|S|) sum_{i in S} head_i        A = A^0 forever

Exact aggregation: mean_i(B_i) A^0 = mean_i(B_i A^0), so there is no cross-term error; half the
communication of FedAvg-LoRA. The decentralized analogue is dlora_fa.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.server import ServerModel, active_nodes
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.schedules import Schedule


@dataclass
class FFALoRA:
    fed: Federation
    name: str = "ffa_lora"
    single_node: bool = False
    cfg: Config | None = None
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        self.cfg = self.cfg or Config()
        self.server = ServerModel(self.fed, self.cfg, self.schedule)

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed, ("B",)), active=active_nodes(self.cfg, t))

    def communicate(self, ctx: RoundContext) -> None:
        self.server.aggregate(ctx, self.plan(ctx.round).train)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds

    def state_dict(self) -> dict[str, Tensor]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
