"""Message codecs: what a node actually sends, and exactly how many bytes it costs.

Messages are stacked over a leading node axis, ``(n, ...)``: one message per node. A codec encodes every
node at once (vectorized, no loop over nodes) into an :class:`Encoded` whose tensors ARE the wire format, so
the byte count is read off the payload instead of a formula that could drift from it. Receivers mix the
DECODED tensors.

- ``fp32``, ``fp16``, ``bf16``: casts; 4, 2, 2 bytes per entry.
- ``quantize``: unbiased stochastic rounding onto the asymmetric grid ``lo + j * scale / (2^b - 1)``,
  ``j = 0 .. 2^b - 1``, where ``lo = min`` and ``scale = max - min`` of each row (``block_size=None``) or of
  each block of ``block_size`` entries of a node's whole flattened message. Codes are bit-packed per node
  message (``ceil(m * b / 8)`` bytes for ``m`` entries). ``lo`` and ``scale`` travel as fp32, 8 bytes per
  block: the decoder then uses exactly the grid the encoder rounded onto, which is what keeps it unbiased.
- ``topk``: the ``k = ceil(fraction * m)`` largest-magnitude entries per node message, as values (fp32 or
  fp16) plus int32 indices; optional error feedback keeps what was not sent, per tensor name, and adds it
  to the next message.

Randomness comes only from the ``generator`` passed in (derive it from ``(seed, round, purpose)``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CODECS", "CastCodec", "Codec", "Encoded", "QuantizeCodec", "TopKCodec", "build_codec"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a codec draws from: one generator, or (a random codec) a list of them, one per node row; None: the
# global generator.
Generators = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class Encoded:
    """What crosses the wire for a node-stacked tensor of ``shape`` ``(n, ...)``.

    Every part has the node axis first and node i's message is ``{name: part[i]}``, so all nodes' messages
    have the same size and :meth:`nbytes_per_node` is exact, not an average.
    """

    parts: dict[str, Tensor]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        n = self.shape[0] if self.shape else None
        bad = {k: tuple(p.shape) for k, p in self.parts.items() if p.dim() == 0 or p.shape[0] != n}
        if n is None or bad:
            raise ValueError(f"every part needs the node axis first (shape={self.shape}); got {bad}")

    def nbytes_per_node(self) -> int:
        """Bytes of one node's message: the payload's own size (packed codes count packed bytes)."""
        total = sum(p.numel() * p.element_size() for p in self.parts.values())
        return total // self.shape[0] if self.shape[0] else 0


@runtime_checkable
class Codec(Protocol):
    """Encodes node-stacked messages; ``key`` names the tensor for codecs that keep per-tensor state."""

    name: str

    def encode(self, x: Tensor, generator: Generators = None, *, key: str | None = None) -> Encoded:
        """x: (n, ...) -> payload. A random codec also takes a list of generators, one per node row."""
        ...

    def decode(self, enc: Encoded) -> Tensor:
        """payload -> float32 tensor of ``enc.shape``."""
        ...

    def roundtrip(
        self, x: Tensor, generator: Generators = None, *, key: str | None = None
    ) -> tuple[Tensor, int]:
        """(what the receiver sees, bytes per node message)."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class _CodecBase:
    """Shared plumbing: roundtrip, and the empty state of stateless codecs."""

    name: str

    def encode(self, x: Tensor, generator: Generators = None, *, key: str | None = None) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> Tensor:
        raise NotImplementedError

    def roundtrip(
        self, x: Tensor, generator: Generators = None, *, key: str | None = None
    ) -> tuple[Tensor, int]:
        enc = self.encode(x, generator, key=key)
        return self.decode(enc), enc.nbytes_per_node()

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"codec {self.name!r} is stateless; got state keys {sorted(state)}")


# ---------------------------------------------------------------- validation


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not (is_int and value >= lo and (hi is None or value <= hi)):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int in {allowed}; got {value!r}")


