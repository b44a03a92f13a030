"""FlexLoRA: heterogeneous ranks; the server averages the LoRA products and re-factorizes them by SVD.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources." NeurIPS 2024. docs/algorithms.md: gauge, scale, optimizer state.

Node i has rank r_i = algorithm.ranks[i] (gate 1[j < r_i], fixed; r_max = model.rank). Round t, sampled
nodes S (``server.participants``), after local training (train.lr):

    upload (B_i[:, :r_i], A_i[:r_i, :]): r_i (d_in + d_out) floats per module
    M = sum_{i in S} p_i B_i G_i A_i     p_i = n_i / sum_{j in S} n_j (flex_weights=data_size, default)
                                         or 1/|S| (flex_weights=uniform; server.weighting overrides it);
                                         G_i = diag(gate_i)
    U Sigma V^T = TSVD_{r_max}(M)       via decaf.tsvd_factors on P = [p_1 B_1 G_1 ... ], Q = [A_1; ...]
                                         (QR of both, SVD of the small core: never the dense M)
    every node: B = U Sigma, A = V^T;  its gate keeps the first r_i, so B G_i A = TSVD_{r_i}(M):
                node i receives B_i = U[:, :r_i] Sigma[:r_i], A_i = V[:, :r_i]^T
    head (model.head=train): FedAvg with the same p_i
    robust.aggregator: M is the rule's aggregate of the dense products B_i G_i A_i (declora.robust_uploads)

With a server optimizer other than average (server.optimizer), the server keeps the dense product W
(d_out, d_in) per module and moves it by its rule on Delta = M - W, then sends the factors of TSVD_r(W):
d_out d_in floats (times 1 to 3 with the optimizer's moments) per module on the server, never on a node.

Scale (see scale): M is formed from the unscaled factors and the run's one scale s stays in the forward, so
node i's s B G_i A is the rank-r_i truncation of the weighted mean of the s B_j G_j A_j, exactly. (The
FSLoRA reimplementation rescales by sqrt(r_i) because its clients carry their own rsLoRA scales
alpha/sqrt(r_i) [C]; nodes here share s [M].) Device optimizer: algorithm.optimizer_policy, reset
(default: the SVD changes the factors' gauge, see optimizer state) or keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.decaf import tsvd_factors
from declora.algorithms.ranks import (
    active_components,
    average_head,
    factor_messages,
    first_components,
    install_gate,
    node_ranks,
    round_start,
)
from declora.algorithms.server import participants, upload_shares, weighting
from declora.config import Config
from declora.model import Federation, averaged_factors
from declora.robust_uploads import krum_weights, mean_product, product_aggregate
from declora.schedules import Schedule
from declora.server_opt import build_server_optimizer


def flex_aggregate(A: Tensor, B: Tensor, gate: Tensor | None, p: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A', B'): (r, d_in), (d_out, r) with B' A' = TSVD_r(sum_i p_i B_i G_i A_i); A: (n, r, d_in),
    B: (n, d_out, r), gate: (n, r) or None, p: (n,) with 0 for nodes that did not take part."""
    take = (p > 0).nonzero().flatten().to(A.device)
    dtype = torch.float32 if A.device.type == "mps" else torch.float64
    A_s, B_s = A[take].to(dtype), B[take].to(dtype)  # (m, r, d_in), (m, d_out, r)
    if gate is not None:
        B_s = B_s * gate.to(A.device, dtype)[take][:, None, :]
    m, d_out, d_in = len(take), B.shape[1], A.shape[2]
    P = (p.to(A.device, dtype)[take][:, None, None] * B_s).permute(1, 0, 2).reshape(1, d_out, -1)
    Qt = A_s.permute(2, 0, 1).reshape(1, d_in, m * A.shape[1])  # (1, d_in, m r)
    B_new, A_new = tsvd_factors(P, Qt, r, split="left")  # B = U Sigma, A = V^T
    return A_new[0].to(A.dtype), B_new[0].to(B.dtype)


