"""Experiment configuration: frozen dataclasses, YAML loading and dotted overrides.

A config is YAML plus ``key=value`` overrides (``nodes=16 topology.graph=ring``). Unknown keys and bad
values stop the run before any work, with an error that names the bad value and what is allowed (each
key's allowed values live in declora.allowed, the checks that relate keys in declora.validation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


# model.target_modules=all-linear (PEFT's shorthand): every linear layer of the model but the classifier
# head, which trains whole, and a causal LM's output layer (lm_head). Any other string is, as in PEFT, a
# regular expression that a layer's full name (bert.encoder.layer.5.attention.self.query) matches whole.
ALL_LINEAR = "all-linear"
AUTO_TARGETS = "auto"  # model.target_modules: the attention's query and value projections (declora.targets)


def shown_targets(targets: tuple[str, ...] | str) -> str:
    """model.target_modules as a message shows it: a list of names, or the regular expression."""
    return repr(targets) if isinstance(targets, str) else str(list(targets))


@dataclass(frozen=True)
class ModelConfig:
    # "minilm" | "mpnet" | "smollm2" (shipped) | a local model folder | a hub id in the HF cache
    name: str = "minilm"
    # auto: the attention's query and value projections, as PEFT picks them for the model's type (BERT:
    # [query, value]; MPNet: [q, v]; LLaMA: [q_proj, v_proj]); or layer names; or all-linear; or a regular
    # expression on the full names (a string). See declora/targets.py.
    target_modules: tuple[str, ...] | str = (AUTO_TARGETS,)
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    dropout: float = 0.0
    head: str = "train"  # train: per-node classifier head, trained and mixed | frozen | none (causal LMs)
    # What an encoder's head reads: mean (of the real tokens' states) | cls (the model's pooler) | auto (the
    # folder's sentence-transformers pooling config, else cls). See declora/pooling.py.
    pooling: str = "auto"
    max_length: int = 128
    init_seed: int = 0  # every node starts from the same A (this seed) and B = 0 (Fed-SB: seeded B, R = 0)
    init_adapter: str | None = None  # a PEFT adapter folder that seeds every node
    base_quantization: str = "none"  # none | int8 | nf4: frozen base linears stored quantized (QLoRA-style)
    # Who decodes the quantized base (same bytes either way, declora.quantize_bnb): auto (bitsandbytes'
    # kernel for NF4 where bitsandbytes is installed and runs on the device, else declora) | declora |
    # bitsandbytes (an error where it is not installed).
    quant_backend: str = "auto"


@dataclass(frozen=True)
class TaskConfig:
    """What the model learns. Encoders classify with a head; causal LMs generate (declora.tasks)."""

    # | label_words (classification as generation) | causal_lm | instruction (prompt -> response)
    kind: str = "sequence_classification"
    template: str = "{text}\nAnswer:"  # label_words: the prompt; the label word follows it
    label_words: tuple[str, ...] | None = None  # label_words: one per label, in label order; None: " <name>"


@dataclass(frozen=True)
class DataConfig:
    # rotten_tomatoes | bbc_news | a .csv/.tsv/.json/.jsonl/.parquet/.arrow file (the text formats also
    # .gz/.bz2/.xz), a datasets save_to_disk folder or a hub dataset in the Hugging Face cache (read by HF
    # datasets, offline) | a .txt file (causal_lm)
    dataset: str = "rotten_tomatoes"
    # a subset of a cached hub dataset that has several (datasets' config name): sst2 of nyu-mll/glue
    subset: str | None = None
    split: str = "train"  # the training split of a save_to_disk DatasetDict (a plain file is "train")
    # held-out rows: test_file (its split test_split, else its own "test" split when it is a saved
    # DatasetDict with one, else "train"), else the split test_split, else the
    # source's own "test" split, else a seeded split of the training rows
    test_file: str | None = None
    test_split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # sentence-pair tasks (GLUE's MRPC, QNLI, RTE, MNLI): the second text's column (sentence2, hypothesis);
    # each row is tokenized as the pair (text, pair), as a transformers tokenizer joins two sentences
    pair_column: str | None = None
    # task.kind=instruction: the messages column (a list of {role, content}, the last the assistant's
    # answer) if the table has it, else the prompt and response columns
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    test_fraction: float = 0.2
    # A seeded share of the training rows (whole movies for the shipped reviews) held out from every node
    # to choose a round by (export_round=best, the report's "selected on validation"), so that the test
    # rows are never used to choose; None: no validation rows. Drawn from eval.seed, as the test rows.
    validation_fraction: float | None = None
    # One table per node (the node's own rows; partition is then not used): a list with one path per
    # node, or a folder whose files (in natural order: node_2 before node_10) are the nodes'. Each process
    # reads only its nodes'.
    node_files: tuple[str, ...] | str | None = None
    train_limit: int | None = None  # keep at most this many training examples (node_files: per node)
    test_limit: int | None = None


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = "iid"  # iid | dirichlet | proportions | shards | quantity_skew | column
    column: str | None = None  # kind=column: one node per distinct value of this column (a user id)
    max_per_node: int | None = None  # kind=column: keep at most this many examples per node (seeded)
    alpha: float = 0.5  # dirichlet concentration (also quantity_skew)
    min_size: int = 8  # every node gets this many: dirichlet resamples, quantity_skew gives it first
    proportions: tuple[tuple[float, ...], ...] | None = None  # one label distribution per node
    shards_per_node: int = 2


@dataclass(frozen=True)
class TopologyConfig:
    graph: str = "ring"
    weights: str = "metropolis_hastings"
    lazy: bool = False  # use (I + W) / 2
    p: float = 0.3  # erdos_renyi / dynamic erdos_renyi edge probability
    degree: int = 4  # random regular degree; small-world neighbours
    rewire: float = 0.1  # small-world rewiring probability
    edge_list: str | None = None  # graph: file
    weight_file: str | None = None  # weights: file
    allow_disconnected: bool = False
    schedule: str = "static"  # static | dynamic_er | pairwise | one_peer_exponential | periodic_full
    encounter_prob: float = 0.1  # pairwise: probability that a pair meets in a round
    period: int = 10  # periodic_full: full averaging every `period` rounds
    link_failure: float = 0.0  # each edge fails independently with this probability per round
    node_dropout: float = 0.0  # each node is offline with this probability per round


@dataclass(frozen=True)
class CommConfig:
    codec: str = "fp32"  # fp32 | fp16 | bf16 | quantize | topk: what each message is encoded as
    bits: int = 8  # quantize: bits per entry (2..8)
    block_size: int | None = 256  # quantize: one (lo, scale) per block of a node's message (None: per row)
    fraction: float = 0.1  # topk: fraction of entries kept per message
    error_feedback: bool = False  # topk on a server upload: carry what was not sent into the next round
    # topk on gossip runs CHOCO-gossip (comm/choco.py): X_i += consensus_step * sum_j W_ij (X̂_j - X̂_i).
    consensus_step: float = 0.3  # fastest of {0.2, 0.3, 0.5, 0.7, 1} for fraction 0.1 on a ring of 8 (README)

    def codec_params(self) -> dict[str, object]:
        params: dict[str, dict[str, object]] = {
            "quantize": {"bits": self.bits, "block_size": self.block_size},
            "topk": {"fraction": self.fraction, "error_feedback": self.error_feedback},
        }
        return params.get(self.codec, {})


@dataclass(frozen=True)
class TrainConfig:
    # Each node's own optimizer (declora.optim): adamw, or sgd (momentum, nesterov), whose steps average
    # like one step on the pooled batch. betas and eps are AdamW's; momentum and nesterov are SGD's.
    optimizer: str = "adamw"
    lr: float = 1e-3
    head_lr: float | None = None  # defaults to lr
    weight_decay: float = 0.0  # adamw: decoupled (shrink by lr * wd); sgd: L2 in the gradient, as torch
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    batch_size: int = 16
    local_steps: int = 5
    local_unit: str = "steps"  # steps | epochs
    max_grad_norm: float | None = 1.0  # per-node clipping; null disables
    # Forward micro-batch budget (padded tokens): the result does not depend on it, time and memory do.
    # Rows are sorted by length, so small budgets pad little. null: the device's default (declora.device:
    # 256 on the CPU, fastest and leanest on 2 cores; 32768 on a GPU, which needs big batches to be busy).
    tokens_per_chunk: int | None = None
    # The LoRA product: per_row (a batched matmul over rows, each gathering its node's factors), grouped
    # (rows ordered by node, one grouped matmul per layer over the node segments) or auto (grouped only
    # for short rows with many rows per node, grouped.AUTO_GROUPED: measured, almost never on the CPU).
    # The result is the same; only time and memory differ.
    lora_product: str = "auto"
    # Learning rate across rounds, per node (declora.lr_schedule): constant | cosine | linear, after a
    # linear warm-up over each node's first warmup_rounds rounds of training.
    schedule: str = "constant"
    warmup_rounds: int = 0
    # Label skew: each node trains on logits + tau * log(its own label frequencies) (the logit-adjusted
    # loss; balanced softmax at 1), so no node's prior enters the shared head (declora.train). 0: plain
    # cross-entropy. Classifier heads (task.kind=sequence_classification) only.
    logit_adjustment: float = 0.0


@dataclass(frozen=True)
class EvalConfig:
    every: int = 5  # rounds between evaluations (the last round is always evaluated)
    # The evaluation set is fixed by eval.seed, not the training seed: the train/held-out split, the data
    # limits and the scored subsets are the same for every training seed (paired comparisons).
    seed: int = 0
    node_examples: int = 500  # test examples used for each node's own accuracy
    consensus_examples: int | None = None  # test examples for the consensus models (None: all)
    # The metric the paper reports, marked first in the report (docs/algorithms.md: evaluation
    # protocols): acc_avg_factors (Dec-LoRA), acc_avg_product, acc_node_mean (ADF/TAD: mean ± std over
    # nodes), acc_server (FSLoRA). "auto" (resolved when the config is checked): the averaged factors,
    # or each node's own model where the nodes share none (local, fedsa_lora), in the task's measure
    # (acc_, or ppl_ for causal_lm and instruction).
    headline: str = "auto"
    # Early stopping: stop once the headline's score on the validation rows (data.validation_fraction) has
    # not improved for this many evaluations in a row; None: run every round (declora.patience).
    patience: int | None = None


# The methods that train A and B in alternating phases (algorithms/alternating.py): they read
# algorithm.switch_interval and first_phase.
ALTERNATING = frozenset({"adf_lora", "tad_lora", "rolora", "rolora_dfl"})


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "dec_lora"
    # Alternating methods (adf_lora, tad_lora, rolora, rolora_dfl): rounds per phase, or "auto" (TAD-LoRA:
    # T = ceil(auto_c / sqrt(1 - rho)) clipped to [1, auto_max], rho the schedule's expected contraction).
    switch_interval: int | str = 5
    first_phase: str = "B"  # B first: with B = 0 at init the gradient of A is zero
    auto_c: float = 3.0  # [M]: gives T ~ 5 (ADF-LoRA's best) for a moderately sparse graph
    auto_max: int = 20
    # Optimizer moments after a re-factorization (DeCAF) or a phase switch: reset | keep.
    optimizer_policy: str = "reset"
    svd_split: str = "balanced"  # DeCAF: B = U S^(1/2), A = S^(1/2) V^T | left: B = U S | right: A = S V^T
    # Heterogeneous ranks and server optimizers (fslora, hetlora, flexlora; see algorithms/ranks.py).
    # hetlora/flexlora/flora: r_i <= model.rank per node; None: model.rank on every node
    ranks: tuple[int, ...] | None = None
    sketch_ratios: tuple[float, ...] | None = None  # fslora: k_i / r per node in (0, 1]; None: sketch_dist
    sketch_dist: str = "uniform"  # fslora: uniform over {1/8, 1/4, 1/2} | normal | heavy_tailed (seeded)
    clients_per_round: int | None = None  # server methods: nodes the server samples per round; None: all
    server_lr: float = 1e-3  # fslora/hetlora: server AdamW on the mean delta
    server_weight_decay: float = 0.0  # [M] upstream FSLoRA uses torch AdamW's default 0.01 (?)
    flex_weights: str = "data_size"  # flexlora: p_i proportional to n_i | uniform
    mu: float = 0.01  # fedprox: weight of the proximal term mu/2 ||theta - theta_round_start||^2
    # A registered (plugin) algorithm's own settings, read by it from cfg.algorithm.options; shipped
    # algorithms have none (docs/extending.md). algorithm.options.every=3 on the command line.
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # hash=False: Config stays hashable


@dataclass(frozen=True)
class ServerConfig:
    """How a server algorithm (algorithms.SERVED: fedavg, ffa_lora, rolora, fslora, hetlora, flexlora and
    the FL baselines) aggregates and samples (algorithms/server.py, server_opt.py)."""

    # auto: each method's own rule (fslora, hetlora: adamw at algorithm.server_lr; the others: average) |
    # average | sgd | avgm | adagrad | yogi | adam (Reddi et al. 2021) | adamw (torch AdamW, FSLoRA's server)
    optimizer: str = "auto"
    lr: float | None = (
        None  # None: 1 (average/sgd/avgm), 0.01 (adagrad/yogi/adam), algorithm.server_lr (adamw)
    )
    betas: tuple[float, float] | None = None  # None: (0.9, 0.99); adamw (0.9, 0.999). avgm: betas[0]
    tau: float = 1e-3  # adaptivity of adagrad/yogi/adam: x += lr m / (sqrt(v) + tau)
    weighting: str = "auto"  # auto (flexlora: algorithm.flex_weights; others: uniform) | size | uniform
    fraction: float = 1.0  # nodes sampled per round, max(1, round(fraction n)), from (seed, round)


@dataclass(frozen=True)
class DistConfig:
    """Multi-process runs (torchrun): each rank hosts a contiguous slice of the nodes."""

    backend: str = "auto"  # auto (nccl when every rank has its own GPU, else gloo) | gloo | nccl
    timeout_s: float = 60.0  # a rank that dies or hangs stops every other rank within this time
    node_slices: tuple[int, ...] | None = None  # nodes hosted by each rank, in rank order; None: even split


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (declora.privacy): what is clipped and noised, and the budget it spends."""

    level: str = "none"  # none | node (every message a node sends) | example (DP-SGD in local steps)
    clip: float = 1.0  # node: L2 bound on a message's change since the last one; example: per-example grad
    noise_multiplier: float | None = None  # sigma: Gaussian noise std = sigma * clip
    target_epsilon: float | None = None  # instead of sigma: the sigma that spends this epsilon over the run
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv: opacus' accountants
    # Where the noise (and DP-SGD's batch order) comes from. false: the run's seed, so a run is reproducible
    # and anyone who knows the seed can recompute the noise and remove it (a simulation of DP); true: the
    # operating system's entropy, written nowhere, as a deployment needs (runs then differ every time).
    secure_noise: bool = False


