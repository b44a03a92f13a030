"""LoRA dropout whose masks depend on the example, not on the order the work is done in.

``nn.Dropout`` draws from the global generator, so a row's mask depends on everything drawn before it: the
micro-batch it lands in, the process that trains it, the device, a resume. Here the mask of an element
is a hash of (the row's key, the layer, the token position, the feature): the same example of the same
node at the same point of its data stream gets the same mask whatever the chunk size, the number of
processes, the device or an interruption. Row keys come from ``NodeStreams.row_keys``.

The hash is integer arithmetic in int64, so CPU and GPU compute the same bits: every product stays below
2**63 while a row has fewer than 3.4e9 elements (beyond that the int64 product wraps around, which keeps
the low 32 bits the hash reads). The mask is built a block at a time (its int64 temporaries stay near
32 MiB whatever the layer) and kept for the backward as one byte per element.
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


_BLOCK = 1 << 22  # elements hashed at once: int64 temporaries of 32 MiB, whatever the layer's size


def keep_mask(keys: Tensor, salt: int, shape: tuple[int, ...], p: float) -> Tensor:
    """(rows, *shape) bools: which elements dropout keeps for rows with ``keys`` (rows,) int64 >= 0."""
    row = mix32_(mix32_((keys & _LOW32) ^ (keys >> 32)) ^ salt).view(-1, 1)  # (rows, 1)
    count, threshold = int(torch.Size(shape).numel()), round(p * (1 << _KEEP_BITS))
    keep = torch.empty((keys.shape[0], count), dtype=torch.bool, device=keys.device)
    rows_at_once, width = max(1, _BLOCK // max(count, 1)), min(count, _BLOCK)
    for r in range(0, keys.shape[0], rows_at_once):
        for e in range(0, count, width):
            index = torch.arange(e, min(e + width, count), device=keys.device, dtype=torch.int64)
            bits = row[r : r + rows_at_once] + index.mul_(_GOLDEN)  # a fresh tensor, hashed in place
            bits &= _LOW32
            keep[r : r + rows_at_once, e : e + width] = (mix32_(bits) >> (32 - _KEEP_BITS)) >= threshold
    return keep.view(keys.shape[0], *shape)


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
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), x.new_zeros(()))  # saves the bool mask only

    def extra_repr(self) -> str:
        return f"p={self.p}"