@dataclass
class FlexLoRA:
    fed: Federation
    name: str = "flexlora"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    start: dict[str, Tensor] | None = None  # the round's starting factors, for node-level DP (round_start)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.acfg, self.seed = cfg.algorithm, cfg.seed
        weights, policy = self.acfg.flex_weights, self.acfg.optimizer_policy
        if weights not in ("data_size", "uniform") or policy not in ("reset", "keep"):
            raise ValueError(
                f"flexlora: flex_weights={weights!r} (data_size or uniform), "
                f"optimizer_policy={policy!r} (reset or keep)"
            )
        self.ranks = node_ranks(self.acfg.ranks, cfg.nodes, self.fed.cfg.rank)
        self.gate = first_components(self.ranks, self.fed.cfg.rank)
        install_gate(self.fed, self.gate)
        self.weighting = weighting(cfg, "size" if weights == "data_size" else "uniform")
        self.opt = build_server_optimizer(cfg)
        # Any other server rule moves the dense server product W (d_out, d_in) per module (see above).
        dense = self.opt.rule != "average"
        self.server_product = {
            k: (v.B[0] @ v.A[0]).detach().clone() for k, v in self.fed.lora.items() if dense
        }

    def server_step(
        self, name: str, A: Tensor, B: Tensor, p: Tensor, M: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """W <- rule(W, M - W) with M = sum_i p_i B_i G_i A_i (or the dense product the caller already
        has: a robust rule's); the factors of TSVD_r(W): (A', B'). Under ``average`` W is M itself."""
        M = mean_product(A, B, self.gate, p) if M is None else M.to(A.dtype)  # (d_out, d_in)
        if self.opt.rule != "average":
            self.opt.step(self.server_product, {name: M - self.server_product[name]})
            M = self.server_product[name]
        eye = torch.eye(A.shape[2], dtype=torch.float64, device=A.device)[None]
        B_new, A_new = tsvd_factors(M.double()[None], eye, self.fed.cfg.rank, split="left")
        return A_new[0].to(A.dtype), B_new[0].to(B.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"server/{k}": v for k, v in self.server_product.items()}
        return state | {f"server_opt/{k}": v for k, v in self.opt.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in self.server_product.items():
            v.copy_(state[f"server/{k}"])
        n = len("server_opt/")
        self.opt.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith("server_opt/")})

    def plan(self, t: int) -> RoundPlan:
        self.start = round_start(self.fed, self.cfg)
        active = participants(self.cfg, t)
        return RoundPlan(train=trained_kinds(self.fed), active=active)

    def communicate(self, ctx: RoundContext) -> None:
        fed, kinds = ctx.fed, trained_kinds(ctx.fed)
        shares = upload_shares(self.cfg, self.weighting, ctx)
        if shares is None:
            return
        senders, p = shares  # this process's uploading rows; (n,) shares over every node
        keep = active_components(fed, self.gate)
        received = ctx.exchange.upload_masked(
            factor_messages(fed), keep, senders, ctx.round, False, self.start
        )
        head_p = p  # the head is its own upload, aggregated by the exchange's rule (Krum's own pick)
        if self.cfg.robust.aggregator == "krum":  # equal ranks only (config): the chosen node's product
            p = krum_weights(received, p, self.cfg.robust.krum_f)
        for name, layer in fed.lora.items():
            A, B = received[f"{name}.lora_A"], received[f"{name}.lora_B"]
            # a robust rule's dense products (robust_uploads): the mean M, and the rule's where it cuts
            M = cut = None
            if self.cfg.robust.aggregator not in ("mean", "krum"):
                M = mean_product(A, B, self.gate, p)
                cut = product_aggregate(self.cfg.robust, A, B, self.gate, p, M)
            if self.opt.rule == "average" and cut is None:  # never the dense product
                A_new, B_new = flex_aggregate(A, B, self.gate, p, fed.cfg.rank)
            else:
                A_new, B_new = self.server_step(name, A, B, p, M if cut is None else cut)
            with torch.no_grad():
                layer.A.copy_(A_new.expand_as(layer.A))
                layer.B.copy_(B_new.expand_as(layer.B))
        average_head(ctx, kinds, head_p[ctx.node_ids])
        if self.acfg.optimizer_policy == "reset":
            ctx.optimizer.reset(list(fed.tensors(kinds)))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # after aggregation: every node holds the server's factors
