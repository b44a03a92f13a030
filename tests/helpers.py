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
