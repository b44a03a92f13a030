"""The node-stacked LoRA layer: one frozen base linear, every node's factors on a leading node axis.

A batch row belongs to one node; ``NodeRouting.rows`` says which. Each row is multiplied by its own
node's factors, so one forward/backward trains every node at once, exactly as if each had its own model
copy, while the base weights exist once. Two products compute the same thing: per row (a batched matmul
over rows, each with its own gathered copy of the factors) or grouped by node (``declora.grouped``);
``NodeRouting.product`` chooses (config ``train.lora_product``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from declora.grouped import PRODUCTS, NodeGroups, auto_min_rows_per_node, grouped_product, node_groups
from declora.keyed_dropout import KeyedDropout

if TYPE_CHECKING:
    from declora.quantize import QuantizedLinear


class NodeRouting:
    """Which node each row of the current batch belongs to; shared by every stacked layer of a model.

    ``product``: auto | per_row | grouped, the LoRA product the layers use (auto: the measured rule of
    ``declora.grouped.auto_min_rows_per_node``).
    """

    def __init__(self, product: str = "auto") -> None:
        if product not in PRODUCTS:
            raise ValueError(f"train.lora_product={product!r} is not known; choose one of {list(PRODUCTS)}")
        self.product = product
        self._rows: Tensor | None = None  # (batch,) long
        self._groups: NodeGroups | None = None  # the rows grouped by node, computed on first use
        self.keys: Tensor | None = None  # (batch,) long: each row's dropout key (declora.keyed_dropout)

    @property
    def rows(self) -> Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: Tensor | None) -> None:
        self._rows, self._groups = rows, None

    def groups(self, h: Tensor) -> NodeGroups | None:
        """The current rows grouped by node if the grouped product is to be used on h (rows, seq, d_in),
        else None (per row)."""
        if self.product == "per_row" or self._rows is None:
            return None
        threshold = 0.0 if self.product == "grouped" else auto_min_rows_per_node(h)
        if threshold == math.inf:  # auto where grouping never pays: not even the grouping is computed
            return None
        if self._groups is None:  # once per micro-batch, shared by every layer
            self._groups = node_groups(self._rows)
        return self._groups if self._groups.rows_per_node >= threshold else None

    def require(self, batch: int) -> Tensor:
        if self.rows is None:
            raise RuntimeError("no node routing set: run the model inside Federation.route(node_ids)")
        if self.rows.shape[0] != batch:
            raise RuntimeError(f"routing holds {self.rows.shape[0]} rows but the batch has {batch}")
        return self.rows

    def require_keys(self, batch: int) -> Tensor:
        if self.keys is None or self.keys.shape[0] != batch:
            raise RuntimeError(
                f"LoRA dropout needs one key per row of the {batch}-row batch: train inside "
                "Federation.route(node_ids, row_keys)"
            )
        return self.keys


class RankMask:
    """Per-node gates on the rank components, shared by every stacked layer of a model.

    ``gate`` (n, r) = mask_i * multiplier_i: node i's layer computes ``s * B diag(gate_i) A x``, so a
    component with gate 0 contributes nothing and gets zero gradient in A and B (FSLoRA sketches,
    heterogeneous ranks). None (the default) means all ones, at no extra cost.
    """

    def __init__(self) -> None:
        self.gate: Tensor | None = None  # (n, r)


# Example-level DP (declora.privacy): while ``row_gradients`` is open, the trained gathers hand their per-row
# gradients here instead of summing them into ``.grad``.
_ROW_SINK: list[tuple[Tensor, Tensor, Tensor]] | None = None


@contextmanager
def row_gradients() -> Iterator[list[tuple[Tensor, Tensor, Tensor]]]:
    """Collect ``(weight, rows, grad)`` of every trained gather in a backward, grad (rows, ...): on the
    per-row product every row multiplies its own gathered copy of its node's factors (and head), so
    grad[k] is example k's own gradient. The caller adds what it wants of them to ``.grad``."""
    global _ROW_SINK
    sink: list[tuple[Tensor, Tensor, Tensor]] = []
    _ROW_SINK = sink
    try:
        yield sink
    finally:
        _ROW_SINK = None


