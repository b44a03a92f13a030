"""FedAvg-LoRA (FedIT): a server averages the factors of the participating nodes.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT), ICASSP 2024;
ALGORITHMS.md §9. Each round every node trains locally, uploads (A_i, B_i, head_i), and the server sends
back

    A <- sum_i p_i A_i      B <- sum_i p_i B_i      (p_i uniform, as a complete graph with W = 11^T/n)

The mean of the factors is not the mean of the products B_i A_i (the cross-term error, §8a): the
``cross_term`` metric measures exactly that gap before each aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.model import Federation, averaged_factors


@dataclass
class FedAvg:
    fed: Federation
    name: str = "fedavg"
    single_node: bool = False

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        tensors = ctx.fed.tensors(self.plan(ctx.round).train)
        weights = ctx.online.to(torch.float32)
        means = ctx.exchange.server_mean({k: v.detach() for k, v in tensors.items()}, weights, ctx.round)
        for name, mean in means.items():  # every participant receives the server model
            rows = ctx.online.view(-1, *([1] * mean.dim()))
            tensors[name].data.copy_(torch.where(rows, mean.unsqueeze(0), tensors[name].data))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds
