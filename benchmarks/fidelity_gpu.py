"""The bf16 copy of the shipped MiniLM that is copied to a GPU machine (benchmarks/fidelity_gpu.sh).

A device machine receives at most 64 MiB with the working tree; the fp32 MiniLM-L6 is about 90 MB, its
bf16 copy about 45 MB. declora loads it as fp32 masters (and stores the base in bf16 with precision=bf16),
so the only change is the rounding of the frozen weights to bf16, which precision=bf16 does anyway.

    python benchmarks/fidelity_gpu.py OUT_FOLDER
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from declora.assets import model_path


def bf16_minilm(out: Path) -> Path:
    src = model_path("minilm")
    AutoModel.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    if (src / "1_Pooling").is_dir():  # model.pooling=auto reads it: mean, as for the shipped folder
        shutil.copytree(src / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        raise SystemExit(__doc__)
    folder = bf16_minilm(Path(sys.argv[1] if len(sys.argv) > 1 else "shared/minilm-bf16"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder}: {size / 1e6:.1f} MB")
