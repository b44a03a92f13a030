"""FLoRA: the server stacks the clients' (heterogeneous-rank) adapters; every node merges the stack into
its base and starts the next round from a fresh adapter.

Wang, Shen, Ye, Bhuyan, Liu, Jiang, Hu. "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations." NeurIPS 2024. Node i has rank r_i = algorithm.ranks[i] (the first r_i
components, gate G_i; default model.rank everywhere). Round t, participants S with weights p_i:

    upload   (B_i G_i, A_i): r_i (d_in + d_out) floats per module
    stack    A_s = [A_1; ...; A_m] (sum r_i, d_in),   B_s = [p_1 B_1 G_1, ..., p_m B_m G_m] (d_out, sum r_i)
             so that B_s A_s = sum_{i in S} p_i B_i G_i A_i exactly (no cross-term: a tested invariant)
    download the stack: sum_{j in S} r_j (d_in + d_out) floats per module, to every online node
    merge    W0 <- W0 + s B_s A_s;  then A <- a fresh draw of the PEFT init from (model.init_seed, t,
             module) (the same on every node), B <- 0, device optimizer reset
    head (model.head=train): FedAvg with the same p_i
    robust.aggregator: where the rule cuts, its product is folded in place of the stack's, sent dense
             (robust_uploads)

Every node merges the same stack, so the shared frozen base takes it once (``fedex_lora.BaseFolds``: its
weights are the checkpointed state; the factors alone do not reproduce the model, so no PEFT export).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.fedex_lora import BaseFolds
from declora.algorithms.ranks import (
    active_components,
    average_head,
    factor_messages,
    first_components,
    install_gate,
    node_ranks,
    round_start,
)
from declora.algorithms.server import Rejoin, active_nodes, upload_shares, weighting
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.robust_uploads import krum_weights, product_aggregate
from declora.schedules import Schedule
from declora.seeding import torch_generator


def stack_adapters(A: Tensor, B: Tensor, gate: Tensor | None, p: Tensor) -> tuple[Tensor, Tensor]:
    """(A_s (k, d_in), B_s (d_out, k)), k = sum of the participants' ranks, with B_s A_s =
    sum_i p_i B_i G_i A_i; A: (n, r, d_in), B: (n, d_out, r), gate: (n, r) or None, p: (n,), 0 = absent."""
    keep = torch.ones(A.shape[:2], dtype=torch.bool) if gate is None else gate.cpu() != 0  # (n, r)
    g = torch.ones(A.shape[:2]) if gate is None else gate.cpu().float()
    rows, cols = [], []
    for i in (p > 0).nonzero().flatten().tolist():
        idx = keep[i].nonzero().flatten().to(A.device)
        rows.append(A[i].index_select(0, idx))  # (r_i, d_in)
        scaled = B[i] * (p[i] * g[i]).to(B.device, B.dtype)[None, :]  # p_i B_i G_i
        cols.append(scaled.index_select(1, idx))  # (d_out, r_i)
    return torch.cat(rows), torch.cat(cols, dim=1)


@dataclass
class FLoRA:
    fed: Federation
    name: str = "flora"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    start: dict[str, Tensor] | None = None  # the round's starting factors, for node-level DP (round_start)

    def __post_init__(self) -> None:
        self.ranks = node_ranks(self.cfg.algorithm.ranks, self.cfg.nodes, self.fed.cfg.rank)
        self.gate = first_components(self.ranks, self.fed.cfg.rank)
        install_gate(self.fed, self.gate)
        self.weighting = weighting(self.cfg)
        self.folds = BaseFolds(self.fed)
        self.rejoin = Rejoin(self.fed.n)

    def plan(self, t: int) -> RoundPlan:
        self.start = round_start(self.fed, self.cfg)
        return RoundPlan(train=trained_kinds(self.fed), active=active_nodes(self.cfg, t))

    def communicate(self, ctx: RoundContext) -> None:
        fed, online = ctx.fed, ctx.online.cpu()
        shares = upload_shares(self.cfg, self.weighting, ctx)
        if shares is None:
            return
        senders, p = shares  # this process's uploading rows; (n,) shares over every node
        keep = active_components(fed, self.gate)
        messages = factor_messages(fed)  # a FLoRA node starts from a fresh seeded adapter: nothing fetched
        table = ctx.exchange.upload_masked(
            messages, keep, senders, ctx.round, False, self.start, fetched=False
        )
        head_p = p  # the head is its own upload, aggregated by the exchange's rule (Krum's own pick)
        if self.cfg.robust.aggregator == "krum":  # equal ranks only (config): the chosen node's adapter
            p = krum_weights(table, p, self.cfg.robust.krum_f)
        stacked_rank = sum(k for k, w in zip(self.ranks, p.tolist(), strict=True) if w > 0)
        # every node, an offline one too, merges the stack into the base it shares and restarts: one that
        # was offline fetches what it missed when it comes back, as one dense sum per layer (and the head)
        head = sum(v[0].numel() * 4 for v in fed.tensors(("head",)).values())
        self.rejoin.broadcast(ctx, {"model": self.folds.dense_bytes() + head})
        for name, layer in fed.lora.items():
            A, B = table[f"{name}.lora_A"], table[f"{name}.lora_B"]
            A_s, B_s = stack_adapters(A, B, self.gate, p)
            stacked = B_s @ A_s  # sum_i p_i B_i G_i A_i
            d_out, d_in = B_s.shape[0], A_s.shape[1]
            ctx.exchange.ledger.add_server(int(online.sum()), 4 * stacked_rank * (d_in + d_out))
            robust = None  # a robust rule's product (robust_uploads) where it cuts anything, sent dense
            if self.cfg.robust.aggregator not in ("mean", "krum"):
                robust = product_aggregate(self.cfg.robust, A, B, self.gate, p, stacked)
            if robust is not None:
                ctx.exchange.ledger.add_server(int(online.sum()), 4 * d_out * d_in)
            self.folds.add(name, fed.scale * (stacked if robust is None else robust))
            fresh = init_A(self.cfg.model.init_seed, ctx.round, name, layer.A.shape[1:])
            with torch.no_grad():
                layer.A.copy_(fresh.to(layer.A).expand_as(layer.A))
                layer.B.zero_()
        average_head(ctx, trained_kinds(fed), head_p[ctx.node_ids])
        ctx.optimizer.reset(list(fed.tensors(trained_kinds(fed))))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # every node: the merged base and a fresh adapter

    def state_dict(self) -> dict[str, Tensor]:
        return self.folds.state_dict() | self.rejoin.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.folds.load_state_dict(state)
        self.rejoin.load_state_dict(state)


def init_A(seed: int, t: int, name: str, shape: torch.Size) -> Tensor:
    """PEFT's lora_A init, U(-1/sqrt(d_in), 1/sqrt(d_in)), drawn from (seed, "flora", t, module)."""
    bound = 1 / shape[1] ** 0.5
    g = torch_generator(seed, "flora", t, name)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound
