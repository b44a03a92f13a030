"""FedProx: FedAvg whose local objective pulls each node towards the model it started the round from.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous Networks."
MLSys 2020. Round t, participants S (algorithms/server.py), each starting from the server model x^t:

    local:   node i minimizes F_i(theta) + mu/2 ||theta - x^t||^2     (algorithm.mu), i.e. at every
             local step  g_i <- grad F_i(theta) + mu (theta - x^t)     (before clipping)
    server:  as FedAvg (server.weighting, server.optimizer; average by default)

over every trained tensor (A, B and a trained head). mu = 0 is FedAvg exactly (a tested invariant). The
pull costs one copy of the trained tensors (the round's starting point) and sends nothing extra.

``dec_prox`` is the decentralized variant: gossip as Dec-LoRA (x_i <- sum_j W_ij x_j), the pull towards
the node's last mixed state (where its round starts); mu = 0 is Dec-LoRA exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.algorithms.server import ServerModel, active_nodes
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.schedules import Schedule


def proximal_pull(params: dict[str, Tensor], anchor: dict[str, Tensor], mu: float) -> None:
    """grad += mu (theta - anchor) for every parameter, in place: (n, ...) each."""
    for k, p in params.items():
        assert p.grad is not None  # RoundPlan.correction: each tensor has its .grad
        p.grad.add_(p.detach() - anchor[k], alpha=mu)


@dataclass
class FedProx:
    fed: Federation
    name: str = "fedprox"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    anchor: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = self.cfg.algorithm.mu
        self.server = ServerModel(self.fed, self.cfg, self.schedule)

    def plan(self, t: int) -> RoundPlan:
        """Round t's participants; remembers where every node starts (the anchor of the pull)."""
        kinds = trained_kinds(self.fed)
        self.anchor = {k: v.detach().clone() for k, v in self.fed.tensors(kinds).items()}
        return RoundPlan(train=kinds, active=active_nodes(self.cfg, t), correction=self.pull)

    def pull(self, params: dict[str, Tensor]) -> None:
        if self.mu:
            proximal_pull(params, self.anchor, self.mu)

    def communicate(self, ctx: RoundContext) -> None:
        self.server.aggregate(ctx, trained_kinds(ctx.fed))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds

    def state_dict(self) -> dict[str, Tensor]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)


@dataclass
class DecProx:
    fed: Federation
    name: str = "dec_prox"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    anchor: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = self.cfg.algorithm.mu

    def plan(self, t: int) -> RoundPlan:
        kinds = trained_kinds(self.fed)
        self.anchor = {k: v.detach().clone() for k, v in self.fed.tensors(kinds).items()}
        return RoundPlan(train=kinds, correction=self.pull)

    def pull(self, params: dict[str, Tensor]) -> None:
        if self.mu:
            proximal_pull(params, self.anchor, self.mu)

    def communicate(self, ctx: RoundContext) -> None:
        gossip_kinds(ctx, trained_kinds(ctx.fed))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
