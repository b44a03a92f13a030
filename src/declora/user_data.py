"""A user's data: a table (CSV, JSON(L), parquet, Arrow, save_to_disk folder, read by ``datasets``
through declora.tables) with a text and a label column, instruction pairs or chats, or a plain text
file. Label values become ids ``0..K-1`` in their sorted order; held-out rows come from a test file, a
named split or a seeded part of the training rows (``held_out_source``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from declora.config import ConfigError, DataConfig
from declora.tables import (
    class_names,
    column,
    has_splits,
    open_split,
    read_text,
    relative_note,
    row_line,
    splits_of,
)
from declora.text_dataset import TextDataset, stratified_split

log = logging.getLogger(__name__)


def label_order(values: Sequence[str]) -> tuple[str, ...]:
    """Distinct labels in sorted order; numerically when all look like numbers (so '10' follows '9')."""
    distinct = set(values)
    for number in (int, float):
        try:
            return tuple(sorted(distinct, key=number))
        except ValueError:
            continue
    return tuple(sorted(distinct))


def _label_texts(values: Sequence[Any]) -> list[str]:
    """Label cells as the texts they are known by; a column of whole floats as integers (tables written
    by pandas often hold integer labels as floats), so 1.0 is class "1" and 10.0 sorts after 2.0."""
    if values and all(isinstance(v, float) and v.is_integer() for v in values):
        return [str(int(v)) for v in values]
    return [str(v).strip() for v in values]


@dataclass(frozen=True)
class Rows:
    """One split's columns as read: label values as strings, the ClassLabel names when the column has them."""

    texts: list[str]
    labels: list[str]
    names: tuple[str, ...] | None
    clients: list[str] | None  # partition.column's values (kind=column)
    where: str
    pairs: list[str] | None = None  # data.pair_column's texts (sentence-pair tasks)


def read_rows(
    source: str,
    split: str,
    cfg: DataConfig,
    client_column: str | None = None,
    key: str = "",
    unlabelled: bool = False,
) -> Rows:
    """``unlabelled`` (language modelling): a table without the label column is read as one label, "text"."""
    table = open_split(source, split, key or "data.split", _subset_of(source, cfg))
    where = f"{source!r} (split {split!r})"
    texts = [str(t) for t in column(table, cfg.text_column, "data.text_column", where, source)]
    pairs = None
    if cfg.pair_column is not None:
        pairs = [str(t) for t in column(table, cfg.pair_column, "data.pair_column", where, source)]
    clients = None
    if client_column is not None:
        clients = [str(v) for v in column(table, client_column, "partition.column", where, source)]
    if unlabelled and cfg.label_column not in table.column_names:
        return Rows(texts, ["text"] * len(texts), None, clients, where)
    raw = column(table, cfg.label_column, "data.label_column", where, source)
    names = class_names(table, cfg.label_column)
    if names is not None:
        bad = next((i for i, v in enumerate(raw) if not 0 <= int(v) < len(names)), None)
        if bad is not None:
            raise ValueError(f"row {bad} of {where} has label {raw[bad]}, not one of 0..{len(names) - 1}")
    labels = [names[int(v)] for v in raw] if names else _label_texts(raw)
    if names is None:
        _refuse_mixed_labels(labels, source, cfg.label_column)
    return Rows(texts, labels, names, clients, where, pairs)


def _subset_of(source: str, cfg: DataConfig) -> str | None:
    """data.subset applies to data.dataset, not to a held-out file."""
    return cfg.subset if source == cfg.dataset else None


def looks_like_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _refuse_mixed_labels(labels: list[str], source: str, name: str) -> None:
    """Labels are either class ids or class names: a word among ids ("nan", "N/A", "?") is a missing or
    mistyped label, and taking it as one more class would train a silently wrong classifier."""
    is_int = [looks_like_int(v) for v in labels]
    ints = sum(is_int)
    if 0 < ints < len(labels):
        odd = next(i for i, k in enumerate(is_int) if k != (2 * ints >= len(labels)))
        kind = "a word among class ids" if 2 * ints >= len(labels) else "an id among class names"
        raise ValueError(
            f"{row_line(source, odd)}: label {labels[odd]!r} in column {name!r} (data.label_column) is "
            f"{kind}; a label column holds either integers or names, not both"
        )


