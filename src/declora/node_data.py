"""Each node's training rows: a partition of one dataset, or each node's own file.

A partition is derived from the whole training set on every process (seeded, so every process agrees
without talking). Per-node files (``data.node_files``) are the federated case: a process opens only the
files of the nodes it hosts, and only label names and per-node counts cross process boundaries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from declora.config import Config, ConfigError
from declora.data import load_dataset
from declora.dist import Solo
from declora.partition import describe_partition, partition
from declora.tables import is_table
from declora.text_dataset import TextDataset, group_split, limit, stratified_split
from declora.user_data import (
    encode_rows,
    label_order,
    looks_like_int,
    read_instructions,
    read_rows,
    refuse_training_rows,
    test_file_split,
)

log = logging.getLogger(__name__)


@dataclass
class NodeData:
    train: TextDataset  # the rows the hosted nodes train on (every row, for a partitioned dataset)
    test: TextDataset
    validation: TextDataset | None  # data.validation_fraction: held out from train, to choose rounds by
    parts: list[np.ndarray]  # per hosted node: its indices into ``train``
    summary: list[dict]  # every node's size and label histogram, on every process


def build_node_data(cfg: Config, n: int, hosted: range, group: Solo) -> NodeData:
    """The data of nodes ``hosted`` (global ids) of a federation of ``n``."""
    if cfg.data.node_files is not None:
        return _from_node_files(cfg, n, hosted, group)
    column = cfg.partition.column if cfg.partition.kind == "column" else None
    instruction, unlabelled = cfg.task.kind == "instruction", cfg.task.kind == "causal_lm"
    train, test = load_dataset(
        cfg.data, cfg.eval.seed, column, instruction, unlabelled
    )  # held out: eval.seed
    order = adapter_label_order(cfg, train.label_names)
    if order is not None:
        train, test = train.in_order(order), test.in_order(order)
    train, validation = hold_out_validation(train, cfg)
    if n == 1:
        parts = [_pooled_rows(train, cfg)]
    else:
        parts = partition(train.labels, n, cfg.partition, cfg.seed, train.clients, train.num_labels)
    summary = describe_partition(parts, train.labels, train.num_labels)
    if train.clients is not None:  # how many column values each node merged
        for node, p in zip(summary, parts, strict=True):
            node["clients"] = len(np.unique(train.clients[p]))
    return NodeData(train, test, validation, parts[hosted.start : hosted.stop], summary)


def adapter_label_order(cfg: Config, names: tuple[str, ...]) -> tuple[str, ...] | None:
    """The label order of the declora export the run starts from (model.init_adapter), when the data
    names the same labels in another order (a table's labels are numbered in sorted order: "fresh" before
    "rotten", where the shipped reviews number "rotten" 0): its head's label k must be the data's label
    k. None when there is nothing to renumber."""
    from declora.adapter_card import card_labels
    from declora.assets import adapter_path

    if not cfg.model.init_adapter or cfg.task.kind in ("causal_lm", "instruction"):
        return None
    theirs = card_labels(adapter_path(cfg.model.init_adapter))
    if theirs is None or sorted(theirs) != sorted(names) or tuple(theirs) == names:
        return None
    log.info("labels numbered as adapter %s numbers them: %s", cfg.model.init_adapter, theirs)
    return tuple(theirs)


def hold_out_validation(train: TextDataset, cfg: Config) -> tuple[TextDataset, TextDataset | None]:
    """(the training rows left, the validation rows): data.validation_fraction of the training rows,
    whole groups where rows have them (the shipped reviews' movies, as the test split), else a share of
    each label; drawn from eval.seed, as the test rows, so every training seed and method holds out the
    same ones. No node trains on them."""
    fraction = cfg.data.validation_fraction
    if fraction is None:
        return train, None
    if train.groups is not None:
        keep, held = group_split(train.groups, fraction, cfg.eval.seed, "validation_fraction")
    else:
        keep, held = stratified_split(train.labels, fraction, cfg.eval.seed, "validation_fraction")
    if len(held) == 0 or len(keep) == 0:
        raise ConfigError(
            f"data.validation_fraction={fraction} of {len(train)} training rows leaves {len(held)} "
            f"validation and {len(keep)} training rows; both must be non-empty"
        )
    return train.subset(keep), train.subset(held)


def _pooled_rows(train: TextDataset, cfg: Config) -> np.ndarray:
    """The rows a single-node run (centralized) trains on: the union of what ``cfg.nodes`` nodes would
    hold, so that it is the reference of the same data. Only two partitions leave rows to no node
    (proportions, to meet every node's label mix; column with max_per_node); under the others, and with
    nodes=1, that union is every row, in the order a single node has always read them."""
    p = cfg.partition
    leaves_rows = p.kind == "proportions" or (p.kind == "column" and p.max_per_node is not None)
    if cfg.nodes == 1 or not leaves_rows:
        return np.arange(len(train))
    parts = partition(train.labels, cfg.nodes, p, cfg.seed, train.clients, train.num_labels)
    union = np.sort(np.concatenate(parts))
    log.info(
        "single-node run: it trains on the union of the %d nodes' rows under partition.kind=%s, %d of the "
        "%d training rows",
        cfg.nodes,
        p.kind,
        len(union),
        len(train),
    )
    return union


def _natural(name: str) -> list[Any]:
    """Sort key that compares the digit runs of a name as numbers: node_2 < node_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def node_file_list(cfg: Config) -> list[str]:
    """data.node_files as one path per node: the list itself, or a folder's tables sorted by name, numbers
    by value (node_2 before node_10)."""
    spec = cfg.data.node_files
    if isinstance(spec, str):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.node_files={spec!r} is neither a list of files nor a folder")
        files = sorted((str(p) for p in folder.iterdir() if is_table(p)), key=_natural)
    else:
        files = list(spec or ())
    if len(files) != cfg.nodes:
        raise ConfigError(
            f"data.node_files gives {len(files)} files for nodes={cfg.nodes}; it needs one per node"
        )
    return files


def _from_node_files(cfg: Config, n: int, hosted: range, group: Solo) -> NodeData:
    files = node_file_list(cfg)
    repeated = sorted({f for f in files if files.count(f) > 1})
    if repeated:  # mostly a copy-paste slip; kept, since equal nodes can be the experiment
        log.warning(
            "data.node_files gives %s to more than one node: those nodes train on the same rows", repeated
        )
    sources = [files] if n == 1 else [[f] for f in files]  # a single-node algorithm pools every file
    if cfg.task.kind == "instruction":
        return _instruction_files(cfg, sources, hosted, group)
    unlabelled = cfg.task.kind == "causal_lm"  # language modelling: a table may have no label column
    rows = {
        i: [read_rows(f, cfg.data.split, cfg.data, unlabelled=unlabelled) for f in sources[i]] for i in hosted
    }
    mine = [r for node_rows in rows.values() for r in node_rows]
    # Label names: a ClassLabel's if the files carry one, else every process's label values, sorted.
    seen = group.all_gather_object(
        (next((r.names for r in mine if r.names), None), sorted({v for r in mine for v in r.labels}))
    )
    values = sorted({v for s in seen for v in s[1]})
    names = next((s[0] for s in seen if s[0]), None)
    if names is None:
        _refuse_ids_and_names(
            values, {f: r for i in hosted for f, r in zip(sources[i], rows[i], strict=True)}
        )
        names = label_order(values)
    nodes = [_limited([encode_rows(r, names) for r in rows[i]], cfg, node=i, pooled=n == 1) for i in hosted]
    held = read_rows(*_held_out(cfg, files), cfg.data, key="data.test_split", unlabelled=unlabelled)
    test = limit(encode_rows(held, names), cfg.data.test_limit, cfg.eval.seed, "test_limit")
    return _assemble(nodes, test, sources, hosted, group)


def _limited(parts: list[TextDataset], cfg: Config, node: int, pooled: bool) -> TextDataset:
    """A node's rows under data.train_limit, drawn from eval.seed + its index. A single-node run pools
    every file, each limited as its node of an n-node run would be, so that it trains on the union of
    what those n nodes train on (centralized training as the reference of the same data)."""
    draws = range(len(parts)) if pooled else [node]
    limited = [
        limit(p, cfg.data.train_limit, cfg.eval.seed + k, "train_limit")
        for p, k in zip(parts, draws, strict=True)
    ]
    return _concat(limited)


def _refuse_ids_and_names(values: list[str], local: dict[str, Any]) -> None:
    """Class ids in some node files and class names in others would become separate classes (``0`` and
    ``neg`` for one class): refused, as a mix inside one file is (declora.data), naming a file of each kind
    that this process read."""
    ids = [v for v in values if looks_like_int(v)]
    words = [v for v in values if not looks_like_int(v)]
    if not ids or not words:
        return

    def file_with(kind: list[str]) -> str:
        found = next((f for f, r in local.items() if set(r.labels) & set(kind)), None)
        return f" (e.g. {found})" if found else ""

    raise ConfigError(
        f"data.node_files: labels are class ids {ids[:3]} in some files{file_with(ids)} and class names "
        f"{words[:3]} in others{file_with(words)}; every file must use one kind, or one class becomes two"
    )


def _instruction_files(cfg: Config, sources: list[list[str]], hosted: range, group: Solo) -> NodeData:
    """task.kind=instruction: each node's prompt/response (or messages) tables; every row's label is the
    one name "text", so the processes have no label names to agree on."""
    pooled = len(sources) == 1  # a single-node run: every file
    read = [[read_instructions(f, cfg.data.split, cfg.data) for f in sources[i]] for i in hosted]
    nodes = [_limited(parts, cfg, node=i, pooled=pooled) for i, parts in zip(hosted, read, strict=True)]
    files = [f for node in sources for f in node]
    held = read_instructions(*_held_out(cfg, files), cfg.data, "data.test_split")
    test = limit(held, cfg.data.test_limit, cfg.eval.seed, "test_limit")
    return _assemble(nodes, test, sources, hosted, group)


def _held_out(cfg: Config, files: list[str]) -> tuple[str, str]:
    """(data.test_file, its held-out split), refused when it is one of the nodes' training splits."""
    test_file = cfg.data.test_file
    assert test_file is not None  # validation: data.node_files needs data.test_file
    held = test_file, test_file_split(cfg.data)
    refuse_training_rows(held, [(f, cfg.data.split) for f in files], "data.node_files")
    return held


def _concat(parts: list[TextDataset]) -> TextDataset:
    """Datasets with the same label names, one after another (instruction responses kept)."""
    responses = None if parts[0].responses is None else [r for d in parts for r in d.responses or ()]
    pairs = None if parts[0].pairs is None else [p for d in parts for p in d.pairs or ()]
    texts, labels = [t for d in parts for t in d.texts], np.concatenate([d.labels for d in parts])
    return TextDataset(texts, labels, parts[0].label_names, responses=responses, pairs=pairs)


def _assemble(
    nodes: list[TextDataset], test: TextDataset, sources: list[list[str]], hosted: range, group: Solo
) -> NodeData:
    """The hosted nodes' rows one after another, each node's part, and every process's node summary."""
    sizes = np.cumsum([0, *(len(d) for d in nodes)])
    train = _concat(nodes)
    parts = [np.arange(sizes[k], sizes[k + 1]) for k in range(len(nodes))]
    local = describe_partition(parts, train.labels, train.num_labels)
    for k, node in enumerate(local):
        node["node"], node["file"] = hosted[k], " + ".join(sources[hosted[k]])
    summary = [node for rank_nodes in group.all_gather_object(local) for node in rank_nodes]
    return NodeData(train, test, None, parts, summary)
