"""The node-grouped LoRA product: each node's rows multiplied by its own factors once.

The per-row product (``lora.per_row_product``) gathers one copy of A and B for every batch row and runs a
batched matmul over rows: right for a CPU micro-batch of a few rows from as many nodes, wasteful when
one node owns many rows (large GPU micro-batches). Here the rows are ordered by node once per
micro-batch (:class:`NodeGroups`, cached on the routing and shared by every layer), the tokens of each
node form one contiguous segment, and each segment is multiplied by its node's factors once: a grouped
matrix product over the segments (``torch.nn.functional.grouped_mm`` with offsets where the installed
torch supports the device, dtype and shapes, else a loop over the segments that computes the same).

Only the nodes that own rows in the micro-batch take part: their factors are gathered (m, r, d_in), so
gradients and temporaries scale with the nodes present, never with the whole node stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PRODUCTS = ("auto", "per_row", "grouped")

# The auto rule, measured on the CPU by benchmarks/grouped_product.py (results/grouped_product.md: one
# MiniLM-shaped 384x384 layer, rank 8, fp32, torch 2.13, 1 thread; 8 and 64 nodes, 1 to 32 rows per
# node, 1 to 128 tokens per row). Per row, the product gathers rank x (d_in + d_out) factor entries per
# row; grouped, it permutes seq x (d_in + d_out) activation entries per row instead, and shares each
# node's factors among its rows. So grouping pays when rows are short and nodes own many: with at most
# 8 tokens per row and at least 8 rows per node it took 1.07x to 3.6x less CPU time at every measured
# point; at 16 tokens per row the ratio was 0.63x to 1.09x, from 32 on the per-row product was ~10%
# faster, and with fewer than 8 rows per node grouping was not reliably faster. Transformer layers see
# whole sequences (16+ tokens), so on the CPU auto keeps today's per-row product there.
# device type -> (most tokens per row, fewest rows per node) for which auto groups. Other devices use the
# CPU's rule. On an H200 in bf16 (benchmarks/results/gpu.md: rows of ~30 and ~128 tokens, 64 and 256
# nodes) the per-row product was 7% to 73% faster than the grouped one at every point, as this rule
# expects; short rows have not been measured there (``benchmarks/grouped_product.py --device cuda``).
AUTO_GROUPED: dict[str, tuple[int, int]] = {"cpu": (8, 8)}


@dataclass(frozen=True)
class NodeGroups:
    """The rows of one micro-batch ordered by node: computed once, used by every layer."""

    order: Tensor  # (rows,) long: row indices sorted by node (stable)
    inverse: Tensor | None  # (rows,) long: where each row went in ``order``; None if already sorted
    present: Tensor  # (m,) long: the nodes that own rows, ascending
    counts: Tensor  # (m,) long: rows of each present node
    sizes: tuple[int, ...]  # the same counts on the host (the segment loop splits by them)

    @property
    def rows_per_node(self) -> float:
        return self.order.shape[0] / max(len(self.sizes), 1)


def node_groups(rows: Tensor) -> NodeGroups:
    """Group a micro-batch's rows (rows,) by node."""
    order = torch.argsort(rows, stable=True)  # (rows,)
    present, counts = torch.unique_consecutive(rows[order], return_counts=True)  # (m,), (m,)
    identity = torch.arange(rows.shape[0], device=rows.device)
    inverse = None if torch.equal(order, identity) else torch.empty_like(order).scatter_(0, order, identity)
    return NodeGroups(order, inverse, present, counts, tuple(counts.tolist()))


def auto_min_rows_per_node(h: Tensor) -> float:
    """The auto rule for input h (rows, seq, d_in): group once the present nodes own this many rows on
    average; inf where auto never groups (rows too long; no grouped_mm kernel: the segment loop
    launches one product per node)."""
    max_seq, min_rows = AUTO_GROUPED.get(h.device.type, AUTO_GROUPED["cpu"])
    if h.shape[1] > max_seq or not _grouped_mm_works(h.device, _compute_dtype(h)):
        return math.inf
    if h.device.type == "cuda" and _compute_dtype(h) != torch.bfloat16:
        return math.inf  # torch's CUDA grouped_mm is a kernel in bf16 only; otherwise a loop of matmuls
    return min_rows


