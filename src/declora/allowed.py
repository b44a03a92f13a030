"""What each config key may hold on its own: the choices of every string key, the range of every number,
the keys that name a file or layer, and the checks of them (validation.validate calls these first, then
checks how keys relate). Each failure is a ConfigError that names the bad value and what is allowed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from declora.config import ConfigError

CHOICES: dict[str, tuple[str | None, ...]] = {
    "precision": ("fp32", "bf16"),
    "export": ("all", "consensus", "none"),
    "export_round": ("final", "best"),
    "log.wandb_mode": (None, "offline", "online", "disabled"),
    "model.head": ("train", "frozen", "none"),
    "model.pooling": ("auto", "mean", "cls"),
    "task.kind": ("sequence_classification", "label_words", "causal_lm", "instruction"),
    "model.base_quantization": ("none", "int8", "nf4"),
    "model.quant_backend": ("auto", "declora", "bitsandbytes"),
    "partition.kind": ("iid", "dirichlet", "proportions", "shards", "quantity_skew", "column"),
    "train.optimizer": ("adamw", "sgd"),
    "train.local_unit": ("steps", "epochs"),
    "train.lora_product": ("auto", "per_row", "grouped"),
    "train.schedule": ("constant", "cosine", "linear"),
    "algorithm.first_phase": ("A", "B"),
    "algorithm.optimizer_policy": ("reset", "keep"),
    "algorithm.svd_split": ("balanced", "left", "right"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "algorithm.sketch_dist": ("uniform", "normal", "heavy_tailed"),
    "algorithm.flex_weights": ("data_size", "uniform"),
    "server.optimizer": ("auto", "average", "sgd", "avgm", "adagrad", "yogi", "adam", "adamw"),
    "server.weighting": ("auto", "size", "uniform"),
    "privacy.level": ("none", "node", "example"),
    "privacy.accountant": ("rdp", "prv"),
    "robust.aggregator": ("mean", "trimmed_mean", "median", "clipped", "krum"),
    "attack.kind": ("none", "sign_flip", "gaussian", "scaled", "label_flip"),
    "eval.headline": (
        "auto",
        *("acc_avg_factors", "acc_avg_product", "acc_node_mean", "acc_server"),
        *("ppl_avg_factors", "ppl_avg_product", "ppl_node_mean", "ppl_server"),  # task.kind=causal_lm
        *("em_avg_factors", "em_avg_product", "em_node_mean", "em_server"),  # task.kind=instruction
        # classification with two labels (TWO_LABEL_METRICS)
        *("f1_avg_factors", "f1_avg_product", "f1_node_mean", "f1_server"),
        *("mcc_avg_factors", "mcc_avg_product", "mcc_node_mean", "mcc_server"),
    ),
}
# Metrics of label 1 that two-label classification logs beside its accuracy (declora.tasks): the F1 score
# (GLUE's MRPC, QQP) and Matthews' correlation (CoLA), both shown ×100 like an accuracy.
TWO_LABEL_METRICS = ("f1_", "mcc_")
POSITIVE = (
    "nodes",
    "rounds",
    "checkpoint_every",
    "model.rank",
    "model.max_length",
    "train.batch_size",
    "train.local_steps",
    "eval.every",
)


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``lo``/``hi`` bounds (None: unbounded), open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else _number(self.lo)
        hi = "inf" if self.hi is None else _number(self.hi)
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        return f"{left}{lo}, {hi}{right}"


MAX_COUNT, MAX_EPOCHS = 10**6, 1000  # rounds and local steps; local epochs per round


def _number(x: float) -> str:
    """A bound as a person writes it: 1000000, not 1e+06; 0.5 as is."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


