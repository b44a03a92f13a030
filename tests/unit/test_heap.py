"""release_free_memory hands freed heap pages back to the OS (glibc)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from declora.heap import release_free_memory

pytestmark = pytest.mark.unit


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_freed_holes_in_the_heap_go_back_to_the_os():
    # 4,000 tensors of 64 KB (below glibc's mmap threshold: they live in the heap); free every other
    # one, so the free memory sits in holes between live blocks, where glibc keeps it by itself.
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]
    del blocks[::2]
    before = resident_mb()
    if not release_free_memory():
        pytest.skip("this C library has no malloc_trim")
    after = resident_mb()
    assert before - after > 60, (before, after)  # about 125 MB was freed; most of it comes back
    assert all(float(b[0]) == 1.0 for b in blocks)  # live blocks are untouched