@dataclass(frozen=True)
class RobustConfig:
    """How a node combines its own state with its neighbours' messages (declora.robust)."""

    aggregator: str = "mean"  # mean | trimmed_mean | median | clipped | krum (server algorithms only)
    trim: float = 0.25  # trimmed_mean: floor(trim * k) of the k values dropped at each end, per coordinate
    clip_radius: float = 1.0  # clipped: tau, the L2 radius of a neighbour's difference
    krum_f: int = 1  # krum: Byzantine senders tolerated


@dataclass(frozen=True)
class AttackConfig:
    """Byzantine nodes, to test robust mixing (declora.attack)."""

    kind: str = "none"  # none | sign_flip | gaussian | scaled | label_flip
    nodes: tuple[int, ...] | float | None = None  # attacker ids, or a fraction of the nodes (seeded)
    scale: float = 10.0  # scaled: the factor a message is multiplied by
    std: float = 1.0  # gaussian: std of the noise added to every entry of a message


@dataclass(frozen=True)
class StragglersConfig:
    """Simulated node speeds, a simulated wall clock, deadlines and asynchronous gossip (declora.stragglers).
    Nothing here slows the real run: the clock is computed, and a late node is treated as offline."""

    # Each node's time multiplier (2 = twice as slow): () every node 1; one number per node; or "lognormal":
    # node i's multiplier exp(sigma z_i), z_i ~ N(0, 1) drawn once from (seed, node).
    speeds: tuple[float, ...] | str = ()
    sigma: float = 0.5  # speeds=lognormal: spread of the per-node multipliers
    jitter: float = (
        0.0  # per-round noise: round t's time is also times exp(jitter z), z from (seed, round, node)
    )
    step_s: float = 1.0  # simulated seconds of one local step at multiplier 1
    link_s_per_mb: float = 0.0  # simulated seconds per MB (1e6 bytes) the busiest node sends in a round
    deadline: float | None = (
        None  # simulated seconds: a node whose local work takes longer sits the round out
    )
    asynchronous: bool = False  # gossip with the neighbours' last published copies (bounded staleness)
    max_staleness: int = 0  # asynchronous: a copy is at most this many rounds old (0: synchronous gossip)


