"""K-GT: gradient tracking with local steps, the decentralized counterpart of SCAFFOLD.

Liu, Lin, Koloskova, Stich. "Decentralized Gradient Tracking with Local Steps." Optimization Methods and
Software, 2024 (arXiv 2301.01313), Algorithm 1. Per trained tensor (A, B and a trained head) node i keeps
a correction c_i, stacked on the node axis (n, ...) like the factors; all start at 0. Round t, node i
starts from x_i, its last mixed state:

    local:   z_i <- K steps (train.local_steps) on g_i(z_i) + c_i      (the correction, before clipping)
    message: d_i = (x_i - z_i) / (K lr_i)                             lr_i: the node's lr this round
    mix:     x_i <- sum_j W_ij z_j                                    (Dec-LoRA's gossip: K-GT's eta_s = 1)
    track:   c_i <- c_i + sum_j W_ij (d_j - d_i)

Under SGD d_i is the mean of g_i + c_i over the round, so c_i <- sum_j W_ij (g_j + c_j) - g_i: c_i tracks
the mean gradient minus node i's own, which is what removes the drift of heterogeneous data. For every
doubly stochastic W (offline nodes: identity rows and columns) sum_i c_i stays 0. Nodes send z_i and d_i:
twice Dec-LoRA's bytes.

Choices [M]: as SCAFFOLD here, the local steps are the run's AdamW on g + c_i and d_i is the option-II
estimate under it (the paper's steps are SGD); the sum of the c_i stays 0 and identical nodes keep c_i = 0
whatever the optimizer. The track is written as differences d_j - d_i, so that identical nodes leave
c exactly 0 and K-GT is then Dec-LoRA bit for bit (tested). d_j is the message as the neighbours decode
it, and node i subtracts its own decoded d_i: with a lossy codec the sum still stays 0. Not built: the
paper's global step eta_s != 1, and a warm start of c from one exchange of initial gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.algorithms.scaffold import mean_step
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule

PREFIX = "gt/"  # the tracking messages' names: their own codec draws, apart from the factors'


def track(c: Tensor, table: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    """c_i + sum_j W_ij (d_j - d_i) for the nodes ``rows`` (m,): c (m, ...), table (n, ...) the decoded
    messages d by global id (the rows of ``rows`` and of their neighbours are read), W (n, n).

    Summed one neighbour j at a time in ascending j, so that a process holding a slice of the nodes
    computes exactly the simulator's numbers, and d_j - d_i is exactly 0 between identical nodes."""
    off = W[rows].clone()  # (m, n), on the CPU
    off[torch.arange(len(rows)), rows] = 0  # d_i - d_i: nothing to add
    heard = off.any(0).nonzero().flatten().tolist()
    if not heard:  # nobody heard anybody (the exchange sent nothing and returned no table)
        return c
    own, out = table[rows], c.clone()  # (m, ...)
    for j in heard:
        w = off[:, j].to(c.device, c.dtype).view(-1, *([1] * (c.dim() - 1)))  # (m, 1, ...)
        out += w * (table[j] - own)
    return out


@dataclass
class DecGT:
    fed: Federation
    name: str = "dec_gt"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    start: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.steps = self.cfg.train.local_steps  # K: the same for every node (config)
        tensors = self.fed.tensors(trained_kinds(self.fed))
        self.c = {k: torch.zeros_like(v.detach()) for k, v in tensors.items()}  # (n, ...) per tensor

    def plan(self, t: int) -> RoundPlan:
        kinds = trained_kinds(self.fed)
        self.start = {k: v.detach().clone() for k, v in self.fed.tensors(kinds).items()}
        return RoundPlan(train=kinds, correction=self.correct)

    def correct(self, params: dict[str, Tensor]) -> None:
        for k, p in params.items():
            assert p.grad is not None  # RoundPlan.correction: each tensor has its .grad
            p.grad.add_(self.c[k])

    def communicate(self, ctx: RoundContext) -> None:
        kinds = trained_kinds(ctx.fed)
        d = {
            PREFIX + k: mean_step(self.start[k], z.detach(), ctx.optimizer.node_lrs(k), self.steps)
            for k, z in ctx.fed.tensors(kinds).items()
        }
        gossip_kinds(ctx, kinds)  # z_i -> sum_j W_ij z_j
        table = ctx.exchange.share(d, ctx.W, ctx.round)  # d as decoded, by global id; bytes per edge
        for k in self.c:
            self.c[k] = track(self.c[k], table[PREFIX + k], ctx.W, ctx.node_ids)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {f"c/{k}": v for k, v in self.c.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.c:
            self.c[k].copy_(state[f"c/{k}"])
