"""Weight-only quantization of the frozen base: Dec-LoRA's "quantization constraints" (a 4-bit base).

QLoRA-style, in plain torch (bitsandbytes is not needed): every ``nn.Linear`` of the frozen base becomes a
:class:`QuantizedLinear` that STORES its weight quantized and dequantizes it on the fly, in the forward
and again in the backward, on the device of its buffers (they follow ``.to(device)``: CPU or GPU) and in
the dtype of the activations (fp32; bf16 under bf16 training). The gradient with respect to the input
(what LoRA training needs) flows; the base weight never receives a gradient.

- ``int8``: one fp32 absmax scale per output row, codes ``round(w / (absmax / 127))`` in [-127, 127].
  Error per entry <= absmax / 254.
- ``nf4``: 4-bit NormalFloat (Dettmers et al., QLoRA, arXiv 2305.14314): the 16 levels are quantiles of
  N(0, 1) scaled to [-1, 1] with an exact zero; weights are cut into blocks of 64 (row-major over the
  whole matrix), each block is divided by its fp32 absmax and rounded to the nearest level, and two
  4-bit codes are packed per uint8. 0.5 byte per weight + 4 bytes per 64 weights = 0.5625 byte/weight
  (QLoRA's double quantization of the scales is not done). Error per entry <= half the widest gap
  between neighbouring levels times the block absmax.

Embeddings and layer norms stay fp32, as in QLoRA; so does the classifier head (it is trained).
``model.quant_backend`` chooses who decodes NF4: declora's torch code here, or bitsandbytes' kernel on the
same bytes (``declora.quantize_bnb``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from declora import quantize_bnb
from declora.heap import release_free_memory

log = logging.getLogger(__name__)

# The NF4 table of QLoRA / bitsandbytes (create_normal_map with offset 0.9677): 7 negative levels, an
# exact 0 and 8 positive levels, so zero-mean weights keep an exact zero.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_BLOCK = 64


def _safe(scale: Tensor) -> Tensor:
    """A divisor for ``x / scale``: an all-zero row or block (scale 0) divides by 1 and codes to 0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# ---------------------------------------------------------------- int8: per output row absmax


def quantize_int8(w: Tensor) -> dict[str, Tensor]:
    """(out, in) float -> {"codes": (out, in) int8, "scale": (out,) fp32}, scale = row absmax / 127."""
    w = w.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0  # (out,)
    codes = torch.round(w / _safe(scale)[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"codes": codes, "scale": scale}


def dequantize_int8(
    state: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32
) -> Tensor:
    return (state["codes"].to(torch.float32) * state["scale"][:, None]).to(dtype)


# ---------------------------------------------------------------- nf4: blockwise absmax, packed nibbles


def quantize_nf4(w: Tensor, block: int = NF4_BLOCK) -> dict[str, Tensor]:
    """(out, in) float -> {"packed": (ceil(m/block)*block/2,) uint8, "absmax": (blocks,) fp32}.

    The flattened weight is zero-padded to whole blocks (block is even, so codes pair up); code k of the
    flattened weight sits in byte k // 2, even k in the high nibble.
    """
    if block % 2:
        raise ValueError(f"nf4 block size must be even (two codes per byte); got {block}")
    flat = w.detach().to(torch.float32).reshape(-1)
    flat = F.pad(flat, (0, (-flat.numel()) % block)).reshape(-1, block)  # (blocks, block)
    absmax = flat.abs().amax(dim=1)  # (blocks,)
    normed = (flat / _safe(absmax)[:, None]).reshape(-1)
    # Nearest level: count the midpoints below each value (ties go up; either is within the bound).
    levels = nf4_levels(flat.device)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normed, mids).to(torch.uint8)  # (m_padded,) in 0..15
    packed = (codes[0::2] << 4) | codes[1::2]
    return {"packed": packed, "absmax": absmax}


def dequantize_nf4(state: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    packed, absmax = state["packed"], state["absmax"]
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)  # (m_padded,)
    values = nf4_levels(packed.device)[codes.long()].reshape(absmax.shape[0], -1) * absmax[:, None]
    return values.reshape(-1)[: shape.numel()].reshape(shape).to(dtype)