@dataclass(frozen=True)
class LogConfig:
    """Experiment trackers (declora.trackers); metrics.jsonl is always written."""

    trackers: tuple[str, ...] = ()  # any of tensorboard, wandb, mlflow
    project: str = "declora"  # the W&B project and the MLflow experiment
    wandb_mode: str | None = None  # offline (sync later) | online | disabled; None: $WANDB_MODE, else offline
    mlflow_uri: str | None = None  # tracking URI; None: a file store "mlruns" beside the run folder


@dataclass(frozen=True)
class Config:
    nodes: int = 8
    rounds: int = 20
    seed: int = 0
    run_dir: str | None = None  # default: runs/<algorithm>-<timestamp>
    checkpoint_every: int = 5
    tensorboard: bool = False  # also mirror the per-round metrics to RUN_DIR/tensorboard
    export: str = "all"  # PEFT adapters written at the end: all (consensus + every node) | consensus | none
    # final: the adapters of the last round | best: of the evaluated round with the best eval.headline
    export_round: str = "final"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:K; torchrun: cuda:LOCAL_RANK
    precision: str = "fp32"  # fp32 | bf16: frozen base in bf16 under autocast, fp32 masters (declora.device)
    # Values that are legal but almost always a mistake (model.alpha=0: LoRA does nothing; a dataset with
    # one label, or with a score column for labels) stop the run unless this is true.
    allow_degenerate: bool = False
    # Modules (import names or .py files) imported before the config is checked, which register a user's
    # own algorithms (declora.plugins, docs/extending.md).
    plugins: tuple[str, ...] = ()
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    stragglers: StragglersConfig = field(default_factory=StragglersConfig)


