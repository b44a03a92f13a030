"""Consensus metrics over node-stacked LoRA factors (docs/algorithms.md: conventions, cross-term).

Every adapted layer holds all n nodes' factors on a leading axis, ``A: (n, r, d_in)``, ``B: (n, d_out, r)``,
and node i's update is ``s * B[i] @ A[i]``. The metrics say how far the nodes are from agreeing:

- factor disagreement  ``(1/n) Σ_i ‖X_i − X̄‖_F²`` for X ∈ {A, B};
- product disagreement ``(1/n) Σ_i ‖s B_iA_i − mean_j s B_jA_j‖_F²``;
- cross-term norm      ``‖s mean_i(B_iA_i) − s B̄Ā‖_F = ‖(s/n) Σ_i (B_i − B̄)(A_i − Ā)‖_F`` (see cross-term);
- head disagreement    ``(1/n) Σ_i ‖H_i − H̄‖_F²`` over a classifier head's weight and bias.

Nodes with rank gates at evaluation (HetLoRA, FlexLoRA; FSLoRA's are off between rounds) run
``s B_i diag(g_i) A_i``: the metrics read those effective factors (``gated``), so nodes that run different
ranks disagree even when the stored tensors agree.

A layer's product is d_out × d_in (4096² for a 7B model) and there may be a thousand nodes, so no product is
ever formed: Frobenius norms of low-rank products go through r×r Gram matrices,
``‖U V‖_F² = Σ (UᵀU) ⊙ (V Vᵀ)``, and the node axis is walked in chunks so that memory stays
``O(chunk·r·(d_in + d_out) + chunk²·r²)`` whatever n is. Everything is accumulated in float64: the
disagreements are small differences of large quantities late in training.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "consensus_metrics",
    "gated",
    "head_disagreement",
    "cross_term_norm",
    "factor_disagreement",
    "mean_std",
    "product_disagreement",
]

# Budget for one chunk of float64 factors (bytes); keeps a 4096-wide layer with n = 1024 well under 1 GB.
_CHUNK_BYTES = 64 * 2**20
# Cap on chunk·r so that a (chunk·r)² block of the pairwise Gram stays small.
_MAX_CHUNK_ROWS = 2048


def _nodes(n: int, online: Tensor | None, device: torch.device) -> Tensor:
    """Indices of the nodes that take part: all of them, or those where ``online`` is True."""
    if online is None:
        return torch.arange(n, device=device)
    if online.shape != (n,) or online.dtype != torch.bool:
        raise ValueError(
            f"online must be a bool tensor of shape ({n},), got {online.dtype} {tuple(online.shape)}"
        )
    nodes = online.to(device).nonzero().squeeze(1)
    if nodes.numel() == 0:
        raise ValueError("online selects no node; at least one is needed")
    return nodes


def _auto_chunk(row_elems: int, rank: int) -> int:
    """How many nodes to convert to float64 at once, given a node's element count and its rank."""
    by_memory = _CHUNK_BYTES // max(1, 8 * row_elems)
    by_gram = _MAX_CHUNK_ROWS // max(1, rank)
    return max(1, min(by_memory, by_gram))


def _chunks(nodes: Tensor, chunk: int) -> Iterator[Tensor]:
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of nodes, got {chunk}")
    yield from nodes.split(chunk)


def _mean(X: Tensor, nodes: Tensor, chunk: int) -> Tensor:
    """Float64 mean over the selected nodes, accumulated chunk by chunk."""
    total = torch.zeros(X.shape[1:], dtype=torch.float64, device=X.device)
    for idx in _chunks(nodes, chunk):
        total += X[idx].detach().to(torch.float64).sum(0)
    return total / nodes.numel()


def _frob_sq(U: Tensor, V: Tensor) -> Tensor:
    """Batched ``‖U_i V_i‖_F²`` through k×k Grams, for U: (c, d_out, k), V: (c, k, d_in) -> (c,)."""
    return ((U.mT @ U) * (V @ V.mT)).sum((-2, -1))


