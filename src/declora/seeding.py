"""All randomness derives from (seed, purpose, round, node, ...).

Every process can therefore compute the same W(t), partitions and sketches without talking to the
others, and a resumed run draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(part: int | str) -> int:
    # Python's hash() of a str changes between processes; crc32 does not.
    return zlib.crc32(part.encode()) if isinstance(part, str) else int(part)


def seed_for(seed: int, *keys: int | str) -> int:
    """A 63-bit integer seed derived from ``seed`` and the keys (stable across processes)."""
    seq = np.random.SeedSequence([int(seed), *(_key(k) for k in keys)])
    lo, hi = (int(x) for x in seq.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(_key(k) for k in keys)]))


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, *keys))
