"""Split a training set across nodes: iid, Dirichlet label skew, fixed label proportions, shards, size skew,
or the natural partition by a column (a user or client id).

Label partitioners work on the label column alone and return one index array per node (disjoint, shuffled).
All randomness comes from ``numpy_rng(seed, "partition", ...)``, so every process derives the same split
without talking. A node with no data cannot train, so every partitioner either gives each node at least one
example or raises an error that names the setting to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from declora.config import ConfigError, PartitionConfig
from declora.seeding import numpy_rng

Partitioner = Callable[[np.ndarray, int, PartitionConfig, int], list[np.ndarray]]

# ADF-LoRA / TAD-LoRA label skew over 10 clients (arXiv 2511.18291, 2602.00451).
ADF_TAD_BINARY: tuple[tuple[float, ...], ...] = ((0.9, 0.1),) * 3 + ((0.1, 0.9),) * 3 + ((0.5, 0.5),) * 4
ADF_TAD_MNLI: tuple[tuple[float, ...], ...] = (
    ((0.9, 0.05, 0.05),) * 4 + ((0.05, 0.9, 0.05),) * 3 + ((0.05, 0.05, 0.9),) * 3
)
DIRICHLET_MAX_TRIES = 1000


def iid(labels: np.ndarray, n_nodes: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """A random permutation cut into ``n_nodes`` near-equal pieces (sizes differ by at most one)."""
    perm = numpy_rng(seed, "partition", "iid").permutation(len(labels))
    return list(np.array_split(perm, n_nodes))


def _dirichlet_once(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each label's examples are cut among nodes by proportions drawn from Dir(alpha * 1_n)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(idx)).astype(np.int64)[:-1]
        for node, piece in enumerate(np.split(idx, cuts)):
            parts[node].append(piece)
    return [np.concatenate(p) for p in parts]


def _min_size(cfg: PartitionConfig, n_nodes: int, n_total: int) -> int:
    """cfg.min_size (at least 1: an empty node cannot train), checked to be reachable at all."""
    min_size = max(cfg.min_size, 1)
    if min_size * n_nodes > n_total:
        raise ValueError(
            f"partition.min_size={min_size} x nodes={n_nodes} exceeds the {n_total} training examples (those "
            "left after data.train_limit and the held-out part)"
        )
    return min_size


def dirichlet(labels: np.ndarray, n_nodes: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Label skew: smaller ``alpha`` concentrates each label on fewer nodes (alpha -> inf approaches iid).

    Draws are repeated, each from its own derived seed, until every node holds ``min_size`` examples; a
    setting that keeps failing (tiny alpha with many nodes and few labels) is reported rather than looped on.
    """
    if cfg.alpha <= 0:
        raise ValueError(f"partition.alpha={cfg.alpha} must be positive")
    min_size = _min_size(cfg, n_nodes, len(labels))
    for attempt in range(DIRICHLET_MAX_TRIES):
        rng = numpy_rng(seed, "partition", "dirichlet", attempt)
        parts = _dirichlet_once(labels, n_nodes, cfg.alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"dirichlet partition: no draw in {DIRICHLET_MAX_TRIES} gave every one of {n_nodes} nodes "
        f"partition.min_size={min_size} examples with partition.alpha={cfg.alpha} on {len(labels)} examples "
        f"and {len(np.unique(labels))} labels; raise alpha, lower min_size or use fewer nodes"
    )