# ---------------------------------------------------------------- building from plain dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):  # first type that accepts the value
            try:
                return _coerce(value, inner, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; or ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                f"got {_shown(value)}"
            )
        return _build(tp, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}")
        return dict(value)
    if origin is tuple:
        if key == "model.target_modules" and value in (ALL_LINEAR, AUTO_TARGETS):  # a string, as in PEFT
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {_shown(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            braces = (
                " (YAML reads an unquoted {...} as a mapping: quote the string)"
                if isinstance(value, dict)
                else ""
            )
            raise ConfigError(f"{key}: expected a string, got {_shown(value)}{braces}")
        return value
    return value


def _shown(value: Any) -> str:
    """A value in an error: YAML's null (also what ``key=`` with nothing after it gives) said as such."""
    return "null (no value)" if value is None else repr(value)


def _did_you_mean(key: str, prefix: str, names: set[str]) -> str:
    """' (did you mean ...?)' for a misspelt key of this section, or for a key of another section
    (``lr`` at the top level: train.lr, server.lr); '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(key, sorted(names), n=1)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    elsewhere = [k for k in flatten(to_dict(Config())) if k.rsplit(".", 1)[-1] == key]
    return f" (did you mean {' or '.join(elsewhere)}?)" if elsewhere else ""


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}{_did_you_mean(str(unknown[0]), prefix, names)}; "
            f"allowed under {prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` in ``tree``; a mapping given for a section (``model={rank: 8}``) sets its keys one by
    one, as ``model.rank=8`` would, and leaves the section's other keys as they were."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for key, inner in value.items():
            _set_dotted(node, f"{parts[-1]}.{key}", inner)
        return
    node[parts[-1]] = value


def repeated_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """A line for each key given twice on one command line (``nodes=5 nodes=6``): the last one counts, as
    when a script adds its own overrides to shared ones, but it should not pass unnoticed."""
    seen: dict[str, str] = {}
    lines = []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in seen:
            lines.append(f"{key} is given more than once ({seen[key]}, then {text}): the last one counts")
        seen[key] = text
    return lines


def parse_override(text: str) -> tuple[str, Any]:
    """``"topology.graph=ring"`` -> ("topology.graph", "ring"); the value is parsed as YAML."""
    if "=" not in text:
        hint = (
            "; a config file goes first: declora run CONFIG key=value ..."
            if text.endswith((".yaml", ".yml"))
            else ""
        )
        raise ConfigError(f"override {text!r} is not of the form key=value (for example nodes=16){hint}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has no key before '=' (for example nodes=16)")
    if "" in key.strip().split("."):
        raise ConfigError(
            f"override {text!r}: the key {key.strip()!r} has an empty part (for example train.lr=0.001)"
        )
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        quote = (  # task.template={text} Sentiment:
            f"; a value with braces is read as YAML: quote it, as in '{key.strip()}=\"{raw}\"'"
            if "{" in raw
            else ""
        )
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}){quote}") from err


def check_sections(cfg: Config) -> None:
    """Each section of a Config built or replaced in Python is its dataclass: a dict in its place
    (``dataclasses.replace(cfg, train={"lr": 0.1})``) would silently reset every key it does not name."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a declora Config, got {type(cfg).__name__}; build one with load_config")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind, value = hints[f.name], getattr(cfg, f.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and not isinstance(value, kind):
            raise ConfigError(
                f"{f.name}: expected a {kind.__name__}, got {type(value).__name__}; change one key with "
                f"dataclasses.replace(cfg, {f.name}=dataclasses.replace(cfg.{f.name}, key=value)), or give "
                "load_config overrides"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        f.name: (
            to_dict(getattr(cfg, f.name))
            if dataclasses.is_dataclass(getattr(cfg, f.name))
            else plain(getattr(cfg, f.name))
        )
        for f in dataclasses.fields(cfg)
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys: {'train': {'lr': 1}} -> {'train.lr': 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Load YAML (or the dataclass defaults when ``path`` is None: not configs/default.yaml, which
    ``declora run`` reads when given no config), apply the overrides, validate. ``overrides``: command-line
    style ``"key=value"`` strings (the value is read as YAML), or a mapping of dotted keys to Python values
    (``{"train.lr": 3e-4, "train.max_grad_norm": None}``)."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} is one string; give a list of key=value strings")
    if isinstance(overrides, (set, frozenset)):  # a later override of a key wins: the order matters
        raise ConfigError("overrides is a set, whose order is arbitrary; give a list or a mapping")
    if isinstance(overrides, Mapping):
        bad = [k for k in overrides if not isinstance(k, str)]
    else:
        bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(
            f"override {bad[0]!r} is not a string: give dotted keys (a mapping) or key=value strings (a list)"
        )
    tree: dict[str, Any] = {}
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"config path {path!r} is not a path; give a YAML file's path, or None")
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; give a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = read_yaml(p)
        if loaded is None:
            raise ConfigError(
                f"config file {str(p)!r} holds no settings (it is empty or all comments); give a config "
                "with at least one key, or none at all (declora run alone runs configs/default.yaml)"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        if "grid" in loaded and not {f.name for f in dataclasses.fields(Config)} >= set(loaded):
            raise ConfigError(f"{p} is a grid, not a run config: run it with declora compare {p}")
        tree = loaded
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in pairs:
        _set_dotted(tree, key, python_value(value))
    return from_dict(tree)


def python_value(value: Any) -> Any:
    """A Python override's value as YAML would give it: a numpy scalar as its Python number (a sweep over
    np.arange seeds), a 1-D numpy array as a list and a path as its string, inside lists and mappings too."""
    if isinstance(value, Mapping):
        return {k: python_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [python_value(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    numpy = type(value).__module__ == "numpy"
    if numpy and getattr(value, "ndim", None) == 1:  # np.array(["query", "value"])
        return [python_value(v) for v in value]
    if not numpy or getattr(value, "ndim", None) != 0:
        return value
    if getattr(value, "dtype", None) is not None and value.dtype.kind == "f":
        return float(str(value))  # the digits shown, as typed: np.float32(0.1) -> 0.1, not 0.10000000149
    return value.item()  # np.int64(1) -> 1, np.bool_(True) -> True


def from_dict(tree: Mapping[str, Any]) -> Config:
    """A validated Config from a nested mapping, as a YAML config file holds it (``to_dict`` inverts it).
    ``from_dict(to_dict(cfg))`` checks a Config built or ``dataclasses.replace``d in Python."""
    from declora.validation import validate

    return validate(_build(Config, dict(tree)))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    first: dict[Any, int] = {}  # key -> the line it was first given on
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # a list or mapping as a key: no config has one, the schema refuses it
        line = key_node.start_mark.line + 1
        if key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {first[key]} and {line})", key_node.start_mark
            )
        first[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax or encoding error, or a key given twice, names the file and line."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from err


def save_config(cfg: Config, path: str | Path) -> None:
    from declora.runfolder import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False), "config")
