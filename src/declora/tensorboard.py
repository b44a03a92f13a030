"""Optional TensorBoard scalars per round. metrics.jsonl stays the source of truth; this mirrors it.

Enable with ``tensorboard=true`` or ``log.trackers=[tensorboard]`` (declora.trackers); view with
``tensorboard --logdir RUN_DIR/tensorboard``.
Needs the ``tensorboard`` package (``pip install declora[tensorboard]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Scalars worth a curve; grouped so TensorBoard shows one panel per family.
GROUPS = {
    "acc_": "accuracy",
    "consensus_": "consensus",
    "cross_term": "consensus",
    "bytes_": "bytes",
    "train_loss": "train",
    "wall_s": "time",
    "tokens_per_s": "time",
    "peak_mem_mb": "memory",
    "peak_gpu_mem_mb": "memory",
}


def tag_of(key: str) -> str | None:
    return next((f"{group}/{key}" for prefix, group in GROUPS.items() if key.startswith(prefix)), None)


class TensorBoardLogger:
    """Writes every numeric, finite metric of a round record as a scalar at step = round."""

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch imports tensorboard lazily
            raise ImportError(
                "tensorboard=true (or log.trackers=[tensorboard]) needs the tensorboard package: "
                "pip install 'declora[tensorboard]' (or pip install tensorboard)"
            ) from err
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in record.items():
            tag = tag_of(key)
            if tag is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