def _check_proportions(cfg: PartitionConfig, n_nodes: int, num_labels: int) -> np.ndarray:
    """The (n_nodes, num_labels) matrix of requested label distributions, validated."""
    if cfg.proportions is None:
        raise ValueError("partition.kind='proportions' needs partition.proportions")
    if len(cfg.proportions) != n_nodes:
        raise ValueError(
            f"partition.proportions has {len(cfg.proportions)} distributions but nodes={n_nodes}; "
            "give one per node"
        )
    for node, dist in enumerate(cfg.proportions):
        if len(dist) != num_labels:
            raise ValueError(
                f"partition.proportions[{node}]={list(dist)} has {len(dist)} entries but the labels take "
                f"{num_labels} values (0..{num_labels - 1})"
            )
        if not all(math.isfinite(x) for x in dist) or min(dist) < 0 or abs(sum(dist) - 1.0) > 1e-6:
            raise ValueError(
                f"partition.proportions[{node}]={list(dist)} must be finite, non-negative and sum to 1 "
                f"(sums to {sum(dist)})"
            )
    props = np.asarray(cfg.proportions, dtype=np.float64)
    return props / props.sum(axis=1, keepdims=True)  # exact sums, so rounding never overshoots a node's size


def _round_to_total(x: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding: integers within 1 of ``x`` that sum to ``total``."""
    out = np.floor(x).astype(np.int64)
    order = np.argsort(-(x - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _allocate(props: np.ndarray, counts: np.ndarray, n_total: int) -> np.ndarray:
    """(n_nodes, num_labels) example counts: the largest equal node size that no label over-draws."""
    n_nodes = len(props)
    demand = props.sum(axis=0)  # (K,) how many node-sizes' worth of each label all nodes want together
    size = min([n_total // n_nodes] + [int(counts[c] // demand[c]) for c in np.flatnonzero(demand > 0)])
    while size > 0:  # rounding can overshoot a label by < n_nodes examples; shrink until it fits
        alloc = np.stack([_round_to_total(size * p, size) for p in props])
        if (alloc.sum(axis=0) <= counts).all():
            return alloc
        size -= 1
    raise ValueError(f"partition.proportions cannot be met: label counts {counts.tolist()} fit no size")


def proportions(
    labels: np.ndarray, n_nodes: int, cfg: PartitionConfig, seed: int, num_labels: int | None = None
) -> list[np.ndarray]:
    """Every node gets the same size with its own label distribution ``cfg.proportions[node]``.

    The size rule: start from floor(N / n_nodes) and lower it to the largest size at which the nodes'
    rounded per-label counts (largest-remainder rounding of size * p) fit in what each label has. So the
    label fractions match the request up to rounding, nodes are disjoint, and examples may be left unused.
    """
    # the dataset's labels (a class no training row has still takes its entry, 0), else those seen
    num_labels = num_labels or int(labels.max()) + 1
    props = _check_proportions(cfg, n_nodes, num_labels)
    counts = np.bincount(labels, minlength=num_labels)
    alloc = _allocate(props, counts, len(labels))  # (n, K)
    rng = numpy_rng(seed, "partition", "proportions")
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for label in range(num_labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        for node, piece in enumerate(np.split(idx, np.cumsum(alloc[:, label]))[:n_nodes]):
            parts[node].append(piece)
    return [np.concatenate(p) for p in parts]


def shards(labels: np.ndarray, n_nodes: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut n * shards_per_node shards, deal them."""
    n_shards = n_nodes * cfg.shards_per_node
    if cfg.shards_per_node < 1 or n_shards > len(labels):
        raise ValueError(
            f"partition.shards_per_node={cfg.shards_per_node} x nodes={n_nodes} shards must be between "
            f"{n_nodes} and the {len(labels)} examples"
        )
    rng = numpy_rng(seed, "partition", "shards")
    perm = rng.permutation(len(labels))
    by_label = perm[np.argsort(labels[perm], kind="stable")]  # random order within each label
    pieces = np.array_split(by_label, n_shards)
    deal = rng.permutation(n_shards).reshape(n_nodes, cfg.shards_per_node)
    return [np.concatenate([pieces[s] for s in row]) for row in deal]


def quantity_skew(labels: np.ndarray, n_nodes: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Node sizes min_size + (the rest split by Dir(alpha) proportions); which examples is iid.

    Giving every node ``min_size`` first and only the remainder by Dirichlet weights meets the minimum in one
    draw, with no resampling; all examples are used.
    """
    if cfg.alpha <= 0:
        raise ValueError(f"partition.alpha={cfg.alpha} must be positive")
    min_size = _min_size(cfg, n_nodes, len(labels))
    extra = len(labels) - min_size * n_nodes
    rng = numpy_rng(seed, "partition", "quantity_skew")
    sizes = min_size + _round_to_total(rng.dirichlet(np.full(n_nodes, cfg.alpha)) * extra, extra)
    return np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1])


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "proportions": proportions,
    "shards": shards,
    "quantity_skew": quantity_skew,
}


def by_column(clients: np.ndarray, n_nodes: int, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Natural partition: node i holds the rows of the i-th distinct value of ``cfg.column`` (values as
    indices, ``clients``). With more values than nodes the values are merged: taken in a seeded order,
    each joins the node holding the fewest rows so far (ties: lowest node), so sizes stay balanced.
    ``cfg.max_per_node`` then keeps a seeded subset of each node's rows."""
    values, counts = np.unique(clients, return_counts=True)
    if len(values) < n_nodes:
        raise ConfigError(
            f"partition.column={cfg.column!r} has {len(values)} distinct values in the training rows, fewer "
            f"than nodes={n_nodes}; use nodes<={len(values)}"
        )
    owner = np.arange(len(values))
    if len(values) > n_nodes:
        sizes = np.zeros(n_nodes, dtype=np.int64)
        for v in numpy_rng(seed, "partition", "column").permutation(len(values)):
            owner[v] = int(np.argmin(sizes))
            sizes[owner[v]] += counts[v]
    node_of_row = owner[np.searchsorted(values, clients)]
    parts = [np.flatnonzero(node_of_row == i) for i in range(n_nodes)]
    cap = cfg.max_per_node
    if cap is not None:
        rng = numpy_rng(seed, "partition", "max_per_node")
        parts = [np.sort(rng.choice(p, size=cap, replace=False)) if len(p) > cap else p for p in parts]
    return parts


def partition(
    labels: np.ndarray,
    n_nodes: int,
    cfg: PartitionConfig,
    seed: int,
    clients: np.ndarray | None = None,
    num_labels: int | None = None,
) -> list[np.ndarray]:
    """One shuffled index array per node into ``labels`` (disjoint); ``cfg.kind`` picks the partitioner.
    ``clients`` (kind=column): each row's value of ``cfg.column``, as an index. ``num_labels``: the
    dataset's label count (kind=proportions takes one entry per label, also one no training row has)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise ValueError(f"labels must be a 1-D array of ints, got {labels.dtype} {labels.shape}")
    if n_nodes < 1 or n_nodes > len(labels):
        raise ValueError(f"nodes={n_nodes} must be between 1 and the {len(labels)} training examples")
    if cfg.kind == "column":
        if clients is None or len(clients) != len(labels):
            raise ValueError("partition.kind=column needs each training row's value of partition.column")
        parts = by_column(np.asarray(clients), n_nodes, cfg, seed)
    elif cfg.kind == "proportions":
        parts = proportions(labels, n_nodes, cfg, seed, num_labels)
    elif cfg.kind not in PARTITIONERS:
        kinds = sorted([*PARTITIONERS, "column"])
        raise ValueError(f"partition.kind={cfg.kind!r} is not known; choose one of {kinds}")
    else:
        parts = PARTITIONERS[cfg.kind](labels, n_nodes, cfg, seed)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"partition.kind={cfg.kind!r} left nodes {empty} without data; use fewer nodes")
    # Shuffled per node, so batch streams that read a part in order see mixed labels.
    shuffled = [numpy_rng(seed, "partition", "order", i).permutation(p) for i, p in enumerate(parts)]
    return [p.astype(np.int64) for p in shuffled]


def describe_partition(parts: list[np.ndarray], labels: np.ndarray, num_labels: int) -> list[dict[str, Any]]:
    """Per node: its size and label histogram, for the run log."""
    return [
        {"node": i, "size": len(p), "label_counts": np.bincount(labels[p], minlength=num_labels).tolist()}
        for i, p in enumerate(parts)
    ]
