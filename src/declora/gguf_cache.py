"""A GGUF-shipped causal LM as a plain transformers folder in the user's cache, built once.

transformers reads a GGUF file (with the ``gguf`` package installed) by dequantizing every tensor, which
takes about 40 s for SmolLM2-135M, and it refuses to ``save_pretrained`` a model loaded that way. So the
first use rebuilds a plain ``LlamaForCausalLM`` from the loaded config and state dict and saves it, with the
tokenizer, as safetensors (fp32) in a cache folder (declora.model_cache); every later load reads that
folder in under a second.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from declora.model_cache import build_once, cache_root

log = logging.getLogger(__name__)


def _source(gguf: Path) -> dict[str, object]:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def context_length(gguf: Path) -> int | None:
    """The positions the GGUF model was trained for (``<arch>.context_length`` in its header), read without
    converting it; None without the gguf package or the key."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None  # the conversion says what is missing
    fields = GGUFReader(str(gguf)).fields
    arch = fields.get("general.architecture")
    if arch is None:
        return None
    found = fields.get(f"{bytes(arch.parts[-1]).decode()}.context_length")
    return int(found.parts[-1][0]) if found is not None else None


def cached_folder(gguf: Path, name: str) -> Path:
    """The transformers folder converted from ``gguf`` (built now if missing or from another file)."""
    return build_once(cache_root() / name, _source(gguf), lambda tmp: convert(gguf, tmp))


def convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` into a plain fp32 causal LM + tokenizer saved at ``folder``."""
    try:
        import gguf as _  # noqa: F401  transformers needs it to read the file; say so before the slow part
    except ImportError as err:
        raise ImportError(
            f"reading {gguf.name} needs the gguf package: pip install gguf==0.19.0 (or make install)"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.warning("converting %s into the model cache %s (once; about 40 s)", gguf, cache_root())
    began = time.perf_counter()
    hf_logging.set_verbosity_error()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A fresh model of the same class from the same config can be saved; the weights are copied over.
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    # transformers wraps Module.to with functools.wraps, whose typeshed type keeps the unbound ``self``.
    plain.to(torch.float32)  # type: ignore[arg-type]
    plain.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - began)
