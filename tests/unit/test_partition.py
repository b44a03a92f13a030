"""Partitioners on small synthetic label arrays: disjoint, seeded, and skewed the way each one promises."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from declora.config import PartitionConfig
from declora.partition import (
    ADF_TAD_BINARY,
    ADF_TAD_MNLI,
    PARTITIONERS,
    describe_partition,
    partition,
)

pytestmark = pytest.mark.unit


def synthetic_labels(n: int = 600, k: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n)


def cfg_for(kind: str, **kw: object) -> PartitionConfig:
    if kind == "proportions" and "proportions" not in kw:
        kw["proportions"] = ((0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8), (1 / 3, 1 / 3, 1 / 3))
    return PartitionConfig(kind=kind, **kw)  # type: ignore[arg-type]


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray, k: int) -> float:
    ents = []
    for p in parts:
        q = np.bincount(labels[p], minlength=k) / len(p)
        q = q[q > 0]
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


@pytest.mark.parametrize("kind", sorted(PARTITIONERS))
def test_disjoint_nonempty_and_deterministic(kind: str) -> None:
    labels = synthetic_labels()
    cfg = cfg_for(kind)
    parts = partition(labels, 4, cfg, seed=1)
    assert len(parts) == 4
    assert all(len(p) >= 1 and p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)  # disjoint
    assert flat.min() >= 0 and flat.max() < len(labels)
    again = partition(labels, 4, cfg, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 4, cfg, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards", "quantity_skew"])
def test_covers_every_example(kind: str) -> None:
    labels = synthetic_labels()
    parts = partition(labels, 5, cfg_for(kind), seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_parts_are_shuffled_not_sorted() -> None:
    parts = partition(synthetic_labels(), 3, cfg_for("iid"), seed=0)
    assert not all(np.array_equal(p, np.sort(p)) for p in parts)


def test_iid_sizes_near_equal() -> None:
    sizes = [len(p) for p in partition(synthetic_labels(n=603), 4, cfg_for("iid"), seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_min_size_respected() -> None:
    labels = synthetic_labels(n=400, k=2)
    parts = partition(labels, 8, cfg_for("dirichlet", alpha=0.3, min_size=20), seed=0)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_smaller_alpha_more_skew() -> None:
    labels = synthetic_labels(n=1000, k=4)
    ents = {}
    for alpha in (0.1, 100.0):
        cfg = cfg_for("dirichlet", alpha=alpha, min_size=1)
        ents[alpha] = np.mean([mean_label_entropy(partition(labels, 6, cfg, s), labels, 4) for s in range(5)])
    assert ents[0.1] < ents[100.0] - 0.3
    assert ents[100.0] > 0.95 * np.log(4)  # large alpha is close to iid


def test_dirichlet_impossible_setting_names_values() -> None:
    labels = synthetic_labels(n=100, k=2)
    with pytest.raises(ValueError, match=r"alpha=0\.001.*100 examples"):
        partition(labels, 10, cfg_for("dirichlet", alpha=0.001, min_size=5), seed=0)
    with pytest.raises(ValueError, match="min_size=50"):
        partition(labels, 10, cfg_for("dirichlet", min_size=50), seed=0)


@pytest.mark.parametrize(
    ("n", "counts", "size", "skewed"),
    [
        (100, [50, 50], 10, (9, 1)),  # floor(50 / 5) = 10 = n // 10; 10 * 0.9 = 9
        # label 1 allows floor(491 / 5) = 98 < n // 10 = 100; 98 * 0.9 = 88.2 and 98 * 0.1 = 9.8 round
        # (largest remainder) to 88 and 10, so label 1 gives 3 * 10 + 3 * 88 + 4 * 49 = 490 of its 491
        (1000, [509, 491], 98, (88, 10)),
    ],
)
def test_proportions_match_request(n: int, counts: list[int], size: int, skewed: tuple[int, int]) -> None:
    """ADF_TAD_BINARY asks 3 nodes for 0.9/0.1, 3 for 0.1/0.9 and 4 for 0.5/0.5, so one unit of node size
    takes 3 * 0.9 + 3 * 0.1 + 4 * 0.5 = 5 examples of each label: the size is the largest that the
    scarcer label allows (and at most n // 10), and each node's label counts are size * p rounded."""
    labels = synthetic_labels(n=n, k=2, seed=3)
    assert np.bincount(labels).tolist() == counts
    parts = partition(labels, 10, cfg_for("proportions", proportions=ADF_TAD_BINARY), seed=0)
    assert [len(p) for p in parts] == [size] * 10
    half = (size // 2, size - size // 2)
    want = [skewed] * 3 + [skewed[::-1]] * 3 + [half] * 4
    assert [tuple(np.bincount(labels[p], minlength=2).tolist()) for p in parts] == want


def test_proportions_size_capped_by_scarce_label() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    cfg = cfg_for("proportions", proportions=((0.5, 0.5), (0.5, 0.5)))
    parts = partition(labels, 2, cfg, seed=0)
    assert [len(p) for p in parts] == [100, 100]  # label 1 has 100: 50 each, not floor(1000 / 2)
    assert all(np.bincount(labels[p]).tolist() == [50, 50] for p in parts)


def test_a_non_finite_proportion_is_named() -> None:
    cfg = cfg_for("proportions", proportions=((float("nan"), 1.0), (0.5, 0.5)))
    with pytest.raises(ValueError, match=r"proportions\[0\]=\[nan, 1.0\] must be finite, non-negative"):
        partition(np.array([0, 1] * 50), 2, cfg, seed=0)


def test_mnli_preset_three_classes() -> None:
    labels = synthetic_labels(n=900, k=3)
    parts = partition(labels, 10, cfg_for("proportions", proportions=ADF_TAD_MNLI), seed=0)
    hist = describe_partition(parts, labels, 3)
    assert [int(np.argmax(h["label_counts"])) for h in hist] == [0] * 4 + [1] * 3 + [2] * 3


@pytest.mark.parametrize(
    ("props", "pattern"),
    [
        (((0.5, 0.5),), r"1 distributions but nodes=2"),
        (((0.5, 0.5), (0.5, 0.4)), r"proportions\[1\]=\[0\.5, 0\.4\].*sum to 1"),
        (((0.5, 0.5), (0.3, 0.3, 0.4)), r"proportions\[1\].*3 entries.*2 values"),
        (((1.2, -0.2), (0.5, 0.5)), r"proportions\[0\].*non-negative"),
    ],
)
def test_proportions_errors_name_bad_node(props: tuple, pattern: str) -> None:
    labels = synthetic_labels(n=100, k=2)
    with pytest.raises(ValueError, match=pattern):
        partition(labels, 2, cfg_for("proportions", proportions=props), seed=0)


def test_proportions_missing() -> None:
    with pytest.raises(ValueError, match="needs partition.proportions"):
        partition(synthetic_labels(), 2, PartitionConfig(kind="proportions"), seed=0)


def test_shards_few_labels_per_node() -> None:
    labels = np.repeat(np.arange(10), 20)  # 10 labels x 20
    parts = partition(labels, 10, cfg_for("shards", shards_per_node=2), seed=0)
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_quantity_skew_sizes_vary_labels_mixed() -> None:
    labels = synthetic_labels(n=1000, k=2)
    parts = partition(labels, 5, cfg_for("quantity_skew", alpha=0.5, min_size=30), seed=0)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 30 and sum(sizes) == 1000
    assert max(sizes) > 2 * min(sizes)


def test_describe_partition() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    out = describe_partition([np.array([0, 1]), np.array([2, 3, 4, 5])], labels, 4)
    assert out == [
        {"node": 0, "size": 2, "label_counts": [1, 1, 0, 0]},
        {"node": 1, "size": 4, "label_counts": [0, 1, 3, 0]},
    ]


def test_bad_arguments_named() -> None:
    labels = synthetic_labels(n=10)
    with pytest.raises(ValueError, match="nodes=11"):
        partition(labels, 11, cfg_for("iid"), seed=0)
    with pytest.raises(ValueError, match="'nope'.*iid"):
        partition(labels, 2, dataclasses.replace(cfg_for("iid"), kind="nope"), seed=0)
    with pytest.raises(ValueError, match="shards_per_node=6"):
        partition(labels, 2, cfg_for("shards", shards_per_node=6), seed=0)


def _column_cfg(**kw: object) -> PartitionConfig:
    return PartitionConfig(kind="column", column="user", **kw)  # type: ignore[arg-type]


def test_column_one_node_per_value_in_sorted_order() -> None:
    clients = np.array([2, 0, 1, 2, 2, 0, 1, 1, 1])
    parts = partition(np.zeros(9, dtype=np.int64), 3, _column_cfg(), seed=0, clients=clients)
    assert [sorted(p.tolist()) for p in parts] == [[1, 5], [2, 6, 7, 8], [0, 3, 4]]


def test_column_merges_extra_values_seeded_and_balanced() -> None:
    rng = np.random.default_rng(0)
    clients = rng.integers(0, 40, size=2000)  # 40 users onto 6 nodes
    labels = np.zeros(2000, dtype=np.int64)
    parts = partition(labels, 6, _column_cfg(), seed=3, clients=clients)
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    values = [set(clients[p].tolist()) for p in parts]
    assert all(not (a & b) for i, a in enumerate(values) for b in values[i + 1 :])  # a user stays whole
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= np.bincount(clients).max()  # greedy: within one user's rows
    again = partition(labels, 6, _column_cfg(), seed=3, clients=clients)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 6, _column_cfg(), seed=4, clients=clients)
    assert [set(clients[p].tolist()) for p in other] != values


def test_column_cap_and_too_few_values() -> None:
    from declora.config import ConfigError

    clients = np.repeat(np.arange(3), [50, 5, 20])
    parts = partition(np.zeros(75, dtype=np.int64), 3, _column_cfg(max_per_node=10), seed=0, clients=clients)
    assert [len(p) for p in parts] == [10, 5, 10]
    assert all(set(clients[p].tolist()) == {i} for i, p in enumerate(parts))
    with pytest.raises(ConfigError, match=r"partition.column='user' has 3 distinct values .* nodes=4"):
        partition(np.zeros(75, dtype=np.int64), 4, _column_cfg(), seed=0, clients=clients)


def test_proportions_take_one_entry_per_label_of_the_dataset_also_one_no_row_has() -> None:
    """With 3 label names and no training row of the last, 2 entries were demanded (from the largest id)."""
    labels = np.array([0, 1] * 50)
    cfg = cfg_for("proportions", proportions=((1.0, 0.0, 0.0), (0.5, 0.5, 0.0)))
    parts = partition(labels, 2, cfg, seed=0, num_labels=3)
    assert [np.bincount(labels[p], minlength=3).tolist() for p in parts] == [[33, 0, 0], [17, 16, 0]]
    with pytest.raises(ValueError, match=r"2 entries but the labels take 3 values"):
        partition(
            labels, 2, cfg_for("proportions", proportions=((1.0, 0.0), (0.5, 0.5))), seed=0, num_labels=3
        )


def test_a_missing_partition_column_value_is_named_by_its_file_line(tmp_path) -> None:
    """It said "row 0 of 'users.csv'", a 0-based row where every other table error gives file:line."""
    from declora.config import DataConfig
    from declora.user_data import read_rows

    table = tmp_path / "users.csv"
    table.write_text("text,label,user\ngood,1,\nbad,0,u2\n")
    with pytest.raises(ValueError, match=r"users.csv:2: no value in column 'user' \(partition.column\)"):
        read_rows(str(table), "train", DataConfig(), client_column="user")


def test_a_json_file_wrapping_its_rows_in_one_object_gets_the_layout_in_the_error(tmp_path) -> None:
    from declora.config import ConfigError, DataConfig
    from declora.user_data import read_rows

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]}))
    with pytest.raises(
        ConfigError, match=r"found \['data'\] \(the file is one object around the rows: a \.json"
    ):
        read_rows(str(wrapped), "train", DataConfig())
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"review": "good", "label": 1}]))
    with pytest.raises(ConfigError, match=r"found \['label', 'review'\]$"):  # a real other column: no hint
        read_rows(str(rows), "train", DataConfig())


def test_min_size_beyond_the_data_says_which_examples_it_counts() -> None:
    with pytest.raises(
        ValueError, match=r"exceeds the 40 training examples \(those left after data.train_limit"
    ):
        partition(np.array([0, 1] * 20), 4, cfg_for("dirichlet", min_size=20), seed=0)