def encode_rows(rows: Rows, names: tuple[str, ...]) -> TextDataset:
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(rows.labels) - set(ids))
    if unknown:
        raise ValueError(f"labels {unknown} in {rows.where} do not occur in the training data {list(names)}")
    clients = None
    if rows.clients is not None:
        order = label_order(rows.clients)  # numerically when all are numbers: user 2 before user 10
        index = {c: i for i, c in enumerate(order)}
        clients = np.array([index[c] for c in rows.clients], dtype=np.int64)
    labels = np.array([ids[v] for v in rows.labels])
    return TextDataset(rows.texts, labels, names, clients=clients, pairs=rows.pairs)


def held_out_source(cfg: DataConfig) -> tuple[str, str] | None:
    """Where the held-out examples come from: data.test_file, a named split (data.test_split, or the
    source's own "test" split), or None for a seeded split of the training rows."""
    if cfg.test_file is not None:
        held = cfg.test_file, test_file_split(cfg)
    elif cfg.test_split is not None:
        held = cfg.dataset, cfg.test_split
    else:
        # a plain file: "train" alone
        splits = splits_of(cfg.dataset, cfg.subset) if has_splits(cfg.dataset) else {}
        if cfg.split != "test" and "test" in splits:
            return cfg.dataset, "test"
        if cfg.split != "validation" and "validation" in splits:  # held out by the rule, but say so
            log.warning(
                "data.dataset=%r has a 'validation' split but no 'test' one: the held-out rows are a seeded "
                "%g of the training rows (data.test_fraction); data.test_split=validation scores that split",
                cfg.dataset,
                cfg.test_fraction,
            )
        return None
    refuse_training_rows(held, [(cfg.dataset, cfg.split)])
    return held


def test_file_split(cfg: DataConfig) -> str:
    """The split of data.test_file that is held out: data.test_split, else the folder's "test" split
    when it is a saved DatasetDict with one (as for data.dataset), else "train" (a file's one split)."""
    if cfg.test_split is not None:
        return cfg.test_split
    assert cfg.test_file is not None  # called only when data.test_file is set
    path = Path(cfg.test_file).expanduser()
    return "test" if path.is_dir() and "test" in splits_of(path) else "train"


def refuse_training_rows(
    held: tuple[str, str], training: Sequence[tuple[str, str]], key: str = "data.dataset"
) -> None:
    """A held-out split that is a training split would score the model on the rows it trained on."""
    if any(_same_file(held[0], source) and held[1] == split for source, split in training):
        raise ConfigError(
            f"the held-out examples (data.test_file / data.test_split: split {held[1]!r} of {held[0]!r}) are "
            f"training rows ({key}, data.split); name another split or file"
            + (", or neither to hold out a seeded part of the training rows" if key == "data.dataset" else "")
        )


