"""FedAvg-LoRA (FedIT): a server averages the factors of the participating nodes.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT), ICASSP 2024;
docs/algorithms.md. Each round every node trains locally, uploads (A_i, B_i, head_i), and the server sends
back

    A <- sum_i p_i A_i      B <- sum_i p_i B_i      (p_i uniform, as a complete graph with W = 11^T/n)

The mean of the factors is not the mean of the products B_i A_i (the cross-term error, see cross-term): the
``cross_term`` metric measures exactly that gap before each aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import server_average
from declora.model import Federation, averaged_factors


@dataclass
class FedAvg:
    fed: Federation
    name: str = "fedavg"
    single_node: bool = False
    cfg: object = None  # the run's Config and schedule: every algorithm is built with them; unused here
    schedule: object = None

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        server_average(ctx, self.plan(ctx.round).train)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds
