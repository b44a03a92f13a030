"""Where a run computes and in what precision: the ``device`` and ``precision`` keys, resolved once.

``device``: auto (CUDA when this torch sees a GPU, else the CPU) | cpu | cuda | cuda:K. Under torchrun,
``cuda`` and ``auto`` mean this rank's own GPU, cuda:LOCAL_RANK (ranks share GPUs round-robin when there
are fewer GPUs than ranks on a machine).

``precision``: fp32 | bf16. bf16 stores the frozen base in bfloat16 and runs the forward under
``torch.autocast``; the trained tensors (LoRA factors, heads) and the optimizer moments stay float32
master copies, so a step's update is as exact as in fp32 and only the activations are rounded.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
import re

import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the frozen base's storage dtype
# Default forward micro-batch budget (padded tokens) when train.tokens_per_chunk is null. 256 was fastest
# and leanest on 2 CPU cores (benchmarks/README.md); a GPU needs tens of thousands of tokens per kernel
# launch to be busy, and 32768 tokens of a 30-layer, 576-wide model take a few GB of activations. A causal
# LM scored at every position adds its logits: 32768 x 49152 (SmolLM2's vocabulary) in bf16, fp32 and the
# loss's buffers is about 16 GB, fine on an 80-141 GB card; on a smaller one lower train.tokens_per_chunk.
TOKENS_PER_CHUNK = {"cpu": 256, "cuda": 32768}


def check_device(choice: str) -> None:
    """A ConfigError-worthy message for a device this machine cannot give, else None (raises ValueError)."""
    if not DEVICE_PATTERN.fullmatch(choice):
        raise ValueError(
            f"device={choice!r} is not allowed; choose auto, cpu, cuda or cuda:K (K a GPU index)"
        )
    if not choice.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={choice!r} but this torch ({torch.__version__}) sees no CUDA GPU; "
            "use device=cpu or device=auto"
        )
    count = torch.cuda.device_count()
    if ":" in choice and int(choice.split(":")[1]) >= count:
        raise ValueError(
            f"device={choice!r} but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"
        )


def resolve_device(choice: str) -> torch.device:
    """The torch device for ``choice`` (validated by check_device); torchrun ranks take cuda:LOCAL_RANK."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if ":" in choice:
        return torch.device(choice)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's autocast region: bf16 matmuls for precision=bf16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def default_tokens_per_chunk(device: torch.device) -> int:
    return TOKENS_PER_CHUNK.get(device.type, TOKENS_PER_CHUNK["cpu"])


def reset_gpu_peak(device: torch.device) -> None:
    """Start the GPU's peak-memory count afresh: a run's peak is its own, not an earlier run's in the same
    process (the cells of ``declora compare``, a notebook). What is allocated now still counts."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory_mb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated of the run's GPU in MiB since ``reset_gpu_peak`` (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> collections.abc.Iterator[None]:
    """torch's default dtype set to ``dtype`` inside; the caller's own (a notebook's float64) after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
