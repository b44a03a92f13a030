"""A user's table through Hugging Face ``datasets``: CSV/TSV, JSON/JSONL (each may be gzip, bzip2 or xz
compressed), parquet, Arrow, save_to_disk, or a hub dataset's files already in the Hugging Face cache.

``datasets`` does the reading (encodings such as a UTF-8 byte-order mark, types, memory-mapped Arrow), so
declora only picks the split and the columns. Everything is local: the packaged builders,
``load_from_disk`` and a cached snapshot read as a local folder never reach a hub.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
from pathlib import Path
from typing import Any

from declora.assets import hub_dataset
from declora.config import ConfigError

# suffix -> (datasets builder, its keyword arguments)
# Only an empty cell is missing: pandas would also read the words "None", "NA", "null", "nan" (real
# review text, or a label name) as missing values.
_ONLY_EMPTY_IS_MISSING = {"keep_default_na": False, "na_values": [""]}
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", _ONLY_EMPTY_IS_MISSING),
    ".tsv": ("csv", {"sep": "\t", **_ONLY_EMPTY_IS_MISSING}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
TABLE_SUFFIXES = tuple(BUILDERS)
# the text formats, which may come compressed (parquet and Arrow compress inside)
TEXT_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".txt")
# compression suffix -> opener; datasets decompresses these itself, declora's own checks read through them
COMPRESSED: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes


def relative_note(path: Path) -> str:
    """For a missing relative path: where it was looked for (shipped configs name files from the
    repository root, so a run from elsewhere misses them)."""
    return "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"


def file_format(source: str | Path) -> str:
    """A file's format suffix, lower-cased and past a compression suffix: "Reviews.JSONL.gz" -> ".jsonl"
    ("" when the name has none). Suffixes are matched in any case: exports from Windows write ".CSV"."""
    suffixes = [s.lower() for s in Path(source).suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def compression(source: str | Path) -> str | None:
    """The compression suffix (".gz", ".bz2", ".xz"), lower-cased, or None for a plain file."""
    suffix = Path(source).suffix.lower()
    return suffix if suffix in COMPRESSED else None


def is_table(source: str | Path) -> bool:
    path = Path(source).expanduser()
    if file_format(path) in BUILDERS or (path.is_dir() and is_saved_dataset(path)):
        return True
    return hub_dataset(str(source)) is not None


def has_splits(source: str | Path) -> bool:
    """Whether the source can hold several named splits (a saved DatasetDict, a cached hub dataset); a
    plain file holds one, "train"."""
    return Path(source).expanduser().is_dir() or hub_dataset(str(source)) is not None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in a compression suffix; a damaged archive is
    an error naming the file."""
    packed = compression(path)
    if packed is None:
        return path.read_bytes()
    try:
        with COMPRESSED[packed](path, "rb") as stream:
            return bytes(stream.read())
    except (OSError, EOFError, lzma.LZMAError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"data file {str(path)!r} is not a readable {packed} archive ({err})") from err


