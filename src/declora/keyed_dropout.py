"""LoRA dropout whose masks depend on the example, not on the order the work is done in.

``nn.Dropout`` draws from the global generator, so a row's mask depends on everything drawn before it: the
micro-batch it lands in, the process that trains it, the device, a resume. Here the mask of an element
is a hash of (the row's key, the layer, the token position, the feature): the same example of the same
node at the same point of its data stream gets the same mask whatever the chunk size, the number of
processes, the device or an interruption. Row keys come from ``NodeStreams.row_keys``.

The hash is integer arithmetic in int64 with every product below 2**63, so CPU and GPU compute the same
bits.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from declora.lora import NodeRouting

_LOW32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit multiply-xorshift hash's constant: small enough that v * _MIX < 2**63
_GOLDEN = 0x9E3779B1  # spreads consecutive element indices before they are hashed
_KEEP_BITS = 24  # a mask element keeps x when its 24-bit hash is at or above p * 2**24


def mix32_(v: Tensor) -> Tensor:
    """A 32-bit avalanche hash of int64 values in [0, 2**32), computed in place (half the time of the
    same on fresh tensors, for masks as large as a layer's input) and returned."""
    v ^= v >> 16
    v *= _MIX
    v &= _LOW32
    v ^= v >> 16
    v *= _MIX
    v &= _LOW32
    v ^= v >> 16
    return v


def keep_mask(keys: Tensor, salt: int, shape: tuple[int, ...], p: float) -> Tensor:
    """(rows, *shape) bools: which elements dropout keeps for rows with ``keys`` (rows,) int64 >= 0."""
    row = mix32_(mix32_((keys & _LOW32) ^ (keys >> 32)) ^ salt)  # (rows,)
    index = torch.arange(int(torch.Size(shape).numel()), device=keys.device, dtype=torch.int64)
    bits = row.view(-1, 1) + index * _GOLDEN  # (rows, elements), a fresh tensor hashed in place
    bits &= _LOW32
    bits = mix32_(bits) >> (32 - _KEEP_BITS)
    return (bits >= round(p * (1 << _KEEP_BITS))).view(keys.shape[0], *shape)


class KeyedDropout(nn.Module):
    """Dropout of rate ``p`` on a stacked LoRA layer's input; ``name`` (the layer's) salts its masks so
    that two layers reading the same input drop different elements."""

    def __init__(self, p: float, name: str, routing: NodeRouting) -> None:
        super().__init__()
        self.p, self.salt, self.routing = p, zlib.crc32(name.encode()), routing

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = keep_mask(self.routing.require_keys(x.shape[0]), self.salt, tuple(x.shape[1:]), self.p)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"