def _check_choice(name: str, value: Any, allowed: dict[str, Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}; got {value!r}")


# ---------------------------------------------------------------- casts


@dataclass
class CastCodec(_CodecBase):
    """Round every entry to ``dtype`` (nearest): relative error <= eps/2, no randomness, no state."""

    dtype: str = "fp32"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, _DTYPES)
        self.name = self.dtype

    def encode(self, x: Tensor, generator: Generators = None, *, key: str | None = None) -> Encoded:
        # copy=True: the payload must not alias a parameter that the optimizer later updates in place.
        return Encoded({"values": x.detach().to(_DTYPES[self.dtype], copy=True)}, tuple(x.shape))

    def decode(self, enc: Encoded) -> Tensor:
        return enc.parts["values"].to(torch.float32)


# ---------------------------------------------------------------- stochastic b-bit quantization


def _geometry(shape: tuple[int, ...], block_size: int | None) -> tuple[int, int, int, int, int]:
    """(n, rows, row_len, block, blocks_per_row): a message is rows along its last dim, cut into blocks."""
    n = shape[0]
    row_len = shape[-1] if len(shape) > 1 else 1
    rows = math.prod(shape[1:]) // row_len if row_len else 0
    block = row_len if block_size is None else max(1, min(block_size, row_len))
    return n, rows, row_len, block, -(-row_len // block) if block else 0


def _pack(codes: Tensor, bits: int) -> Tensor:
    """(n, m) uint8 codes < 2^bits -> (n, ceil(m * bits / 8)) uint8, little-endian bit order."""
    n, m = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(n, m * bits)  # (n, m * bits)
    stream = torch.nn.functional.pad(stream, (0, (-m * bits) % 8)).reshape(n, -1, 8)
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=codes.device)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _unpack(packed: Tensor, bits: int, m: int) -> Tensor:
    """Inverse of :func:`_pack`: (n, ceil(m * bits / 8)) uint8 -> (n, m) int64 codes."""
    n = packed.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(n, -1)[:, : m * bits]
    weights = 2 ** torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.reshape(n, m, bits).to(torch.int64) * weights).sum(-1)


def _uniform(shape: torch.Size, generator: Generators, device: torch.device) -> Tensor:
    """U[0, 1) drawn on the generator's own device: a CPU generator gives the same codes on any device.
    ``generator`` may be a list, one per row of the node axis: row i draws from generator i what it would
    draw alone (shape (1, ...)), and the rows travel to ``device`` in one copy."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} node rows")
        row = (1, *shape[1:])
        drawn = [torch.rand(row, generator=g, device=g.device) for g in generator]
        return torch.cat(drawn).to(device) if drawn else torch.empty(shape, device=device)
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


@dataclass
class QuantizeCodec(_CodecBase):
    """Unbiased stochastic rounding to ``bits`` in [2, 8] with a fp32 (lo, scale) per row or block.

    Each entry goes to one of its two neighbouring grid points with probabilities that make its mean exact,
    so E[decode(encode(x))] = x and |decode - x| < scale / (2^bits - 1), scale = block max - block min.
    Constant blocks (scale 0) decode exactly. ``block_size=None`` means one block per last-dim row. With
    a ``block_size``, blocks run over each node's whole flattened message (so a B factor, whose rows hold
    only r entries, still pays one (lo, scale) per block, not per tiny row); a message whose length
    ``block_size`` does not divide ends in a shorter block (no padded codes are sent).
    """

    bits: int = 8
    block_size: int | None = None
    name = "quantize"

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, 2, 8)
        if self.block_size is not None:
            _check_int("block_size", self.block_size, 1)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape blocks are cut along: rows of the last dim, or each node's flattened message."""
        return shape if self.block_size is None else (shape[0], 1, math.prod(shape[1:]))

    def _blocks(self, x: Tensor) -> Tensor:
        """(n, ...) -> (n, rows, blocks, block) float32; a short last block repeats its last entry."""
        n, rows, row_len, block, nb = _geometry(self._layout(tuple(x.shape)), self.block_size)
        x = x.detach().to(torch.float32).reshape(n, rows, row_len)
        pad = nb * block - row_len
        if pad:  # repeating an entry leaves the block's min and max unchanged
            x = torch.cat([x, x[..., -1:].expand(n, rows, pad)], dim=-1)
        return x.reshape(n, rows, nb, block)

    def encode(self, x: Tensor, generator: Generators = None, *, key: str | None = None) -> Encoded:
        blocks = self._blocks(x)  # (n, rows, nb, block)
        lo = blocks.amin(-1, keepdim=True)  # (n, rows, nb, 1)
        scale = blocks.amax(-1, keepdim=True) - lo
        t = ((blocks - lo) / torch.where(scale > 0, scale, 1.0) * self.levels).clamp(0, self.levels)
        floor = t.floor()
        up = _uniform(t.shape, generator, t.device) < (t - floor)  # P(up) = t - floor: unbiased
        codes = (floor + up).to(torch.uint8)
        n, rows, row_len, _, _ = _geometry(self._layout(tuple(x.shape)), self.block_size)
        codes = codes.reshape(n, rows, -1)[..., :row_len].reshape(n, rows * row_len)  # (n, m), unpadded
        parts = {"codes": _pack(codes, self.bits), "lo": lo.squeeze(-1), "scale": scale.squeeze(-1)}
        return Encoded(parts, tuple(x.shape))

    def decode(self, enc: Encoded) -> Tensor:
        n, rows, row_len, block, nb = _geometry(self._layout(enc.shape), self.block_size)
        codes = _unpack(enc.parts["codes"], self.bits, rows * row_len).reshape(n, rows, row_len)
        codes = torch.nn.functional.pad(codes, (0, nb * block - row_len)).reshape(n, rows, nb, block)
        step = enc.parts["scale"].unsqueeze(-1) / self.levels  # (n, rows, nb, 1)
        values = enc.parts["lo"].unsqueeze(-1) + codes.to(torch.float32) * step
        return values.reshape(n, rows, nb * block)[..., :row_len].reshape(enc.shape)


