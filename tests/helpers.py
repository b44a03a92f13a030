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
    """Run ``exp`` and stop it as a kill would once round ``k`` is logged, before that round's
    checkpoint: round ``k - 1`` is the last one a resume finds."""
    import pytest

    from declora import engine

    def crash(record):
        if record["round"] == k:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run(exp, on_round=crash)


def assert_same_tensors(a, b) -> None:
    """Two experiments' trained tensors (every node's factors and heads) are bit-identical."""
    import torch

    for k, v in a.fed.tensors().items():
        assert torch.equal(v.detach(), b.fed.tensors()[k].detach()), k