class _GatherRows(torch.autograd.Function):
    """``weight[rows]`` whose backward adds the row gradients straight into ``weight.grad``.

    Autograd's own backward of a gather allocates a zero tensor the size of the whole node stack for
    every micro-batch and then adds it to ``.grad``: with a thousand nodes that is most of a round's
    memory traffic and the peak's growth per node. Here each micro-batch costs memory in proportion
    to its rows, not to n. The price: this gradient bypasses autograd (no tensor hooks; invisible to
    ``torch.autograd.grad``). declora's trainer only reads ``.grad``, so nothing it does changes.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.weight = weight
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        weight = ctx.weight
        if _ROW_SINK is not None:
            _ROW_SINK.append((weight, rows, grad))
            return None, None
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, rows, grad.to(weight.dtype))
        return None, None


def gather_rows(weight: Tensor, rows: Tensor) -> Tensor:
    """``weight[rows]`` for a node-stacked tensor; a trained leaf accumulates its gradient in place."""
    if weight.is_leaf and weight.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(weight, rows)
    return weight[rows]


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def per_row_product(h: Tensor, A: Tensor, B: Tensor, rows: Tensor, gate: Tensor | None) -> Tensor:
    """``B[k] diag(gate[k]) A[k] h_k`` per row: h (rows, seq, d_in), A (n, r, d_in), B (n, d_out, r),
    gate (n, r) or None, rows (rows,) the node of each row -> (rows, seq, d_out)."""
    z = torch.bmm(h, gather_rows(A, rows).transpose(1, 2))  # (rows, seq, r)
    if gate is not None:
        z = z * gate.to(z.dtype)[rows].unsqueeze(1)
    return torch.bmm(z, gather_rows(B, rows).transpose(1, 2))  # (rows, seq, d_out)


class StackedLoRALinear(nn.Module):
    """``y = base(x) + s * B[node] A[node] dropout(x)`` per row; A: (n, r, d_in), B: (n, d_out, r)."""

    def __init__(
        self,
        base: nn.Linear | QuantizedLinear,
        n: int,
        rank: int,
        scale: float,
        dropout: float,
        routing: NodeRouting,
        init_A: Tensor,
        name: str = "",
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_out, d_in = base.weight.shape
        if init_A.shape != (rank, d_in):
            raise ValueError(f"init_A has shape {tuple(init_A.shape)}, expected {(rank, d_in)}")
        # Every node starts from the same A and B = 0, so every node starts at the base model. The factors
        # are fp32 master copies whatever the base's dtype (bf16 under precision=bf16: autocast rounds them
        # per matmul, the optimizer updates them in fp32).
        self.A = nn.Parameter(init_A.float().expand(n, rank, d_in).clone())  # (n, r, d_in)
        self.B = nn.Parameter(torch.zeros(n, d_out, rank))  # (n, d_out, r)
        self.scale = scale
        self.dropout = KeyedDropout(dropout, name, routing)  # ``name`` (the layer's) salts its masks
        self.routing = routing
        # Evaluation may swap in other stacked factors (the averaged adapter, say) without touching A, B.
        self.override: tuple[Tensor, Tensor] | None = None
        self.rank_mask = RankMask()  # Federation shares one mask among all its layers
        self.R: nn.Parameter | None = None  # Fed-SB's (n, r, r) between B and A (``add_middle``); None: off

    def add_middle(self, init_B: Tensor) -> None:
        """Fed-SB: delta W = s B R A with B = init_B (d_out, r) and A shared by every node, and a trained
        per-node R (n, r, r) that starts at 0 (so every node starts at the base model)."""
        n, rank, _ = self.A.shape
        with torch.no_grad():
            self.B.copy_(init_B.float().expand_as(self.B))
        self.R = nn.Parameter(torch.zeros(n, rank, rank, device=self.A.device))  # (n, r, r)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        A, B = self.override if self.override is not None else (self.A, self.B)
        if self.R is not None and self.override is None:  # Fed-SB: R A (n, r, d_in) on both products
            A = torch.bmm(self.R, A)
        gate = self.rank_mask.gate if self.override is None else None  # an override is ungated
        rows = self.routing.require(x.shape[0])
        h = self.dropout(x).reshape(x.shape[0], -1, x.shape[-1])  # (rows, seq, d_in); 2D x: seq 1
        groups = self.routing.groups(h)
        if groups is None:
            z = per_row_product(h, A, B, rows, gate)
        else:
            present = groups.present
            gated = None if gate is None else gate.index_select(0, present)
            z = grouped_product(h, gather_rows(A, present), gather_rows(B, present), groups, gated)
        return out + (self.scale * z).reshape(out.shape)


class StackedLinear(nn.Module):
    """A per-node linear layer (the classifier head): weight (n, out, in), bias (n, out) or None."""

    def __init__(self, base: nn.Linear, n: int, routing: NodeRouting) -> None:
        super().__init__()
        weight = base.weight.detach().float()  # fp32 master copies, as the LoRA factors
        self.weight = nn.Parameter(weight.expand(n, *weight.shape).clone())
        self.bias: nn.Parameter | None = None  # a head built without one (LLaMA's score) stays without
        if base.bias is not None:
            bias = base.bias.detach().float()
            self.bias = nn.Parameter(bias.expand(n, bias.shape[0]).clone())
        self.routing = routing
        self.override: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor) -> Tensor:  # x: (rows, ..., in)
        weight, bias = self.override if self.override is not None else (self.weight, self.bias)
        rows = self.routing.require(x.shape[0])
        h = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, seq, in)
        y = torch.bmm(h, gather_rows(weight, rows).transpose(1, 2))  # (rows, seq, out)
        if bias is not None:
            y = y + gather_rows(bias, rows).unsqueeze(1)
        return y.reshape(*x.shape[:-1], weight.shape[1])