def _same_file(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def read_instructions(source: str, split: str, cfg: DataConfig, key: str = "data.split") -> TextDataset:
    """Prompt turns (JSON lists of {role, content}) and responses: from the messages column when the
    table has one (the last message is the assistant's answer), else the prompt and response columns;
    prompt and response columns named in the config win over a messages column."""
    table = open_split(source, split, key, _subset_of(source, cfg))
    where = f"{source!r} (split {split!r})"
    defaults = DataConfig()
    named = (cfg.prompt_column, cfg.response_column) != (defaults.prompt_column, defaults.response_column)
    if cfg.messages_column in table.column_names and not named:
        chats = column(table, cfg.messages_column, "data.messages_column", where, source, nested=True)
        for i, chat in enumerate(chats):
            _check_chat(chat, f"{row_line(source, i)}: {cfg.messages_column!r}")
        prompts = [json.dumps(chat[:-1]) for chat in chats]
        responses = [chat[-1]["content"] for chat in chats]
    else:
        asked = column(table, cfg.prompt_column, "data.prompt_column", where, source)
        prompts = [json.dumps([{"role": "user", "content": str(p)}]) for p in asked]
        # an empty answer is kept (and warned about when encoded), as an empty assistant message is
        answers = column(table, cfg.response_column, "data.response_column", where, source, blank=True)
        responses = [str(r) for r in answers]
    return TextDataset(prompts, np.zeros(len(prompts), dtype=np.int64), ("text",), responses=responses)


def _check_chat(chat: object, what: str) -> None:
    """One row's conversation: prompt turns, then the assistant's answer, each a {role, content} of strings.
    Checked here, whatever the tokenizer: a chat template would render a missing field as empty text."""
    if not isinstance(chat, list) or not chat:
        raise ValueError(f"{what} must be a non-empty list of {{role, content}} messages, not {chat!r:.60}")
    for j, message in enumerate(chat):
        fields = message if isinstance(message, dict) else {}
        if not all(isinstance(fields.get(k), str) for k in ("role", "content")):
            raise ValueError(
                f"{what}: message {j} needs a string 'role' and a string 'content'; it is {message!r:.80}"
            )
    if chat[-1]["role"] != "assistant":
        raise ValueError(f"{what} must end with an assistant message (the answer to train on)")
    if len(chat) == 1:
        raise ValueError(f"{what} has no prompt turn before the assistant's answer")


def load_instructions(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
    train = read_instructions(cfg.dataset, cfg.split, cfg)
    held = held_out_source(cfg)
    if held is not None:
        return train, read_instructions(*held, cfg, key="data.test_split")
    train_idx, test_idx = stratified_split(train.labels, cfg.test_fraction, seed)
    return train.subset(train_idx), train.subset(test_idx)


def load_user_file(
    cfg: DataConfig, seed: int, client_column: str | None = None, unlabelled: bool = False
) -> tuple[TextDataset, TextDataset]:
    """A table (declora.tables) split ``cfg.split``; the test rows per ``held_out_source``."""
    rows = read_rows(cfg.dataset, cfg.split, cfg, client_column, unlabelled=unlabelled)
    names = rows.names or label_order(rows.labels)
    train = encode_rows(rows, names)
    held = held_out_source(cfg)
    if held is None:
        train_idx, test_idx = stratified_split(train.labels, cfg.test_fraction, seed)
        return train.subset(train_idx), train.subset(test_idx)
    try:
        return train, encode_rows(read_rows(*held, cfg, key="data.test_split", unlabelled=unlabelled), names)
    except ValueError as err:
        if cfg.test_file is not None or cfg.test_split is not None:
            raise
        raise ValueError(  # the user never named this split: say where it came from and how to change it
            f"{err}; the held-out rows are the folder's own 'test' split, taken because no other was "
            "named: if its labels are hidden (GLUE's are -1), name another, e.g. data.test_split=validation"
        ) from err


def _paragraphs(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist{relative_note(path)}")
    # a line of spaces or tabs separates paragraphs as an empty one does (edited prose often keeps them)
    blocks = (" ".join(b.split()) for b in re.split(r"\n[ \t\r\f\v]*\n", read_text(path)))
    return [b for b in blocks if b]


def load_text_file(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset]:
    """Plain text for causal language modelling: one example per paragraph (blank-line separated), all
    with the one label "text"; ``cfg.test_file`` (another .txt) or a seeded split holds out paragraphs."""
    path = Path(cfg.dataset).expanduser()
    texts = _paragraphs(path)
    if not texts:
        raise ValueError(f"data file {str(path)!r} holds no text")
    train = TextDataset(texts, np.zeros(len(texts), dtype=np.int64), ("text",))
    if cfg.test_file is not None:
        refuse_training_rows((cfg.test_file, "train"), [(cfg.dataset, "train")])
        held = _paragraphs(Path(cfg.test_file).expanduser())
        return train, TextDataset(held, np.zeros(len(held), dtype=np.int64), ("text",))
    train_idx, test_idx = stratified_split(train.labels, cfg.test_fraction, seed)
    return train.subset(train_idx), train.subset(test_idx)
