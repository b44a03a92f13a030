"""FSLoRA: each sampled device trains a random rank-k_i sketch of the server's global LoRA factors.

Fang, Han, Yuan, Hosseinalipour, Brinton. "Federated Sketching LoRA: On-Device Collaborative Fine-Tuning
of Large Language Models." arXiv 2501.19389. docs/algorithms.md: scale, optimizer state, FSLoRA details.

The server holds (A, B) of rank r = model.rank. Round t, devices S sampled (``server.participants``):

    I_i subset {1..r}, |I_i| = k_i = max(1, round(ratio_i r)), uniform without replacement, (seed, t, i)
    S_i = (r / k_i) sum_{j in I_i} e_j e_j^T                                    (E[S_i] = identity)
    device i trains W0 + s B S_i A from the server factors: the rank-k_i sub-adapter (B[:, I_i], A[I_i, :])
        with scale s r / k_i (gate (r/k_i) 1[I_i]: every other component gets zero gradient), from a
        fresh optimizer (the device optimizer is reset every round, as FSLoRA's code builds one per round)
    upload Delta_i = theta_server - theta_i on I_i: k_i (d_in + d_out) floats per module + k_i int32 indices
    g = (1/|S|) sum_{i in S} pad(Delta_i);   (A, B) <- AdamW_server((A, B), g)      (algorithm.server_lr)
    head (model.head=train): FedAvg of the devices' heads. Every node then holds the server model.

Choices [M]: one index set per device and round, shared by B's columns and A's rows (mandatory, see FSLoRA
details) and by every module (the indices travel once per round). Ratios: algorithm.sketch_ratios, else
drawn once per run from (seed, "sketch_ratios") by algorithm.sketch_dist, all on [1/8, 1/2]:
  uniform       each ratio uniform on {1/8, 1/4, 1/2} (the GLUE code [C])
  normal        N(5/16, (1/16)^2) clipped to [1/8, 1/2] (the code's mean (a+b)/2, std (b-a)/6 [C])
  heavy_tailed  x_i = exp(-Z_i), Z_i ~ N(0, 1), min-max rescaled over the nodes onto [1/8, 1/2] (the
                code's "heavy_tail_low", 1/lognormal: most devices near 1/8 [C]; a single node gets 1/8)
Download: a sampled device fetches B[:, I_i], A[I_i, :] (and the head) at the start of its round, booked
with its upload. Between rounds the gates are off and every node's rows are the server model, so
acc_node = acc_server. The released code never applies its masks; this is the paper's method.
With train.weight_decay > 0, masked coordinates may decay locally; they are neither used (gate 0) nor
sent, so the device still trains exactly its sub-adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.ranks import (
    ServedByServerFactors,
    ServerFactors,
    average_head,
    install_gate,
)
from declora.algorithms.server import participants, upload_weights, weighting
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule
from declora.seeding import numpy_rng

log = logging.getLogger(__name__)

LOW, HIGH = 1 / 8, 1 / 2


def draw_ratios(dist: str, n: int, seed: int) -> list[float]:
    """Each device's sketching ratio k_i / r, drawn once per run (see the module docstring)."""
    rng = numpy_rng(seed, "sketch_ratios")
    if dist == "uniform":
        return [float(x) for x in rng.choice([1 / 8, 1 / 4, 1 / 2], size=n)]
    if dist == "normal":
        return [float(x) for x in np.clip(rng.normal((LOW + HIGH) / 2, (HIGH - LOW) / 6, n), LOW, HIGH)]
    if dist == "heavy_tailed":
        x = np.exp(-rng.normal(0.0, 1.0, n))
        unit = (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros(n)  # onto [0, 1]
        return [float(v) for v in LOW + unit * (HIGH - LOW)]
    raise ValueError(
        f"algorithm.sketch_dist={dist!r} is not allowed; choose one of uniform, normal, heavy_tailed"
    )


def sketch_sizes(ratios: list[float], r: int) -> list[int]:
    """k_i = ratio_i * r rounded to a whole rank (at least 1); a ratio that is not a whole number of
    ranks is warned about, and the k_i go to the run's start line (``base.chosen_settings``)."""
    if not all(0 < x <= 1 for x in ratios):
        raise ValueError(f"algorithm.sketch_ratios={ratios}: every ratio must be in (0, 1]")
    sizes = [max(1, round(x * r)) for x in ratios]
    moved = [(i, x, k) for i, (x, k) in enumerate(zip(ratios, sizes, strict=True)) if k != x * r]
    if moved:
        i, x, k = moved[0]
        log.warning(
            "algorithm.sketch_ratios: %d of %d ratios are not a whole number of ranks at model.rank=%d "
            "(node %d: %g x %d = %g ranks, trains k=%d, a ratio of %g); the k_i used: %s",
            len(moved),
            len(ratios),
            r,
            i,
            x,
            r,
            x * r,
            k,
            k / r,
            sizes,
        )
    return sizes


def sketch_gate(sizes: list[int], r: int, seed: int, t: int) -> Tensor:
    """(n, r): row i = (r / k_i) 1[j in I_i] with I_i drawn from (seed, "sketch", t, i)."""
    gate = torch.zeros(len(sizes), r)
    for i, k in enumerate(sizes):
        chosen = numpy_rng(seed, "sketch", t, i).choice(r, size=k, replace=False)
        gate[i, torch.as_tensor(chosen)] = r / k
    return gate


@dataclass
class FSLoRA(ServedByServerFactors):
    fed: Federation
    name: str = "fslora"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.acfg, self.seed, n = cfg.algorithm, cfg.seed, cfg.nodes
        ratios = self.acfg.sketch_ratios or draw_ratios(self.acfg.sketch_dist, n, self.seed)
        if len(ratios) != n:
            raise ValueError(f"algorithm.sketch_ratios has {len(ratios)} entries for {n} nodes")
        self.sizes = sketch_sizes(list(ratios), self.fed.cfg.rank)  # k_i
        self.server = ServerFactors(self.fed, cfg)

    def gate(self, t: int) -> Tensor:
        return sketch_gate(self.sizes, self.fed.cfg.rank, self.seed, t)

    def plan(self, t: int) -> RoundPlan:
        """Round t's devices; installs their sketch gates for local training."""
        install_gate(self.fed, self.gate(t))
        active = participants(self.cfg, t)
        return RoundPlan(train=trained_kinds(self.fed), active=active)

    def communicate(self, ctx: RoundContext) -> None:
        t, kinds = ctx.round, trained_kinds(ctx.fed)
        senders = participants(self.cfg, t)[ctx.node_ids] & ctx.online.cpu()  # this process's rows
        self.server.step(ctx, self.gate(t)[ctx.node_ids] != 0, senders, indices=True)
        average_head(ctx, kinds, upload_weights(weighting(self.cfg), senders, ctx.data_sizes))
        self.server.broadcast(ctx.fed)
        install_gate(ctx.fed, None)
        ctx.optimizer.reset(list(ctx.fed.tensors(kinds)))  # a fresh device optimizer every round
