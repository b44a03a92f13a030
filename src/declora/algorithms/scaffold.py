"""SCAFFOLD: FedAvg with control variates that correct each node's drift towards its own data.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning." ICML 2020 (option II). Per trained tensor the server keeps c (1, ...) and node i keeps c_i,
stacked on the node axis (n, ...); all start at 0. Round t, participants S from the server model x:

    local:   K steps (train.local_steps) on g_i(y) - c_i + c       (the correction, before clipping)
    node:    c_i+ = c_i - c + (x - y_i) / (K lr_i)                  lr_i: the node's lr this round
    upload:  y_i (FedAvg's message) and Delta c_i = c_i+ - c_i: twice FedAvg's upload and download
    server:  x as FedAvg (server.weighting, server.optimizer);   c <- c + (1/N) sum_{i in S} Delta c_i

Choice [M]: the paper's local steps are SGD; here they are the run's AdamW, and (x - y_i)/(K lr_i) is
option II's estimate of node i's mean gradient under it. With zero variates (round 0) SCAFFOLD is FedAvg
exactly (a tested invariant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.server import ServerModel, active_nodes, book_downloads
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.schedules import Schedule

VARIATE = "control_variate/"  # the name prefix of the uploaded Delta c_i


def mean_step(start: Tensor, end: Tensor, lr: Tensor, steps: int) -> Tensor:
    """(start - end) / (K lr_i): the mean step of node i's K local steps in gradient units.

    start, end: (n, ...) the trained tensor before and after the local steps; lr: (n,) each node's lr.
    Under SGD it is the mean of the (corrected) gradients the node stepped on.
    """
    lr = lr.to(end.device, end.dtype).view(-1, *([1] * (end.dim() - 1)))
    return (start - end) / (steps * lr)


@dataclass
class Scaffold:
    fed: Federation
    name: str = "scaffold"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    start: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = ServerModel(self.fed, self.cfg, self.schedule)
        tensors = self.fed.tensors(trained_kinds(self.fed))
        self.c_i = {k: torch.zeros_like(v.detach()) for k, v in tensors.items()}  # (n, ...)
        self.c = {k: torch.zeros_like(v.detach()[:1]) for k, v in tensors.items()}  # (1, ...)

    def plan(self, t: int) -> RoundPlan:
        kinds = trained_kinds(self.fed)
        self.start = {k: v.detach().clone() for k, v in self.fed.tensors(kinds).items()}
        return RoundPlan(train=kinds, active=active_nodes(self.cfg, t), correction=self.correct)

    def correct(self, params: dict[str, Tensor]) -> None:
        for k, p in params.items():
            assert p.grad is not None  # RoundPlan.correction: each tensor has its .grad
            p.grad.add_(self.c[k] - self.c_i[k])

    def communicate(self, ctx: RoundContext) -> None:
        senders, count = self.server.senders(ctx)
        if count == 0:
            return
        tensors = ctx.fed.tensors(trained_kinds(ctx.fed))
        steps = self.cfg.train.local_steps
        delta: dict[str, Tensor] = {}
        for k, y in tensors.items():
            lr = ctx.optimizer.node_lrs(k)  # (n,)
            fresh = self.c_i[k] - self.c[k] + mean_step(self.start[k], y.detach(), lr, steps)
            rows = senders.to(y.device).view(-1, *([1] * (y.dim() - 1)))
            delta[k] = torch.where(rows, fresh - self.c_i[k], torch.zeros_like(fresh))
            self.c_i[k] = torch.where(rows, fresh, self.c_i[k])
        variates = sum(c.numel() * c.element_size() for c in self.c.values())  # a returning node needs c too
        self.server.aggregate(ctx, trained_kinds(ctx.fed), also=variates)
        # A message of its own (its own codec draws, DP noise and reference): named apart from the factors
        sent = {VARIATE + k: d for k, d in delta.items()}
        mean = ctx.exchange.server_mean(sent, senders.float(), ctx.round)  # (1/|S|) sum_S Delta c_i
        book_downloads(ctx, ctx.online.cpu(), senders, sent)
        for k in self.c:
            self.c[k] += (count / self.cfg.nodes) * mean[VARIATE + k].unsqueeze(0)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: what every participant holds

    def state_dict(self) -> dict[str, Tensor]:
        variates = {f"c/{k}": v for k, v in self.c.items()} | {f"c_i/{k}": v for k, v in self.c_i.items()}
        return self.server.state_dict() | variates

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
        for k in self.c:
            self.c[k].copy_(state[f"c/{k}"])
            self.c_i[k].copy_(state[f"c_i/{k}"])