PROBABILITY, FRACTION = Range(0, 1), Range(0, 1, lo_open=True)  # [0, 1], (0, 1]
OPEN_UNIT, BELOW_ONE = Range(0, 1, True, True), Range(0, 1, hi_open=True)  # (0, 1), [0, 1)
ABOVE_ZERO, NON_NEGATIVE = Range(0, lo_open=True), Range(0)
# The allowed range of every number that POSITIVE (integers >= 1) does not cover; a null value (where the
# type allows it) always passes. A list value (betas) is checked entry by entry. Adding a numeric config
# key means adding it here or to POSITIVE (tests/unit/test_validation.py checks that none is missed).
RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE,
    # Counts of work: a typo (an extra 0 or 9, 1e12) would otherwise run for days before anyone noticed,
    # and local_steps cannot change on resume. Epochs per round have their own, lower cap (validate).
    "rounds": Range(1, MAX_COUNT),
    "train.local_steps": Range(1, MAX_COUNT),
    "threads": Range(1, 1024),  # torch allocates per thread: a typo like 100000 would exhaust memory
    "model.alpha": NON_NEGATIVE,  # 0 only with allow_degenerate (LoRA then adds nothing)
    "model.dropout": BELOW_ONE,
    "model.init_seed": Range(0, 2**63 - 1),  # torch.manual_seed takes a signed 64-bit integer
    "data.test_fraction": OPEN_UNIT,
    "data.validation_fraction": OPEN_UNIT,
    "data.train_limit": Range(1),
    "data.test_limit": Range(1),
    "partition.alpha": ABOVE_ZERO,
    "partition.min_size": NON_NEGATIVE,
    "partition.shards_per_node": Range(1),
    "topology.p": FRACTION,
    "topology.degree": Range(1),
    "topology.rewire": PROBABILITY,
    "topology.encounter_prob": FRACTION,
    "topology.period": Range(1),
    "topology.link_failure": BELOW_ONE,
    "topology.node_dropout": BELOW_ONE,
    "comm.bits": Range(2, 8),
    "comm.block_size": Range(1),
    "comm.fraction": FRACTION,
    "comm.consensus_step": FRACTION,
    "train.lr": Range(0, 1, lo_open=True),
    "train.head_lr": Range(0, 1, lo_open=True),
    "train.weight_decay": PROBABILITY,
    "train.betas": BELOW_ONE,
    "train.momentum": BELOW_ONE,
    "train.eps": OPEN_UNIT,
    "train.max_grad_norm": ABOVE_ZERO,
    "train.logit_adjustment": Range(0, 10),  # tau: 1 is balanced softmax; beyond a few it only distorts
    "train.tokens_per_chunk": Range(1),
    "eval.node_examples": Range(1),
    "eval.patience": Range(1, MAX_COUNT),
    "eval.consensus_examples": Range(1),
    "eval.seed": NON_NEGATIVE,
    "algorithm.auto_c": ABOVE_ZERO,
    "algorithm.auto_max": Range(1),
    "algorithm.clients_per_round": Range(1),
    "algorithm.server_lr": Range(0, 1, lo_open=True),
    "algorithm.server_weight_decay": PROBABILITY,
    "algorithm.mu": NON_NEGATIVE,
    "partition.max_per_node": Range(1),
    "server.lr": ABOVE_ZERO,  # null: the optimizer's default
    "server.tau": NON_NEGATIVE,
    "server.fraction": FRACTION,
    "robust.trim": Range(0, 0.5, hi_open=True),
    "robust.clip_radius": ABOVE_ZERO,  # .inf: never clip
    "robust.krum_f": NON_NEGATIVE,
    "dist.timeout_s": Range(1, 10**7),  # at least the rendezvous's own round trip; within a timedelta
    "attack.std": NON_NEGATIVE,
    "stragglers.sigma": NON_NEGATIVE,
    "stragglers.jitter": NON_NEGATIVE,
    "stragglers.step_s": ABOVE_ZERO,
    "stragglers.link_s_per_mb": NON_NEGATIVE,
    "stragglers.deadline": ABOVE_ZERO,
    "stragglers.max_staleness": NON_NEGATIVE,
}
INFINITE_OK = ("privacy.clip", "robust.clip_radius")  # .inf: no clipping


# Keys that name a file, folder or layer: an empty string would silently mean the current folder (or none).
NAMES = (
    "model.name",
    "model.init_adapter",
    "model.target_modules",
    "data.dataset",
    "data.subset",
    "data.test_file",
    "data.node_files",
    "topology.edge_list",
    "topology.weight_file",
    "run_dir",
)


def refuse_empty_names(flat: dict[str, Any]) -> None:
    """No key of NAMES holds an empty string (alone or in a list)."""
    for key in NAMES:
        value = flat[key]
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, str) and not x.strip():
                raise ConfigError(
                    f"{key}={value!r} holds an empty name; give a path or name (or leave the key out)"
                )


def check_ranges(flat: dict[str, Any]) -> None:
    """Every number finite (but the INFINITE_OK ones may be .inf) and inside its RANGES entry."""
    for key, value in flat.items():
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, float) and not math.isfinite(x) and not (key in INFINITE_OK and x == math.inf):
                raise ConfigError(f"{key}={x!r} must be a finite number")
    for key, allowed in RANGES.items():
        value = flat[key]
        for x in value if isinstance(value, list) else [value]:
            if x is not None and not allowed.holds(x):
                raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")


def check_choices(flat: dict[str, Any]) -> None:
    """Every key of CHOICES holds one of its choices, and every key of POSITIVE a positive integer."""
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not allowed; choose one of {list(allowed)}")
    for key in POSITIVE:
        if flat[key] is None or flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]!r} must be a positive integer")