# ---------------------------------------------------------------- top-k sparsification


@dataclass
class TopKCodec(_CodecBase):
    """Keep the ``k = ceil(fraction * m)`` largest-magnitude entries of each node's m-entry message.

    With ``error_feedback`` the codec remembers, per tensor ``key`` and node, what it did not send
    (including value rounding) and adds it to the next message, so the sum of what was sent tracks the
    sum of the signal and the dropped mass is delayed, not lost. That state is exposed through
    :meth:`state_dict` so checkpoints resume exactly.
    """

    fraction: float = 0.1
    value_dtype: str = "fp32"
    error_feedback: bool = False
    name = "topk"
    _residuals: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"fraction must be a number in (0, 1]; got {f!r}")
        _check_choice("value_dtype", self.value_dtype, {k: v for k, v in _DTYPES.items() if k != "bf16"})
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback must be true or false; got {self.error_feedback!r}")

    def break_even(self) -> float:
        """The fraction at which the kept values and their int32 indices cost as much as every entry
        sent at the value dtype (0.5 for fp32 values): above it top-k sends more, not less."""
        value = _DTYPES[self.value_dtype].itemsize
        return value / (value + 4)

    def k(self, m: int) -> int:
        """Entries kept out of m; fraction * m is rounded to 9 decimals so 0.07 * 100 keeps 7, not 8."""
        return max(1, min(m, math.ceil(round(self.fraction * m, 9))))

    def _corrected(self, flat: Tensor, shape: tuple[int, ...], key: str | None) -> Tensor:
        """(n, m) message plus this key's residual (error feedback only)."""
        if not self.error_feedback:
            return flat
        if key is None:
            raise ValueError("topk with error_feedback needs key=<tensor name>, e.g. key='layer0.A'")
        residual = self._residuals.get(key)
        if residual is None:
            return flat
        if tuple(residual.shape) != shape:
            raise ValueError(f"residual for {key!r} has shape {tuple(residual.shape)}, message has {shape}")
        return flat + residual.reshape(flat.shape).to(flat.device)

    def _select(self, flat: Tensor, shape: tuple[int, ...]) -> Encoded:
        """The k largest-magnitude entries of each row of ``flat`` (n, m), a message of ``shape``."""
        # a stable sort, not topk: among equal magnitudes the lower index wins, whatever the number of rows
        # (topk's choice among ties depends on the tensor's make-up, so torchrun's slices chose otherwise)
        idx = (
            flat.abs().sort(dim=1, descending=True, stable=True).indices[:, : self.k(flat.shape[1])]
        )  # (n, k)
        values = flat.gather(1, idx).to(_DTYPES[self.value_dtype])  # (n, k)
        return Encoded({"values": values, "indices": idx.to(torch.int32)}, shape)

    def encode(
        self, x: Tensor, generator: Generators = None, *, key: str | None = None, sent: Tensor | None = None
    ) -> Encoded:
        """``sent`` (n,) bool, with error feedback: the rows whose message is actually sent (a server
        upload's senders); the others keep the residual they held, as if they had not encoded (None: all)."""
        shape = tuple(x.shape)
        flat = self._corrected(x.detach().to(torch.float32).reshape(shape[0], -1), shape, key)  # (n, m)
        enc = self._select(flat, shape)
        if self.error_feedback:
            assert key is not None  # checked in _corrected
            residual = flat - self.decode(enc).reshape(flat.shape)
            if sent is not None:
                held = self._residuals.get(key)
                kept = torch.zeros_like(residual) if held is None else held.reshape(flat.shape)
                kept = kept.to(flat.device)
                residual = torch.where(sent.to(flat.device)[:, None], residual, kept)
            self._residuals[key] = residual.reshape(shape)
        return enc

    def encode_slices(self, row: Tensor, dim: int, idx: Tensor, *, key: str) -> Encoded:
        """Top-k of the slices ``idx`` along ``dim`` of one node's ``row`` (1, ...): a masked upload, whose
        slices may change from round to round (FSLoRA's sketch). With error feedback the residual is kept
        in the row's full coordinates: what a slice did not send is added to that slice when it is sent
        again, not to whichever slice sits at its position in the next round's selection; the slices not
        sent keep theirs."""
        if not self.error_feedback:
            return self.encode(row.index_select(dim, idx))
        full = row.detach().to(torch.float32)
        held = self._residuals.get(key)
        if held is not None and held.shape != full.shape:
            raise ValueError(
                f"residual for {key!r} has shape {tuple(held.shape)}, the row has {tuple(full.shape)}"
            )
        if held is not None:
            full = full + held.to(full.device)
        sub = full.index_select(dim, idx)
        enc = self._select(sub.reshape(1, -1), tuple(sub.shape))
        residual = torch.zeros_like(full) if held is None else held.to(full.device).clone()
        self._residuals[key] = residual.index_copy_(dim, idx, sub - self.decode(enc))
        return enc

    def decode(self, enc: Encoded) -> Tensor:
        values, idx = enc.parts["values"], enc.parts["indices"].to(torch.int64)
        n, m = enc.shape[0], math.prod(enc.shape[1:])
        out = torch.zeros(n, m, dtype=torch.float32, device=values.device)  # float32 whatever the default
        return out.scatter(1, idx, values.to(torch.float32)).reshape(enc.shape)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"residual.<key>": (n, ...)}``: safetensors-friendly."""
        return {f"residual.{k}": v.clone() for k, v in self._residuals.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        bad = [k for k in state if not k.startswith("residual.")]
        if bad:
            raise ValueError(f"topk state keys must start with 'residual.'; got {bad}")
        self._residuals = {k.removeprefix("residual."): v.clone() for k, v in state.items()}


# ---------------------------------------------------------------- registry


CODECS: dict[str, Callable[..., Codec]] = {
    "fp32": lambda: CastCodec("fp32"),
    "fp16": lambda: CastCodec("fp16"),
    "bf16": lambda: CastCodec("bf16"),
    "quantize": QuantizeCodec,
    "topk": TopKCodec,
}


def build_codec(name: str, **params: Any) -> Codec:
    """The codec registered as ``name``; unknown names or parameters raise ValueError listing the allowed."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; allowed: {sorted(CODECS)}")
    factory = CODECS[name]
    signature = inspect.signature(factory)
    try:
        signature.bind(**params)
    except TypeError as err:
        allowed = list(signature.parameters) or "none"
        raise ValueError(f"codec {name!r} got parameters {sorted(params)}; allowed: {allowed}") from err
    return factory(**params)
