"""Text datasets: the shipped corpora or a user's data (declora.user_data), then the train/test limits;
and tokenization.

Every loader returns a ``(train, test)`` pair of ``TextDataset`` (declora.text_dataset) with labels
already mapped to ``0..K-1``; partitioning across nodes happens later (``declora.partition``), on the train
labels only.
"""

from __future__ import annotations

import bz2
import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from declora.assets import HUB_ID, data_path
from declora.config import ConfigError, DataConfig
from declora.tables import COMPRESSED, TABLE_SUFFIXES, file_format, is_table, read_text, relative_note
from declora.text_dataset import TextDataset, group_split, limit, stratified_split
from declora.user_data import load_instructions, load_text_file, load_user_file

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- shipped corpora


def load_rotten_tomatoes(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
    """Critic snippets labelled rotten (0) / fresh (1), split by movie so that test movies are unseen.

    Plot summaries are dropped, and so are repeated snippets (first occurrence kept): a snippet that
    appears under two movies would otherwise leak across the split.
    """
    texts, labels, movies, seen = [], [], [], set()
    with bz2.open(data_path("rotten_tomatoes"), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("rotten", "fresh") or row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(int(row["category"] == "fresh"))
            movies.append(row["movie_name"])
    names = sorted(set(movies))
    ids = {m: i for i, m in enumerate(names)}
    groups = np.array([ids[m] for m in movies], dtype=np.int64)
    ds = TextDataset(texts, np.array(labels), ("rotten", "fresh"), groups)
    train_idx, test_idx = group_split(groups, cfg.test_fraction, seed)
    return ds.subset(train_idx), ds.subset(test_idx)


def load_bbc_news(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
    """BBC news articles, one topic label per folder (sorted folder names), stratified seeded split.
    The corpus holds 98 articles twice (each under one topic): the second copy is dropped (2,127 remain),
    so that no held-out article is also a training one."""
    root = data_path("bbc_news")
    label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")))
    texts, labels, seen = [], [], set()
    for label, name in enumerate(label_names):
        for file in sorted((root / name).glob("*.txt")):
            text = read_text(file).strip()
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    ds = TextDataset(texts, np.array(labels), label_names)
    train_idx, test_idx = stratified_split(ds.labels, cfg.test_fraction, seed)
    return ds.subset(train_idx), ds.subset(test_idx)


DATASETS: dict[str, Callable[[DataConfig, int], tuple[TextDataset, TextDataset]]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "bbc_news": load_bbc_news,
}


def load_dataset(
    cfg: DataConfig,
    seed: int,
    client_column: str | None = None,
    instruction: bool = False,
    unlabelled: bool = False,
) -> tuple[TextDataset, TextDataset]:
    """(train, test) for ``cfg.dataset``: a shipped name or a user's table, then train/test limits applied.
    ``client_column`` (partition.kind=column) is read into ``train.clients``; ``unlabelled`` (language
    modelling): a table may lack the label column."""
    # A missing file, named by its key (a data.dataset of another suffix is refused below, as such).
    named = [("data.test_file", cfg.test_file)]
    if file_format(cfg.dataset) in (*TABLE_SUFFIXES, ".txt"):
        named.append(("data.dataset", cfg.dataset))
    for key, source in named:
        if source is not None and not Path(source).expanduser().exists():
            raise FileNotFoundError(
                f"{key}={source!r} does not exist{relative_note(Path(source).expanduser())}"
            )
    if client_column is not None and cfg.dataset in DATASETS:
        raise ConfigError(
            f"partition.kind=column reads partition.column from a user's table; data.dataset={cfg.dataset!r} "
            "is a shipped corpus without one"
        )
    if instruction:
        if not is_table(cfg.dataset):
            raise ConfigError(
                f"task.kind=instruction reads a table (JSONL, parquet, ...); got data.dataset={cfg.dataset!r}"
            )
        train, test = load_instructions(cfg, seed)
    elif cfg.dataset in DATASETS:
        train, test = DATASETS[cfg.dataset](cfg, seed)
    elif file_format(cfg.dataset) == ".txt":
        train, test = load_text_file(cfg, seed)
    elif is_table(cfg.dataset):
        train, test = load_user_file(cfg, seed, client_column, unlabelled)
    else:
        hub = (  # "imdb", "stanfordnlp/sst2": a hub dataset, which declora does not download
            f"; declora never downloads: load it once where there is a network (`datasets.load_dataset("
            f"{cfg.dataset!r})` keeps its files in the Hugging Face cache, which declora then reads), or "
            "save it with save_to_disk(FOLDER) and pass data.dataset=FOLDER"
            if HUB_ID.fullmatch(cfg.dataset) and not file_format(cfg.dataset)
            else ""
        )
        raise ConfigError(
            f"data.dataset={cfg.dataset!r} is neither a shipped dataset {sorted(DATASETS)}, a file ending in "
            f"{[*TABLE_SUFFIXES, '.txt']} (text formats also {' / '.join(COMPRESSED)} compressed), a "
            f"datasets save_to_disk folder nor a dataset in the Hugging Face cache{hub}"
        )
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"data.dataset={cfg.dataset!r} split into {len(train)} train and {len(test)} test examples "
            f"at data.test_fraction={cfg.test_fraction}; both must be non-empty"
        )
    train = limit(train, cfg.train_limit, seed, "train_limit")
    test = limit(test, cfg.test_limit, seed, "test_limit")
    _warn_held_out_repeats(train, test, cfg.dataset)
    return train, test


def _warn_held_out_repeats(train: TextDataset, test: TextDataset, source: str) -> None:
    """A table that holds one text several times can put a copy on each side of the split (or a test file
    can repeat training rows): those held-out scores are of examples the model trained on. Said, with the
    count, since the split cannot know which copy was meant (the shipped corpora hold none)."""

    def rows(ds: TextDataset) -> list[tuple[str, str, str]]:
        blank = [""] * len(ds.texts)
        return list(zip(ds.texts, ds.responses or blank, ds.pairs or blank, strict=True))

    seen = set(rows(train))
    repeated = sum(row in seen for row in rows(test))
    if repeated:
        log.warning(
            "%d of the %d held-out examples of data.dataset=%r are also training examples (the same text): "
            "their scores are not held out; remove the repeated rows, or give a data.test_file without them",
            repeated,
            len(test),
            source,
        )


def tokenize(
    texts: Sequence[str], tokenizer: Any, max_length: int, pairs: Sequence[str] | None = None
) -> list[list[int]]:
    """Input ids per text (per pair (text, pairs[i]) when ``pairs``, joined as the tokenizer joins two
    sentences: BERT's [CLS] a [SEP] b [SEP]), truncated to ``max_length`` (the longer text first) and NOT
    padded: training pads per micro-batch, so a batch of short texts costs short sequences."""
    second = None if pairs is None else list(pairs)
    enc = tokenizer(list(texts), second, truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def count_cut(
    texts: Sequence[str],
    rows: Sequence[Sequence[int]],
    tokenizer: Any,
    max_length: int,
    pairs: Sequence[str] | None = None,
) -> int:
    """How many of ``texts`` (pairs) ``tokenize`` cut short: only rows that reached the limit can have
    been cut, so only those are tokenized again, whole."""
    at_limit = [i for i, row in enumerate(rows) if len(row) >= max_length]
    if not at_limit:
        return 0
    second = None if pairs is None else [pairs[i] for i in at_limit]
    # verbose=False: no warning about the length
    whole = tokenizer([texts[i] for i in at_limit], second, padding=False, verbose=False)["input_ids"]
    return sum(len(ids) > max_length for ids in whole)
