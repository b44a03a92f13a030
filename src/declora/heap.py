"""Give freed heap memory back to the operating system between rounds (glibc only).

Every micro-batch allocates and frees activations of a different size. glibc keeps freed blocks in
its heap for reuse, and as the sizes change from step to step the heap's footprint creeps up round
after round: +25 MB a round for the default experiment, whose resident memory went from 1.45 GB after
round 1 to 2.15 GB after round 30 with no tensor kept. ``malloc_trim(0)`` once a round hands the
free pages back (milliseconds), so resident memory stays closer to what the run really holds: over 8
rounds of the default at a 512-token budget the peak grew by 44 MB instead of 93 MB. On other C
libraries (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():  # the libc function, or None where there is none
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; True if the C library could."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