@functools.cache
def nf4_levels(device: torch.device) -> Tensor:
    """NF4_LEVELS on ``device``, copied there once (not at every dequantization)."""
    return NF4_LEVELS.to(device)


QUANTIZERS: dict[str, tuple[Callable[[Tensor], dict[str, Tensor]], Callable[..., Tensor]]] = {
    "int8": (quantize_int8, dequantize_int8),
    "nf4": (quantize_nf4, dequantize_nf4),
}


# ---------------------------------------------------------------- the layer


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and AGAIN in backward: only the quantized state is
    kept between the two (saving the fp32 W for backward would undo the memory saving)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantizedLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.linear(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out.matmul(ctx.layer.dequantize(grad_out.dtype)), None  # (..., out) @ (out, in)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored as ``kind`` codes (buffers, no parameters).

    Exposes ``in_features``, ``out_features`` and a read-only ``weight`` (the dequantized fp32 matrix) so
    code written for ``nn.Linear`` (StackedLoRALinear reads ``base.weight.shape`` / ``.dtype``) keeps working.
    """

    bias: Tensor | None  # a buffer (register_buffer in __init__); None when the linear layer has no bias

    def __init__(self, linear: nn.Linear, kind: str, backend: str = "declora") -> None:
        super().__init__()
        if kind not in QUANTIZERS:
            raise ValueError(f"unknown base quantization {kind!r}; choose one of {sorted(QUANTIZERS)}")
        if backend not in quantize_bnb.BACKENDS:
            raise ValueError(
                f"model.quant_backend={backend!r} is not known; choose one of {quantize_bnb.BACKENDS}"
            )
        self.kind, self.backend = kind, backend
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.shape = linear.weight.shape
        for key, value in QUANTIZERS[kind][0](linear.weight).items():
            self.register_buffer(key, value)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", bias)

    def _state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.named_buffers(recurse=False) if k != "bias" and v is not None}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out, in) in ``dtype``, rebuilt from the codes on their device; never requires grad."""
        state = self._state()
        device = next(iter(state.values())).device
        if quantize_bnb.uses_bitsandbytes(self.backend, self.kind, device):
            return quantize_bnb.dequantize_nf4(state, self.shape, dtype)
        return QUANTIZERS[self.kind][1](state, self.shape, dtype)

    def linear(self, x: Tensor) -> Tensor:
        """x W^T + b with W dequantized in the dtype of x (under autocast, F.linear casts as usual)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def nbytes(self) -> int:
        """Bytes this layer holds: codes + scales (+ the fp32 bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self)
        return self.linear(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
            f"backend={self.backend}"
        )


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def module_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def quantize_linears(
    model: nn.Module, kind: str, skip: tuple[str, ...] = (), backend: str = "declora"
) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` of ``model`` not under a ``skip`` prefix by a QuantizedLinear
    decoded by ``backend`` (model.quant_backend).

    ``kind="none"`` returns the model untouched. Logs the model's bytes before and after.
    """
    if kind == "none":
        return model
    if kind not in QUANTIZERS:
        allowed = ["none", *QUANTIZERS]
        raise ValueError(f"model.base_quantization={kind!r} is not known; choose one of {allowed}")
    before = module_nbytes(model)
    targets = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.startswith(skip)  # startswith(()) is False
    ]
    for name in targets:  # one layer at a time: its fp32 weight is freed before the next is coded
        linear = cast(nn.Linear, model.get_submodule(name))
        _replace(model, name, QuantizedLinear(linear, kind, backend))
        linear.weight = None  # type: ignore[assignment]  # a reference held elsewhere keeps no fp32 copy
        del linear
    # transformers maps the checkpoint file into memory, and the weights kept in fp32 (embeddings, norms)
    # are views of that mapping: it would keep every page read to code the layers resident for the whole
    # run. Copies of them let the mapping go.
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    release_free_memory()  # the freed pages go back to the system, or the peak RSS would keep them
    after = module_nbytes(model)
    log.info(
        "base quantized to %s (%s backend): %d linear layers, %.1f MB -> %.1f MB (embeddings, norms and "
        "head stay fp32)",
        kind,
        backend,
        len(targets),
        before / 1e6,
        after / 1e6,
    )
    return model
