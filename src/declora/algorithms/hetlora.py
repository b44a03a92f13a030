"""HetLoRA: heterogeneous client ranks by zero padding, with a server AdamW (as FSLoRA reimplements it).

Cho, Liu, Bai, Joshi, et al. "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models." EMNLP 2024. docs/algorithms.md: scale.

Global rank r_max = model.rank; node i has rank r_i = algorithm.ranks[i] and uses the first r_i
components (gate 1[j < r_i], fixed for the run). Round t, sampled nodes S (``server.participants``):

    device i trains (B[:, :r_i], A[:r_i, :]) starting from the server factors
    upload Delta_i = theta_server - theta_i on its first r_i components: r_i (d_in + d_out) floats per
        module (no indices: r_i is fixed)
    g = (1/|S|) sum_{i in S} pad(Delta_i);   (A, B) <- AdamW_server((A, B), g)      (algorithm.server_lr)
    head (model.head=train): FedAvg of the nodes' heads; the server model goes to every node

Choices [C]/[M]: the mean of zero-padded deltas (not of the factors) with divisor |S| (no per-component
count normalization), as the reimplementation; no rank self-pruning and no sparsity-weighted aggregation
(the original paper's additions); one scale s for every node (alpha/r_max, or alpha/sqrt(r_max) with
rsLoRA), so node i's adapter is exactly the truncation of the global one (the reimplementation builds
each client's PEFT adapter with its own alpha/sqrt(r_i) [C]; not modelled). Device optimizer:
algorithm.optimizer_policy, reset (default: fresh every round, as the reimplementation) or keep.
A node's export (``model.node_adapter``) is its rank-r_i adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.ranks import (
    ServedByServerFactors,
    ServerFactors,
    active_components,
    average_head,
    first_components,
    install_gate,
    node_ranks,
)
from declora.algorithms.server import participants, upload_weights, weighting
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule


@dataclass
class HetLoRA(ServedByServerFactors):
    fed: Federation
    name: str = "hetlora"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.acfg, self.seed = cfg.algorithm, cfg.seed
        if self.acfg.optimizer_policy not in ("reset", "keep"):
            raise ValueError(f"hetlora: optimizer_policy={self.acfg.optimizer_policy!r} (reset or keep)")
        self.ranks = node_ranks(self.acfg.ranks, cfg.nodes, self.fed.cfg.rank)
        self.gate = first_components(self.ranks, self.fed.cfg.rank)
        install_gate(self.fed, self.gate)
        self.server = ServerFactors(self.fed, cfg)

    def plan(self, t: int) -> RoundPlan:
        active = participants(self.cfg, t)
        return RoundPlan(train=trained_kinds(self.fed), active=active)

    def communicate(self, ctx: RoundContext) -> None:
        kinds = trained_kinds(ctx.fed)
        senders = participants(self.cfg, ctx.round)[ctx.node_ids] & ctx.online.cpu()  # local rows
        self.server.step(ctx, active_components(ctx.fed, self.gate), senders, indices=False)
        average_head(ctx, kinds, upload_weights(weighting(self.cfg), senders, ctx.data_sizes))
        self.server.broadcast(ctx.fed)
        if self.acfg.optimizer_policy == "reset":
            ctx.optimizer.reset(list(ctx.fed.tensors(kinds)))