# ---------------------------------------------------------------- the grouped matmul


_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's grouped_mm runs forward AND backward on (device type, dtype): probed once.

    torch 2.13 runs fp32 and bf16 on the CPU; older CUDA builds accept only bf16 on recent GPUs.
    """
    key = (device.type, dtype)
    if key not in _SUPPORT:
        _SUPPORT[key] = False
        if hasattr(F, "grouped_mm"):
            # The first product may run in an evaluation (no_grad, inference_mode): the probe needs grad.
            with torch.inference_mode(False), torch.enable_grad():
                _SUPPORT[key] = _probe_grouped_mm(device, dtype)
    return _SUPPORT[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
        y = F.grouped_mm(x, w.transpose(1, 2), offs=offs)
        y.backward(torch.ones_like(y))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    assert w.grad is not None  # set by the backward above
    # Each output is 16; weight g's gradient is its segment's row count (3, then 5) everywhere.
    return bool((y == 16).all() and (w.grad[0] == 3).all() and (w.grad[1] == 5).all())


def _compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's where it is on (bf16 training), else the input's."""
    kind = h.device.type
    on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    return torch.get_autocast_dtype(kind) if on else h.dtype


# torch's CUDA grouped_mm refuses 1024 groups or more (one thread per group in its set-up kernel); the probe
# uses two, so the limit is kept here: a micro-batch with more nodes takes the segment loop.
MAX_KERNEL_GROUPS = 1024


def _aligned(*dims: int, itemsize: int) -> bool:
    # grouped_mm kernels need 16-byte aligned rows (and data: checked by the caller).
    return all(d * itemsize % 16 == 0 for d in dims)


def grouped_linear(x: Tensor, weight: Tensor, offs: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Segment g of x (T, d_in) times weight[g]^T (m, d_out, d_in) -> (T, d_out).

    ``offs`` (m,) int32 are the segments' ends, ``sizes`` their lengths on the host (same segments).
    """
    d_out, d_in = weight.shape[1:]
    fits = _aligned(d_in, d_out, itemsize=x.element_size()) and x.is_contiguous() and x.data_ptr() % 16 == 0
    fits = fits and len(sizes) < MAX_KERNEL_GROUPS
    if fits and _grouped_mm_works(x.device, x.dtype):
        y = F.grouped_mm(x, weight.transpose(1, 2), offs=offs)  # (T, d_out)
        if y.requires_grad:  # its backward rejects stride-0 gradients (the gradient of a sum, say)
            y.register_hook(lambda g: g.contiguous())
        return y
    segments = [seg @ w.T for seg, w in zip(x.split(sizes), weight, strict=True)]  # (T_g, d_out) each
    return torch.cat(segments) if segments else x.new_zeros(0, d_out)


def grouped_product(h: Tensor, A: Tensor, B: Tensor, groups: NodeGroups, gate: Tensor | None) -> Tensor:
    """``B[g] diag(gate[g]) A[g] h`` for every row of node g, one product per node.

    h (rows, seq, d_in) in the batch's row order; A (m, r, d_in), B (m, d_out, r) and gate (m, r) are
    the present nodes' (``groups.present``) in ascending node order. Returns (rows, seq, d_out) in the
    batch's row order.
    """
    rows, seq, d_in = h.shape
    if gate is not None:  # a gated component contributes nothing and gets zero gradient, as per row
        A = A * gate.to(A.dtype).unsqueeze(-1)  # (m, r, d_in)
    dtype = _compute_dtype(h)  # grouped_mm has no autocast rule: cast as autocast casts bmm
    h, A, B = h.to(dtype), A.to(dtype), B.to(dtype)
    if groups.inverse is not None:
        h = h.index_select(0, groups.order)
    tokens = h.reshape(rows * seq, d_in)  # (T, d_in): node segments end to end
    sizes = tuple(c * seq for c in groups.sizes)
    offs = torch.cumsum(groups.counts * seq, 0).to(torch.int32)  # (m,)
    z = grouped_linear(tokens, A, offs, sizes)  # (T, r)
    y = grouped_linear(z, B, offs, sizes).reshape(rows, seq, -1)  # (rows, seq, d_out)
    return y if groups.inverse is None else y.index_select(0, groups.inverse)
