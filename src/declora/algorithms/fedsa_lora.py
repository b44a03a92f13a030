"""FedSA-LoRA: the server aggregates only the A factors; every node keeps its own B (and head).

Guo, Wu, Tang, Zhao, Chen, Zhou, Hu, Ding. "Selective Aggregation for Low-Rank Adaptation in Federated
Learning." ICLR 2025. The paper finds that A learns what is common to the clients and B what is specific
to each, so round t, participants S (algorithms/server.py):

    local:   every participant trains A_i and B_i (and a trained head)
    server:  A <- sum_{i in S} p_i A_i (or any server.optimizer on the mean change), sent to every
             online node;  B_i and head_i stay on node i (personalization)

Half of FedAvg-LoRA's message (only A). There is no single server model (B differs per node): the
headline is each node's own accuracy (acc_node_mean). Choice [M]: a trained head stays local, as B.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.server import ServerModel, active_nodes
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule


@dataclass
class FedSALoRA:
    fed: Federation
    name: str = "fedsa_lora"
    single_node: bool = False
    cfg: Config | None = None
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        self.cfg = self.cfg or Config()
        self.server = ServerModel(self.fed, self.cfg, self.schedule)

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed), active=active_nodes(self.cfg, t))

    def communicate(self, ctx: RoundContext) -> None:
        self.server.aggregate(ctx, ("A",))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None  # every node runs the shared A with its own B: no one server model

    def state_dict(self) -> dict[str, Tensor]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
