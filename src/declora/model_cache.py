"""Model folders declora builds once in the user's cache, outside the repository: a GGUF-shipped causal LM
decoded into a transformers folder (declora.gguf_cache), a model shipped as a zip archive cut into parts
(declora.zipped_model).

A folder is written in a temporary sibling, finished with a marker that names its source, and renamed into
place: a run killed mid-write never leaves a half-written model behind, and two processes building the same
folder at once (cells of `declora compare --jobs`) both end up reading one finished copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "DECLORA_CACHE"  # overrides the cache root
DONE = "declora_source.json"  # written last: a folder without it is not a finished build


def cache_root() -> Path:
    """$DECLORA_CACHE, else $XDG_CACHE_HOME/declora, else ~/.cache/declora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "declora"


def finished(folder: Path, source: dict[str, object]) -> bool:
    """``folder`` holds a finished build of ``source`` (its marker, written last, says so)."""
    done = folder / DONE
    return done.is_file() and json.loads(done.read_text()) == source


def check_writable(parent: Path) -> None:
    """Before the slow part: a cache that cannot be written would fail only after it."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot write the model cache {parent} ({err.strerror}); point {CACHE_ENV} (or "
            "XDG_CACHE_HOME) at a writable folder",
        ) from err


def build_once(folder: Path, source: dict[str, object], write: Callable[[Path], None]) -> Path:
    """``folder``, built by ``write(tmp)`` into a temporary sibling and renamed into place unless it already
    holds a finished build of ``source`` (JSON-able: what the folder is made from)."""
    if finished(folder, source):
        return folder
    check_writable(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        (tmp / DONE).write_text(json.dumps(source, indent=1))
        # Another process may have finished the same build meanwhile, and others may be loading it: keep
        # it. Only an older or unfinished one is replaced.
        if not finished(folder, source):
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    except OSError:
        if not (folder / DONE).is_file():  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
