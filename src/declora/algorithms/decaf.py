"""DeCAF: consensus on the LoRA products, then truncated-SVD re-factorization.

Saadati, Jiang, Waite, Ganguly, Balu, Hegde, Sarkar. "DeCAF: Decentralized Consensus-And-Factorization
for Low-Rank Adaptation of Foundation Models." arXiv 2505.21382.
docs/algorithms.md: consensus interference, gauge, scale, optimizer state.

After local work node i receives its neighbours' factors (not the dense products) and sets

    M_i = sum_j W_ij B_j A_j                            (d_out x d_in, rank <= m r; never formed)
    U S V^T = TSVD_r(M_i)
    B_i <- U S^(1/2)     A_i <- S^(1/2) V^T              (svd_split="balanced", default [M])

svd_split [M] (the paper's split is not confirmed; every split gives the same B A): "left" B = U S,
A = V^T; "right" B = U, A = S V^T. A trained head is mixed factor-wise, head_i <- sum_j W_ij head_j.

TSVD without the dense matrix [M, standard]: P = [W_i1 B_1 ... W_im B_m] (d_out x m r) and
Q^T = [A_1; ...; A_m]^T (d_in x m r) over i and its neighbours; P = Q1 R1, Q^T = Q2 R2;
R1 R2^T = U' S V'^T (m r x m r); U = Q1 U', V = Q2 V'. Batched over the nodes: each node gathers its
neighbours up to m = 1 + max degree (padding has weight 0). M is formed from the unscaled factors; the
scale s stays in the forward pass (see scale). A node with no neighbour this round keeps its factors and
moments (TSVD_r of a rank-r product is itself). optimizer_policy [M]: "reset" (default) clears the A
and B moments of re-factorized nodes (their coordinates changed
gauge, see optimizer state), "keep" leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.comm.exchange import share_and_mix
from declora.config import Config
from declora.model import Federation
from declora.schedules import Schedule

SPLITS = ("balanced", "left", "right")


def neighbour_table(W: Tensor) -> tuple[Tensor, Tensor]:
    """(n, m) node indices and weights: column 0 is node i itself, then j != i with W_ij != 0, padded
    with i at weight 0; m = 1 + the largest degree."""
    n = W.shape[0]
    off = (W != 0) & ~torch.eye(n, dtype=torch.bool, device=W.device)  # (n, n)
    m = 1 + int(off.sum(1).max()) if n > 1 else 1
    order = torch.argsort(off.to(torch.int8), dim=1, descending=True, stable=True)[:, : m - 1]  # (n, m-1)
    valid = off.gather(1, order)
    me = torch.arange(n, device=W.device)[:, None]  # (n, 1)
    index = torch.cat([me, torch.where(valid, order, me)], 1)  # (n, m)
    weight = torch.cat([W.diagonal()[:, None], torch.where(valid, W.gather(1, order), 0.0)], 1)
    return index, weight


def tsvd_factors(P: Tensor, Qt: Tensor, r: int, split: str = "balanced") -> tuple[Tensor, Tensor]:
    """Rank-r factors (B (k, d_out, r), A (k, r, d_in)) of TSVD_r(P Q) for P: (k, d_out, c), Qt: (k, d_in, c),
    without forming the (k, d_out, d_in) product."""
    if split not in SPLITS:
        raise ValueError(f"algorithm.svd_split={split!r} is not allowed; choose one of {list(SPLITS)}")
    Q1, R1 = torch.linalg.qr(P)  # (k, d_out, a), (k, a, c)
    Q2, R2 = torch.linalg.qr(Qt)  # (k, d_in, b), (k, b, c)
    U, S, Vh = torch.linalg.svd(R1 @ R2.mT, full_matrices=False)  # (k, a, e), (k, e), (k, e, b)
    U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
    if S.shape[-1] < r:  # fewer than r directions exist (d < r): pad with zero singular values
        missing = r - S.shape[-1]
        U, S, Vh = F.pad(U, (0, missing)), F.pad(S, (0, missing)), F.pad(Vh, (0, 0, 0, missing))
    left, right = Q1 @ U, Vh @ Q2.mT  # (k, d_out, r), (k, r, d_in)
    # Singular vectors are unique only up to sign: fix it (largest-magnitude entry of each left vector
    # positive) so nodes holding the same product hold the same factors, and averaging them is meaningful.
    peak = left.gather(1, left.abs().argmax(1, keepdim=True))  # (k, 1, r)
    sign = torch.where(peak < 0, -1.0, 1.0).to(left.dtype)
    left, right = left * sign, right * sign.mT
    if split == "left":
        return left * S[:, None, :], right
    if split == "right":
        return left, S[:, :, None] * right
    root = S.sqrt()
    return left * root[:, None, :], root[:, :, None] * right


def product_mix(
    A: Tensor,
    B: Tensor,
    W: Tensor,
    split: str = "balanced",
    received: tuple[Tensor, Tensor] | None = None,
    nodes: Tensor | None = None,
    first: int = 0,
) -> tuple[Tensor, Tensor]:
    """Rank-r factors of TSVD_r(sum_j W_ij B_j A_j) for each node i in ``nodes`` (default: all).

    A: (n, r, d_in), B: (n, d_out, r), W: (n, n). ``received`` = (A, B) as the neighbours decode them
    (a lossy codec); node i always uses its own exact factors. Returns (A', B'): (k, r, d_in), (k, d_out, r).
    A process hosting a slice of the nodes passes its own rows as A, B (node ``first`` first) and
    ``received`` as tables over all n nodes, filled where its nodes have neighbours.
    """
    A_recv, B_recv = received if received is not None else (A, B)
    index, weight = (t.to(A.device) for t in neighbour_table(W))  # (n, m)
    if nodes is not None:
        index, weight = index[nodes.to(A.device)], weight[nodes.to(A.device)]
    dtype = torch.float32 if A.device.type == "mps" else torch.float64  # thin QRs: double is cheap
    As = torch.cat([A[index[:, :1] - first], A_recv[index[:, 1:]]], 1).to(dtype)  # (k, m, r, d_in)
    Bs = torch.cat([B[index[:, :1] - first], B_recv[index[:, 1:]]], 1).to(dtype)  # (k, m, d_out, r)
    k, m, r, d_in = As.shape
    P = (weight.to(dtype)[:, :, None, None] * Bs).permute(0, 2, 1, 3).reshape(k, -1, m * r)  # (k, d_out, mr)
    Qt = As.permute(0, 3, 1, 2).reshape(k, d_in, m * r)  # (k, d_in, m r)
    B_new, A_new = tsvd_factors(P, Qt, r, split)
    return A_new.to(A.dtype), B_new.to(B.dtype)


@dataclass
class DeCAF:
    fed: Federation
    name: str = "decaf"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        self.acfg = self.cfg.algorithm
        if self.acfg.svd_split not in SPLITS or self.acfg.optimizer_policy not in ("reset", "keep"):
            raise ValueError(
                f"decaf: svd_split={self.acfg.svd_split!r} (one of {list(SPLITS)}), "
                f"optimizer_policy={self.acfg.optimizer_policy!r} (reset or keep)"
            )

    def plan(self, t: int) -> RoundPlan:
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        gossip_kinds(ctx, tuple(k for k in self.plan(ctx.round).train if k == "head"))
        n = ctx.W.shape[0]
        linked = ((ctx.W != 0) & ~torch.eye(n, dtype=torch.bool)).any(1)  # (n,) hears a neighbour
        if not linked.any():
            return
        here = linked[ctx.node_ids]  # (n_local,) this process's rows that hear a neighbour
        nodes = ctx.node_ids[here]  # (k,) their global ids

        def mix(own: dict[str, Tensor], received: dict[str, Tensor]) -> dict[str, Tensor]:
            """Each node's new factors from its own (exact, or under node-level DP its message) and its
            neighbours' as they decode them; a node that hears no one keeps its own."""
            out = dict(own)
            if not here.any():  # all of this process's nodes are alone this round (a graph that changes)
                return out
            for name in ctx.fed.lora:
                a, b = f"{name}.lora_A", f"{name}.lora_B"
                A_new, B_new = product_mix(
                    own[a], own[b], ctx.W, self.acfg.svd_split, (received[a], received[b]), nodes, first
                )
                out[a], out[b] = own[a].clone(), own[b].clone()
                out[a][here.to(A_new.device)], out[b][here.to(B_new.device)] = A_new, B_new
            return out

        first = int(ctx.node_ids[0])
        factors = {k: v.detach() for k, v in ctx.fed.tensors(("A", "B")).items()}
        mixed = share_and_mix(ctx.exchange, factors, ctx.W, ctx.round, mix)  # bytes: what was shared
        with torch.no_grad():
            for name, layer in ctx.fed.lora.items():
                layer.A.copy_(mixed[f"{name}.lora_A"])
                layer.B.copy_(mixed[f"{name}.lora_B"])
        if self.acfg.optimizer_policy == "reset":
            ctx.optimizer.reset(list(factors), here)

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None
