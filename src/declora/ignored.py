"""Settings a run would ignore: a key set away from its default that the chosen algorithm, codec, topology
schedule, task, partition, robust rule, attack, base or DP-SGD never reads (``algorithm.mu`` with ``fedavg``,
``comm.bits`` with ``fp16``, ``topology.p`` on a pairwise schedule, ``task.template`` for plain language
modelling, ``robust.trim`` with the plain mean).

Such a value still lands in the run's config.yaml, where a reader would take it for part of the run. The
run therefore names each one in a warning at its start. They are not refused: a grid's shared settings
describe the experiment for all its methods (C4 gives every server method the same ``ranks`` and
``sketch_ratios``), and a paper config stays usable with another ``algorithm.name``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

from declora.config import ALTERNATING, Config


def _served() -> frozenset[str]:
    from declora.algorithms import SERVED

    return SERVED


def _shipped() -> frozenset[str]:
    from declora.algorithms import SHIPPED

    return SHIPPED


def _server_adamw(cfg: Config) -> bool:
    """The server steps with AdamW, which reads algorithm.server_lr / server_weight_decay."""
    from declora.server_opt import server_rule

    return cfg.algorithm.name in _served() and server_rule(cfg) == "adamw"


# key -> (whether this run reads it, who reads it: for the message)
Reader = tuple[Callable[[Config], bool], str]

ALGORITHM: dict[str, Reader] = {
    "switch_interval": (lambda c: c.algorithm.name in ALTERNATING, "adf_lora, tad_lora, rolora, rolora_dfl"),
    "first_phase": (lambda c: c.algorithm.name in ALTERNATING, "adf_lora, tad_lora, rolora, rolora_dfl"),
    "auto_c": (
        lambda c: c.algorithm.name == "tad_lora" and c.algorithm.switch_interval == "auto",
        "tad_lora with switch_interval=auto",
    ),
    "auto_max": (
        lambda c: c.algorithm.name == "tad_lora" and c.algorithm.switch_interval == "auto",
        "tad_lora with switch_interval=auto",
    ),
    "optimizer_policy": (
        lambda c: c.algorithm.name in ALTERNATING | {"decaf", "hetlora", "flexlora"},
        "the alternating methods, decaf, hetlora, flexlora",
    ),
    "svd_split": (lambda c: c.algorithm.name == "decaf", "decaf"),
    "ranks": (lambda c: c.algorithm.name in ("hetlora", "flexlora", "flora"), "hetlora, flexlora, flora"),
    "sketch_ratios": (lambda c: c.algorithm.name == "fslora", "fslora"),
    "sketch_dist": (lambda c: c.algorithm.name == "fslora" and not c.algorithm.sketch_ratios, "fslora"),
    "clients_per_round": (lambda c: c.algorithm.name in _served(), "the server algorithms"),
    "server_lr": (
        lambda c: _server_adamw(c) and c.server.lr is None,
        "a server stepping with AdamW (fslora, hetlora, or server.optimizer=adamw) and no server.lr",
    ),
    "server_weight_decay": (
        _server_adamw,
        "a server stepping with AdamW (fslora, hetlora, server.optimizer=adamw)",
    ),
    "flex_weights": (lambda c: c.algorithm.name == "flexlora", "flexlora"),
    "mu": (lambda c: c.algorithm.name in ("fedprox", "dec_prox"), "fedprox, dec_prox"),
    "options": (lambda c: c.algorithm.name not in _shipped(), "registered (plugin) algorithms"),
}


def _sends(c: Config) -> bool:
    from declora.algorithms import SILENT

    return c.algorithm.name not in SILENT


COMM: dict[str, Reader] = {
    "codec": (_sends, "algorithms that send messages (not local or centralized)"),
    "bits": (lambda c: c.comm.codec == "quantize", "comm.codec=quantize"),
    "block_size": (lambda c: c.comm.codec == "quantize", "comm.codec=quantize"),
    "fraction": (lambda c: c.comm.codec == "topk", "comm.codec=topk"),
    "error_feedback": (lambda c: c.comm.codec == "topk", "comm.codec=topk"),
    "consensus_step": (lambda c: c.comm.codec == "topk", "comm.codec=topk (CHOCO gossip)"),
}


def _gossips(c: Config) -> bool:
    from declora.algorithms import NO_GOSSIP

    return c.algorithm.name not in NO_GOSSIP


def _builds_graph(c: Config) -> bool:
    return _gossips(c) and c.topology.schedule in ("static", "periodic_full")


GOSSIP = "gossip algorithms (not the server methods, local or centralized)"


def _on(key: str, *values: str) -> Reader:
    """Read by a gossip algorithm whose graph is built and whose topology.<key> is one of ``values``."""
    return (
        lambda c: _builds_graph(c) and getattr(c.topology, key) in values,
        f"{GOSSIP} on topology.{key} {' or '.join(values)}",
    )


def _on_schedule(schedule: str) -> Reader:
    return (
        lambda c: _gossips(c) and c.topology.schedule == schedule,
        f"{GOSSIP} on topology.schedule={schedule}",
    )


TOPOLOGY: dict[str, Reader] = {
    "schedule": (_gossips, GOSSIP),
    "lazy": (_gossips, GOSSIP),
    "link_failure": (_gossips, GOSSIP),
    "allow_disconnected": (_gossips, GOSSIP),
    "graph": (_builds_graph, f"{GOSSIP} with topology.schedule static or periodic_full"),
    "weights": (_builds_graph, f"{GOSSIP} with topology.schedule static or periodic_full"),
    "p": (
        lambda c: (
            _gossips(c)
            and (
                c.topology.schedule == "dynamic_er"
                or (_builds_graph(c) and c.topology.graph == "erdos_renyi")
            )
        ),
        f"{GOSSIP} on topology.graph=erdos_renyi or topology.schedule=dynamic_er",
    ),
    "degree": _on("graph", "regular", "small_world"),
    "rewire": _on("graph", "small_world"),
    "edge_list": _on("graph", "file"),
    "weight_file": _on("weights", "file"),
    "encounter_prob": _on_schedule("pairwise"),
    "period": _on_schedule("periodic_full"),
}


TASK: dict[str, Reader] = {
    "template": (lambda c: c.task.kind == "label_words", "task.kind=label_words"),
    "label_words": (lambda c: c.task.kind == "label_words", "task.kind=label_words"),
}


DATA: dict[str, Reader] = {  # data.node_files replaces the one source and its held-out split
    "dataset": (lambda c: not c.data.node_files, "data split from one source (not data.node_files)"),
    "test_fraction": (
        lambda c: not c.data.node_files and c.data.test_file is None,
        "a held-out part split from data.dataset (no data.test_file)",
    ),
}

PARTITION: dict[str, Reader] = {
    "kind": (lambda c: not c.data.node_files, "data split from one source (not data.node_files)"),
    "column": (lambda c: c.partition.kind == "column", "partition.kind=column"),
    "max_per_node": (lambda c: c.partition.kind == "column", "partition.kind=column"),
    "alpha": (
        lambda c: c.partition.kind in ("dirichlet", "quantity_skew"),
        "partition.kind dirichlet or quantity_skew",
    ),
    "min_size": (
        lambda c: c.partition.kind in ("dirichlet", "quantity_skew"),
        "partition.kind dirichlet or quantity_skew",
    ),
    "proportions": (lambda c: c.partition.kind == "proportions", "partition.kind=proportions"),
    "shards_per_node": (lambda c: c.partition.kind == "shards", "partition.kind=shards"),
}

ROBUST: dict[str, Reader] = {
    "trim": (lambda c: c.robust.aggregator == "trimmed_mean", "robust.aggregator=trimmed_mean"),
    "clip_radius": (lambda c: c.robust.aggregator == "clipped", "robust.aggregator=clipped"),
    "krum_f": (lambda c: c.robust.aggregator == "krum", "robust.aggregator=krum"),
}

ATTACK: dict[str, Reader] = {
    "nodes": (lambda c: c.attack.kind != "none", "an attack.kind"),
    "scale": (lambda c: c.attack.kind == "scaled", "attack.kind=scaled"),
    "std": (lambda c: c.attack.kind == "gaussian", "attack.kind=gaussian"),
}

MODEL: dict[str, Reader] = {
    # the classifier head reads the pooled state; a language model's head reads every position
    "pooling": (lambda c: c.task.kind == "sequence_classification", "task.kind=sequence_classification"),
    # int8 always decodes with declora's code (bitsandbytes' int8 decode is slower on the CPU)
    "quant_backend": (lambda c: c.model.base_quantization == "nf4", "model.base_quantization=nf4"),
}

TRAIN: dict[str, Reader] = {
    "head_lr": (lambda c: c.model.head == "train", "model.head=train"),
    # DP-SGD clips each example's own gradient, which only the per-row product has
    "lora_product": (lambda c: c.privacy.level != "example", "runs without privacy.level=example"),
    "max_grad_norm": (
        lambda c: c.privacy.level != "example",
        "runs without privacy.level=example (DP-SGD clips each example at privacy.clip instead)",
    ),
}

LOG: dict[str, Reader] = {
    "project": (lambda c: bool({"wandb", "mlflow"} & set(c.log.trackers)), "log.trackers wandb or mlflow"),
    "wandb_mode": (lambda c: "wandb" in c.log.trackers, "log.trackers=[wandb]"),
    "mlflow_uri": (lambda c: "mlflow" in c.log.trackers, "log.trackers=[mlflow]"),
}

TOP: dict[str, Reader] = {  # keys of the config's top level
    "export_round": (lambda c: c.export != "none", "runs that export (export all or consensus)"),
}

SECTIONS = {
    "": TOP,
    "log": LOG,
    "model": MODEL,
    "train": TRAIN,
    "algorithm": ALGORITHM,
    "comm": COMM,
    "topology": TOPOLOGY,
    "task": TASK,
    "data": DATA,
    "partition": PARTITION,
    "robust": ROBUST,
    "attack": ATTACK,
}


def ignored_keys(cfg: Config) -> list[tuple[str, str, str]]:
    """(section, key, who reads it) for each key that differs from its default but that this run never
    reads."""
    from declora.algorithms import SHIPPED

    out = []
    for section, readers in SECTIONS.items():
        if section == "algorithm" and cfg.algorithm.name not in SHIPPED:
            continue  # a registered algorithm may read any algorithm.* key: only it knows which
        values = _part(cfg, section)
        defaults = type(values)()
        for key, (reads, who) in readers.items():
            if getattr(values, key) != getattr(defaults, key) and not reads(cfg):
                out.append((section, key, who))
    return out


def ignored_settings(cfg: Config) -> list[str]:
    """One line per key that differs from its default but that this run never reads."""
    return [
        f"{_dotted(section, key)}={_show(getattr(_part(cfg, section), key))} has no effect in this run; "
        f"it applies to {who}"
        for section, key, who in ignored_keys(cfg)
    ]


def _part(cfg: Config, section: str) -> object:
    return getattr(cfg, section) if section else cfg


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def without_unread_defaults(cfg: Config, chosen: Collection[str]) -> Config:
    """``cfg`` with every ignored key that the user did not choose (``chosen``: dotted keys) set back to
    its default. For the config a run falls back on when given none (configs/default.yaml): its
    ``partition.min_size`` means nothing once ``partition.kind=iid`` is asked for, and neither a warning
    about a key the user never set nor that value in the run's config.yaml would help anyone. Unread
    keys change nothing, so neither does this."""
    for _ in range(4):  # a key set back can leave others unread (partition.kind, then min_size)
        reset: dict[str, dict[str, object]] = {}
        for section, key, _ in ignored_keys(cfg):
            if not {section, _dotted(section, key)} & set(chosen):  # a whole section counts as chosen too
                reset.setdefault(section, {})[key] = getattr(type(_part(cfg, section))(), key)
        if not reset:
            break
        changes: dict[str, Any] = dict(reset.pop("", {}))  # top-level keys as they are
        changes.update({s: dataclasses.replace(getattr(cfg, s), **keys) for s, keys in reset.items()})
        cfg = dataclasses.replace(cfg, **changes)
    return cfg


def _show(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)