def _rows(Bt: Tensor, At: Tensor) -> tuple[Tensor, Tensor]:
    """Rows indexed by (node, rank): (c, d_out, r), (c, r, d_in) -> (c·r, d_out), (c·r, d_in)."""
    return Bt.mT.reshape(-1, Bt.shape[1]), At.reshape(-1, At.shape[2])


def factor_disagreement(X: Tensor, *, online: Tensor | None = None, chunk: int | None = None) -> float:
    """``(1/n) Σ_i ‖X_i − X̄‖_F²`` over the leading node axis of X: (n, ...).

    The spread of one stacked factor around its mean; zero exactly when every node holds the same tensor.
    """
    nodes = _nodes(X.shape[0], online, X.device)
    chunk = chunk or _auto_chunk(X[0].numel(), 1)
    mean = _mean(X, nodes, chunk)
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for idx in _chunks(nodes, chunk):
        total += (X[idx].detach().to(torch.float64) - mean).square().sum()
    return float(total) / nodes.numel()


def _layer_stats(A: Tensor, B: Tensor, online: Tensor | None, chunk: int | None) -> tuple[float, float]:
    """Unscaled ``(1/n) Σ_i ‖B_iA_i − B̄Ā‖²`` and ``‖mean_i B_iA_i − B̄Ā‖²`` for one layer.

    Both are written in the centred factors B̃_i = B_i − B̄, Ã_i = A_i − Ā, so that every Gram entry is of
    the size of the disagreement rather than of the product itself (no cancellation of large terms):
    ``B_iA_i − B̄Ā = B̃_iA_i + B̄Ã_i = [B̃_i, B̄] [A_i; Ã_i]`` (rank 2r, per node) and
    ``mean_i B_iA_i − B̄Ā = (1/n) Σ_i B̃_iÃ_i`` (see cross-term), whose squared norm is a sum over node pairs of
    ``tr((B̃_kᵀB̃_l)(Ã_lÃ_kᵀ))``, taken block by block over the upper triangle of chunk pairs.
    """
    n, r, d_in = A.shape
    if B.shape[0] != n or B.shape[2] != r:
        raise ValueError(
            f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree on (n, r); want (n,r,d_in), (n,d_out,r)"
        )
    nodes = _nodes(n, online, A.device)
    chunk = chunk or _auto_chunk(2 * r * (d_in + B.shape[1]), 2 * r)
    A_bar, B_bar = _mean(A, nodes, chunk), _mean(B, nodes, chunk)  # (r, d_in), (d_out, r)

    def centred(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        Ac = A[idx].detach().to(torch.float64)  # (c, r, d_in)
        return Ac, B[idx].detach().to(torch.float64) - B_bar, Ac - A_bar  # A_i, B̃_i (c, d_out, r), Ã_i

    per_node = torch.zeros((), dtype=torch.float64, device=A.device)
    pair_sum = torch.zeros((), dtype=torch.float64, device=A.device)
    blocks = list(_chunks(nodes, chunk))
    for k, idx_k in enumerate(blocks):
        Ak, Bk_t, Ak_t = centred(idx_k)
        U = torch.cat([Bk_t, B_bar.expand_as(Bk_t)], dim=2)  # (c, d_out, 2r)
        V = torch.cat([Ak, Ak_t], dim=1)  # (c, 2r, d_in)
        per_node += _frob_sq(U, V).sum()
        Bk_rows, Ak_rows = _rows(Bk_t, Ak_t)  # (c·r, d_out), (c·r, d_in)
        for l in range(k, len(blocks)):
            Bl_rows, Al_rows = (Bk_rows, Ak_rows) if l == k else _rows(*centred(blocks[l])[1:])
            block = ((Bk_rows @ Bl_rows.T) * (Ak_rows @ Al_rows.T)).sum()  # Σ_{k∈K, l∈L} tr(B̃_kᵀB̃_l Ã_lÃ_kᵀ)
            pair_sum += block if l == k else 2 * block
    m = nodes.numel()
    return float(per_node) / m, max(float(pair_sum), 0.0) / m**2


def _product_disagreement_from(stats: tuple[float, float], scale: float) -> float:
    # Parallel-axis theorem with reference B̄Ā: (1/n)Σ‖P_i − P̄‖² = (1/n)Σ‖P_i − B̄Ā‖² − ‖P̄ − B̄Ā‖².
    per_node, cross_sq = stats
    return scale**2 * max(per_node - cross_sq, 0.0)


def product_disagreement(
    A: Tensor, B: Tensor, scale: float, *, online: Tensor | None = None, chunk: int | None = None
) -> float:
    """``(1/n) Σ_i ‖s B_iA_i − mean_j s B_jA_j‖_F²`` for one layer, A: (n, r, d_in), B: (n, d_out, r).

    The disagreement of the models the nodes actually run; unlike factor disagreement it is blind to
    gauge (``(BG)(G⁻¹A) = BA``, see gauge), so it is the fair yardstick across factor- and
    product-mixing methods.
    """
    return _product_disagreement_from(_layer_stats(A, B, online, chunk), scale)


def cross_term_norm(
    A: Tensor, B: Tensor, scale: float, *, online: Tensor | None = None, chunk: int | None = None
) -> float:
    """``‖s mean_i(B_iA_i) − s B̄Ā‖_F`` for one layer: what averaging the factors loses against averaging
    the products (see cross-term). Zero when either factor agrees across nodes."""
    return abs(scale) * _layer_stats(A, B, online, chunk)[1] ** 0.5


def consensus_metrics(
    factors: dict[str, tuple[Tensor, Tensor]],
    scale: float,
    online: Tensor | None = None,
    *,
    chunk: int | None = None,
) -> dict[str, float]:
    """All consensus metrics of a factor set ``{module: (A, B)}``, summed over layers.

    Returns ``consensus_A``, ``consensus_B`` (factor disagreements), ``consensus_BA`` (product
    disagreement) and ``cross_term`` (the norm of the cross-terms of the whole model, i.e. the square root
    of the summed squared per-layer norms). ``online`` (n,) bool restricts every metric to those nodes.
    """
    out = {"consensus_A": 0.0, "consensus_B": 0.0, "consensus_BA": 0.0, "cross_term": 0.0}
    cross_sq = 0.0
    for A, B in factors.values():
        out["consensus_A"] += factor_disagreement(A, online=online, chunk=chunk)
        out["consensus_B"] += factor_disagreement(B, online=online, chunk=chunk)
        stats = _layer_stats(A, B, online, chunk)
        out["consensus_BA"] += _product_disagreement_from(stats, scale)
        cross_sq += scale**2 * stats[1]
    out["cross_term"] = cross_sq**0.5
    return out


def gated(A: Tensor, B: Tensor, gate: Tensor | None) -> tuple[Tensor, Tensor]:
    """The factors the nodes run under rank gates ``gate`` (n, r): components with gate 0 are dropped
    (zero rows of A), the gate's multiplier is folded into B's columns. None: (A, B) as they are."""
    if gate is None:
        return A, B
    g = gate.to(device=A.device, dtype=A.dtype)
    return A * (g != 0).to(A.dtype).unsqueeze(-1), B * g.unsqueeze(1)  # (n, r, d_in), (n, d_out, r)


def head_disagreement(heads: dict[str, Tensor], online: Tensor | None = None) -> float:
    """``(1/n) Σ_i ‖H_i − H̄‖_F²`` summed over a head's stacked tensors (weight (n, K, h), bias (n, K))."""
    return sum(factor_disagreement(v, online=online) for v in heads.values())


def mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and population standard deviation of per-node values (ADF/TAD report mean ± std over nodes)."""
    if values.numel() == 0:
        raise ValueError("mean_std needs at least one value")
    v = values.detach().to(torch.float64).flatten()
    return float(v.mean()), float(v.std(correction=0))
