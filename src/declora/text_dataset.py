"""The dataset every loader returns (texts with integer labels) and its seeded splits and limits.

Splits and limits are seeded through ``declora.seeding`` so that every process builds the same data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from declora.seeding import numpy_rng


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make field-wise == ambiguous
class TextDataset:
    """Texts with integer labels; ``groups`` (e.g. a movie id) keep related examples together in splits."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64 in 0..num_labels-1
    label_names: tuple[str, ...]
    groups: np.ndarray | None = None  # (N,) int64
    clients: np.ndarray | None = None  # (N,) int64: the row's value of partition.column, as an index
    responses: list[str] | None = None  # task.kind=instruction: the answers (texts: the prompt turns, JSON)
    pairs: list[str] | None = None  # data.pair_column: each row's second text (sentence-pair tasks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in 0..{len(self.label_names) - 1} ({self.label_names})")
        if self.groups is not None and len(self.groups) != len(self.labels):
            raise ValueError(f"{len(self.groups)} groups but {len(self.labels)} labels")
        if self.pairs is not None and len(self.pairs) != len(self.texts):
            raise ValueError(f"{len(self.pairs)} second texts but {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def in_order(self, names: tuple[str, ...]) -> TextDataset:
        """The same rows with the labels numbered as ``names`` (the same names, in another order) number
        them: label k becomes the id of its name in ``names``."""
        ids = np.array([names.index(name) for name in self.label_names], dtype=np.int64)  # old id -> new
        return TextDataset(
            self.texts, ids[self.labels], names, self.groups, self.clients, self.responses, self.pairs
        )

    def subset(self, idx: np.ndarray) -> TextDataset:
        """The examples at ``idx``, in that order (label names kept, so label ids stay comparable)."""
        idx = np.asarray(idx, dtype=np.int64)
        groups = None if self.groups is None else self.groups[idx]
        clients = None if self.clients is None else self.clients[idx]
        responses = None if self.responses is None else [self.responses[i] for i in idx]
        texts = [self.texts[i] for i in idx]
        pairs = None if self.pairs is None else [self.pairs[i] for i in idx]
        return TextDataset(texts, self.labels[idx], self.label_names, groups, clients, responses, pairs)


# ---------------------------------------------------------------- seeded splits


def _check_fraction(fraction: float, key: str) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.{key}={fraction} must be strictly between 0 and 1")


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, key: str = "test_fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): each label contributes round(fraction * its count) examples to test.
    ``key``: the config key of the fraction (the test or the validation rows: each its own draw)."""
    _check_fraction(fraction, key)
    rng = numpy_rng(seed, "data", "split" if key == "test_fraction" else key)
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        test.append(idx[: int(round(fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def group_split(
    groups: np.ndarray, fraction: float, seed: int, key: str = "test_fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) holding out round(fraction * #groups) whole groups, so test groups are unseen."""
    _check_fraction(fraction, key)
    rng = numpy_rng(seed, "data", "group_split" if key == "test_fraction" else f"group_{key}")
    unique = np.unique(groups)
    n_test = max(1, int(round(fraction * len(unique))))
    test_groups = rng.choice(unique, size=n_test, replace=False)
    in_test = np.isin(groups, test_groups)
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def limit(ds: TextDataset, limit: int | None, seed: int, purpose: str) -> TextDataset:
    """A seeded random subset of ``limit`` examples (original order kept), or ``ds`` if it is small enough."""
    if limit is not None and limit <= 0:
        raise ValueError(f"data.{purpose}={limit} must be a positive integer or null")
    if limit is None or limit >= len(ds):
        return ds
    keep = numpy_rng(seed, "data", purpose).choice(len(ds), size=limit, replace=False)
    return ds.subset(np.sort(keep))
