"""A user's table through Hugging Face ``datasets``: CSV/TSV, JSON/JSONL, parquet, Arrow, save_to_disk.

``datasets`` does the reading (encodings such as a UTF-8 byte-order mark, types, memory-mapped Arrow), so
declora only picks the split and the columns. Everything is local: the packaged builders and
``load_from_disk`` never reach a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from declora.config import ConfigError

# suffix -> (datasets builder, its keyword arguments)
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
TABLE_SUFFIXES = tuple(BUILDERS)
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes


def is_table(source: str | Path) -> bool:
    path = Path(source).expanduser()
    return path.suffix in BUILDERS or (path.is_dir() and is_saved_dataset(path))


def is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in SAVED_MARKERS)


def _quiet() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def splits_of(source: str | Path) -> dict[str, Any]:
    """Every split the source holds, by name: a plain file is one split, "train"."""
    datasets = _quiet()
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        if not is_saved_dataset(path):
            raise ConfigError(
                f"data folder {str(path)!r} is not a datasets save_to_disk folder "
                f"(no {' / '.join(SAVED_MARKERS)})"
            )
        saved = datasets.load_from_disk(str(path))
        return dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    if path.suffix not in BUILDERS:
        raise ConfigError(f"data file {str(path)!r}: suffix {path.suffix!r} is not one of {list(BUILDERS)}")
    builder, kwargs = BUILDERS[path.suffix]
    return {"train": datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)}


def open_split(source: str | Path, split: str, key: str = "data.split") -> Any:
    """One ``datasets.Dataset``; an unknown split is an error naming the ones there are."""
    found = splits_of(source)
    if split not in found:
        raise ConfigError(f"{key}={split!r} is not a split of {str(source)!r}; it has {sorted(found)}")
    if len(found[split]) == 0:
        raise ValueError(f"split {split!r} of {str(source)!r} holds no rows")
    return found[split]


def column(table: Any, name: str, key: str, where: str) -> list[Any]:
    """The values of one column; a missing column or an empty cell is an error naming it."""
    if name not in table.column_names:
        raise ConfigError(f"{key}={name!r} is not a column of {where}; found {sorted(table.column_names)}")
    values = list(table[name])
    for i, v in enumerate(values):
        if v is None or v == "":
            raise ValueError(f"row {i} of {where} has no value in column {name!r}")
    return values


def class_names(table: Any, name: str) -> tuple[str, ...] | None:
    """The label names of a ``ClassLabel`` column (ids index them), else None."""
    feature = table.features.get(name)
    names = getattr(feature, "names", None)
    return tuple(names) if names else None
