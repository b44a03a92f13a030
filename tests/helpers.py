"""Plain helpers every test folder imports (``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "fun", "sad"]


def write_tiny_data(path: Path, rows: int) -> Path:
    """``rows`` five-word texts with alternating labels as a .jsonl file."""
    lines = [
        {"text": " ".join(WORDS[(i * k) % 10] for k in range(1, 6)), "label": i % 2} for i in range(rows)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def crash_after_round(exp, k: int) -> None:
    """Run ``exp`` (a new run) and stop it as a kill would once round ``k`` is logged, before that round's
    checkpoint: round ``k - 1`` is the last one a resume finds."""
    import os

    import pytest

    from declora import engine
    from declora.runfolder import CRASH_ENV, CrashPoint, reset_crash_counts

    before = os.environ.get(CRASH_ENV)
    os.environ[CRASH_ENV] = f"round.logged:{k}"  # the k-th round logged by this run
    reset_crash_counts()
    try:
        with pytest.raises(CrashPoint):
            engine.run(exp)
    finally:
        reset_crash_counts()
        if before is None:
            del os.environ[CRASH_ENV]
        else:
            os.environ[CRASH_ENV] = before


def assert_same_tensors(a, b) -> None:
    """Two experiments' trained tensors (every node's factors and heads) are bit-identical."""
    import torch

    for k, v in a.fed.tensors().items():
        assert torch.equal(v.detach(), b.fed.tensors()[k].detach()), k
