"""A GGUF-shipped causal LM as a plain transformers folder in the user's cache, built once.

transformers reads a GGUF file (with the ``gguf`` package installed) by dequantizing every tensor, which
takes about 40 s for SmolLM2-135M, and it refuses to ``save_pretrained`` a model loaded that way. So the
first use rebuilds a plain ``LlamaForCausalLM`` from the loaded config and state dict and saves it, with the
tokenizer, as safetensors (fp32) in a cache folder outside the repository; every later load reads that
folder in under a second. The folder is written in a temporary sibling and renamed into place, so a run
killed mid-write never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CACHE_ENV = "DECLORA_CACHE"  # overrides the cache root
DONE = "declora_source.json"  # written last: a folder without it is not a finished conversion


def cache_root() -> Path:
    """$DECLORA_CACHE, else $XDG_CACHE_HOME/declora, else ~/.cache/declora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "declora"


def _source(gguf: Path) -> dict[str, object]:
    return {"gguf": str(gguf), "bytes": gguf.stat().st_size}


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
    folder = cache_root() / name
    if not _converted(gguf, folder):
        convert(gguf, folder)
    return folder


def _converted(gguf: Path, folder: Path) -> bool:
    """``folder`` holds a finished conversion of ``gguf`` (its marker, written last, names its size)."""
    done = folder / DONE
    return done.is_file() and json.loads(done.read_text()).get("bytes") == gguf.stat().st_size


def convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` into a plain fp32 causal LM + tokenizer saved at ``folder`` (atomically)."""
    try:
        import gguf as _  # noqa: F401  transformers needs it to read the file; say so before the slow part
    except ImportError as err:
        raise ImportError(
            f"reading {gguf.name} needs the gguf package: pip install gguf==0.19.0 (or make install)"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:  # before the slow part: a cache that cannot be written would fail only after it
        folder.parent.mkdir(parents=True, exist_ok=True)
        probe = folder.parent / f".write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot write the model cache {folder.parent} ({err.strerror}); point {CACHE_ENV} (or "
            "XDG_CACHE_HOME) at a writable folder",
        ) from err
    log.warning("converting %s into %s (once; about 40 s)", gguf, folder)
    began = time.perf_counter()
    hf_logging.set_verbosity_error()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A fresh model of the same class from the same config can be saved; the weights are copied over.
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    # transformers wraps Module.to with functools.wraps, whose typeshed type keeps the unbound ``self``.
    plain.to(torch.float32)  # type: ignore[arg-type]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / DONE).write_text(json.dumps(_source(gguf), indent=1))
        # Another process (a cell of `declora compare --jobs`) may have finished the same conversion
        # meanwhile, and others may be loading it: keep it. Only an older or unfinished one is replaced.
        if not _converted(gguf, folder):
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    except OSError:
        if not (folder / DONE).is_file():  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1f s", folder, time.perf_counter() - began)