def read_text(path: Path) -> str:
    """The file's text (decompressed as ``read_bytes``): UTF-8, else latin-1, which decodes any byte (one
    shipped BBC article holds a raw latin-1 pound sign)."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in SAVED_MARKERS)


def _quiet() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def splits_of(source: str | Path, subset: str | None = None) -> dict[str, Any]:
    """Every split the source holds, by name: a plain file is one split, "train". ``subset``: of a cached
    hub dataset (data.subset), refused for any other source."""
    datasets = _quiet()
    path = Path(source).expanduser()
    cached = None if path.exists() else hub_dataset(str(source))
    if cached is not None:
        return _hub_splits(str(source), cached, subset)
    if subset is not None:
        raise ConfigError(
            f"data.subset={subset!r} picks a subset of a hub dataset in the Hugging Face cache; "
            f"data.dataset={str(source)!r} is not one: leave data.subset out"
        )
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist{relative_note(path)}")
    if path.is_dir():
        if not is_saved_dataset(path):
            raise ConfigError(
                f"data folder {str(path)!r} is not a datasets save_to_disk folder "
                f"(no {' / '.join(SAVED_MARKERS)})"
            )
        _refuse_empty_saved_splits(path)
        saved = datasets.load_from_disk(str(path))
        return dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    fmt = file_format(path)
    if fmt not in BUILDERS:
        raise ConfigError(f"data file {str(path)!r}: suffix {path.suffix!r} is not one of {list(BUILDERS)}")
    if compression(path) and fmt not in TEXT_FORMATS:
        raise ConfigError(
            f"data file {str(path)!r}: a {fmt} file is read uncompressed (the format compresses inside); "
            f"only {[f for f in TEXT_FORMATS if f in BUILDERS]} may come as {' / '.join(COMPRESSED)}"
        )
    builder, kwargs = BUILDERS[fmt]
    check_text_table(path)
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps the reader's error (pandas, pyarrow) in its own classes
        cause = err.__cause__ or err
        cache = Path(datasets.config.HF_DATASETS_CACHE)
        if isinstance(cause, OSError) and cause.filename and Path(cause.filename) != path:
            raise OSError(  # the file is fine: datasets could not write its cache (read-only HOME, say)
                cause.errno,
                f"datasets cannot write its cache {cache} ({cause.strerror}: {cause.filename}); point "
                "HF_DATASETS_CACHE (or HF_HOME) at a writable folder",
            ) from err
        raise ValueError(f"data file {str(path)!r} cannot be read: {type(cause).__name__}: {cause}") from err
    return {"train": table}


def _hub_splits(name: str, folder: Path, subset: str | None) -> dict[str, Any]:
    """The splits of a hub dataset's cached files (of one subset), read by ``datasets`` as a local folder
    (its README's configs and label names included); nothing is downloaded."""
    datasets = _quiet()
    try:
        loaded = datasets.load_dataset(str(folder), subset)
    except Exception as err:  # a dataset of several configs, files datasets cannot read, ...
        shown = " ".join(str(err).split()).replace(repr(folder.name), repr(name))  # the snapshot's hash
        raise ValueError(
            f"data.dataset={name!r}"
            + (f" data.subset={subset!r}" if subset is not None else "")
            + f": its copy in the Hugging Face cache ({folder}) cannot be read: {shown} (a subset is "
            "picked with data.subset)"
        ) from err
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _refuse_empty_saved_splits(path: Path) -> None:
    """``datasets.load_from_disk`` fails with an IndexError on a saved split without rows (it holds no
    Arrow file), and loads every split, so even an unused empty one would stop the run with a traceback."""
    index = path / "dataset_dict.json"
    splits = json.loads(index.read_text()).get("splits", []) if index.is_file() else []
    for split in splits:
        state = path / split / "state.json"
        if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
            raise ValueError(
                f"split {split!r} of {str(path)!r} holds no rows, and datasets cannot load a folder with an "
                "empty split: save the DatasetDict without it"
            )


def _decode(path: Path) -> str:
    """A text table as UTF-8 (a byte-order mark allowed); a bad byte names the file and line."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def check_text_table(path: Path) -> None:
    """Line-exact errors for what ``datasets`` would report vaguely or not at all: bad encoding, a JSON
    line that does not parse or is not an object, a CSV header naming a column twice, a CSV row with more
    cells than the header or a field over the size limit, a parquet file without rows."""
    fmt = file_format(path)
    if fmt == ".parquet":  # datasets fails on a parquet file without rows with an Arrow message
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # not a parquet file: pyarrow says why
            raise ValueError(f"data file {str(path)!r} cannot be read: {type(err).__name__}: {err}") from err
        if rows == 0:
            raise ValueError(f"data file {str(path)!r} holds no rows")
    if fmt not in (".csv", ".tsv", ".jsonl", ".json"):
        return
    text = _decode(path)
    if not text.strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    if fmt in (".csv", ".tsv"):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == ".tsv" else ",")
        try:
            header = next(reader)
            width, rows = len(header), 0
            names = [name.strip() for name in header]
            twice = sorted({name for name in names if name and names.count(name) > 1})
            if twice:  # which of the two columns would be read is not the user's choice: refuse
                raise ValueError(
                    f"{path}:1: the header names column {twice[0]!r} {names.count(twice[0])} times; give "
                    "each column its own name"
                )
            for row in reader:
                if len(row) > width:
                    raise ValueError(f"{path}:{reader.line_num}: {len(row)} cells, the header has {width}")
                rows += any(cell.strip() for cell in row)
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: broken CSV ({err})") from err
        if not rows:
            raise ValueError(f"data file {str(path)!r} has a header and no rows")
        return
    if fmt == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not a JSON line ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        _check_field_sizes(path, i, row)


def _check_field_sizes(path: Path, line: int, row: dict[str, Any]) -> None:
    """A JSON line's text fields obey the limit the csv module sets for a CSV cell, so an oversized
    field (a whole file pasted into one value, say) is refused alike in either format."""
    limit = csv.field_size_limit()
    for key, value in row.items():
        if isinstance(value, str) and len(value) > limit:
            raise ValueError(
                f"{path}:{line}: field {key!r} holds {len(value)} characters, over the limit of {limit}"
            )


def row_line(source: str | Path, row: int) -> str:
    """Where row ``row`` (0-based) of a text table is, as "file:line" (else "row N of source")."""
    path = Path(source).expanduser()
    fmt = file_format(path)
    if fmt in (".csv", ".tsv"):
        reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter="\t" if fmt == ".tsv" else ",")
        for k, _ in enumerate(reader):
            if k == row + 1:  # after the header
                return f"{path}:{reader.line_num}"
    if fmt == ".jsonl" or (fmt == ".json" and not _decode(path).lstrip().startswith("[")):
        lines = [i for i, line in enumerate(_decode(path).splitlines(), start=1) if line.strip()]
        if row < len(lines):
            return f"{path}:{lines[row]}"
    return f"row {row} of {str(source)!r}"


def open_split(source: str | Path, split: str, key: str = "data.split", subset: str | None = None) -> Any:
    """One ``datasets.Dataset``; an unknown split is an error naming the ones there are."""
    found = splits_of(source, subset)
    if split not in found:
        raise ConfigError(f"{key}={split!r} is not a split of {str(source)!r}; it has {sorted(found)}")
    if len(found[split]) == 0:
        raise ValueError(f"split {split!r} of {str(source)!r} holds no rows")
    return found[split]


def with_nested(table: Any, name: str) -> Any:
    """The table, flattened when ``name`` is a nested field (``meta.text`` of ``{"meta": {"text": ...}}``,
    as ``datasets`` names it) rather than a column of its own."""
    if name not in table.column_names and any(isinstance(f, dict) for f in table.features.values()):
        return table.flatten()
    return table


def column(
    table: Any,
    name: str,
    key: str,
    where: str,
    source: str | Path | None = None,
    nested: bool = False,
    blank: bool = False,
) -> list[Any]:
    """The values of one column; a missing column, an empty cell (unless ``blank``: then only a missing
    one), a NaN or (unless ``nested``) a list or dict is an error naming it (with the file and line when
    ``source`` is a text table). A field of a nested object is named with dots, as ``datasets`` flattens
    it: ``meta.text`` for ``{"meta": {"text": ...}}``."""
    table = with_nested(table, name)
    if name not in table.column_names:
        wrapped = (  # {"data": [...]}: datasets reads the one key as the only column
            source is not None and file_format(source) == ".json" and len(table.column_names) == 1
        )
        hint = (
            " (the file is one object around the rows: a .json table is a list of row objects, or use "
            "JSON lines, one object a line)"
            if wrapped
            else ""
        )
        raise ConfigError(
            f"{key}={name!r} is not a column of {where}; found {sorted(table.column_names)}{hint}"
        )
    values = list(table[name])
    for i, v in enumerate(values):
        empty = v is None or (isinstance(v, str) and not v.strip() and not blank)
        # a list: pre-tokenized words, or a JSON file of columns, which reads as one row of lists
        many = not nested and isinstance(v, (list, dict))
        if empty or many or (isinstance(v, float) and not math.isfinite(v)):
            at = row_line(source, i) if source is not None else f"row {i} of {where}"
            what = "no value" if empty else f"{v!r} (not a value)"
            if many:
                shown = str(v) if len(str(v)) <= 40 else str(v)[:40] + "..."
                what = f"a {type(v).__name__} {shown}, not one value (a table has one text and label a row)"
            raise ValueError(f"{at}: {what} in column {name!r} ({key})")
    return values


def class_names(table: Any, name: str) -> tuple[str, ...] | None:
    """The label names of a ``ClassLabel`` column (ids index them), else None."""
    feature = with_nested(table, name).features.get(name)
    names = getattr(feature, "names", None)
    return tuple(names) if names else None
