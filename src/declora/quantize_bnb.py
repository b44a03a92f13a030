"""bitsandbytes kernels for the quantized base: ``model.quant_backend`` auto | declora | bitsandbytes.

declora's NF4 state (blocks of 64, fp32 absmax per block, two codes per byte with the first in the high
nibble, QLoRA's 16 levels) is byte for byte what ``bitsandbytes.functional.quantize_4bit(w, blocksize=64,
quant_type="nf4")`` stores, so bitsandbytes' ``dequantize_4bit`` kernel decodes declora's own buffers to
the same numbers (tested bit-exact). Only the decoding changes: the codes, checkpoints, memory and the
PEFT export are the same with either backend. Measured on the CPU (benchmarks/quant_backend.py,
results/quant_backend.md): bitsandbytes decodes a MiniLM weight matrix from NF4 8x to 16x faster than
declora's torch code, and a MiniLM-shaped forward + backward on an NF4 base took 196 ms instead of 260
(fp32 base: 166), so ``auto`` uses it where bitsandbytes is installed and runs on the device. int8
always decodes with declora's code: it is one multiply per entry, and bitsandbytes'
``int8_vectorwise_dequant`` measured 1.6x to 1.9x slower on the CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types

import torch
from torch import Tensor

BACKENDS = ("auto", "declora", "bitsandbytes")


def installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@functools.cache
def _functional() -> types.ModuleType:
    """``bitsandbytes.functional``, imported once. Its CPU backend warns at import that it could not
    fetch an optional 4-bit GEMM from the Hugging Face hub (it needs the ``kernels`` package, which declora
    does not install, so nothing is downloaded); declora never calls that GEMM, so the warning is muted."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional

    return bitsandbytes.functional


def dequantize_nf4(state: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    """declora's NF4 state -> the (out, in) weight in ``dtype``, decoded by bitsandbytes' kernel."""
    from declora.quantize import NF4_BLOCK, nf4_levels

    bnb_f = _functional()

    packed, absmax = state["packed"], state["absmax"]
    quant_state = bnb_f.QuantState(
        absmax=absmax,
        shape=torch.Size([2 * packed.numel()]),  # whole blocks: the padded, flattened weight
        code=nf4_levels(packed.device),
        blocksize=NF4_BLOCK,
        quant_type="nf4",
        dtype=dtype,
    )
    flat = bnb_f.dequantize_4bit(packed.view(-1, 1), quant_state).view(-1)  # (m_padded,)
    return flat[: shape.numel()].view(shape)


@functools.cache
def runs_on(device_type: str) -> bool:
    """Whether bitsandbytes is installed and decodes NF4 on this device type (checked once)."""
    if not installed():
        return False
    from declora.quantize import dequantize_nf4 as declora_nf4
    from declora.quantize import quantize_nf4

    try:
        w = torch.linspace(-1, 1, 128, device=device_type).reshape(2, 64)
        state = quantize_nf4(w)
        return torch.equal(dequantize_nf4(state, w.shape), declora_nf4(state, w.shape))
    except (RuntimeError, NotImplementedError, ImportError, AttributeError):
        return False


def uses_bitsandbytes(backend: str, kind: str, device: torch.device) -> bool:
    """Whether a ``kind`` layer on ``device`` decodes with bitsandbytes under ``backend``; an explicit
    ``bitsandbytes`` that cannot run there is an error, not a silent fallback."""
    if backend == "declora" or kind != "nf4":
        return False
    if runs_on(device.type):
        return True
    if backend == "bitsandbytes":
        raise RuntimeError(
            f"model.quant_backend=bitsandbytes but bitsandbytes "
            f"{'is not installed' if not installed() else f'does not run on {device.type}'}; "
            "use model.quant_backend=declora or auto"
        )
    return False
