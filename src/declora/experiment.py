"""Build every part of a run from a validated config: data, partitions, model, schedule, algorithm."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from declora.algorithms import ALGORITHMS, NO_GOSSIP, build_algorithm
from declora.algorithms.base import Algorithm
from declora.allowed import TWO_LABEL_METRICS
from declora.assets import adapter_path
from declora.attack import attacker_mask, flip_labels
from declora.comm.codecs import TopKCodec, build_codec
from declora.comm.dist_exchange import DistExchange
from declora.comm.exchange import LocalExchange
from declora.config import Config, ConfigError, TopologyConfig, check_sections, from_dict, to_dict
from declora.device import default_dtype, default_tokens_per_chunk, resolve_device
from declora.dist import Distributed, Solo
from declora.guard import GuardedExchange, build_account, needs_guard
from declora.ignored import ignored_settings
from declora.lr_schedule import RoundSchedule
from declora.model import Federation, add_middle_factors, build_federation, takes_segments
from declora.node_data import build_node_data
from declora.optim import NodeOptimizer, build_optimizer
from declora.peft_io import import_peft
from declora.privacy import ExampleDP, PrivacyAccount
from declora.replicas import Replicas
from declora.schedules import Schedule, build_schedule
from declora.seeding import numpy_rng
from declora.stragglers import AsyncExchange, Stragglers, enabled
from declora.tasks import CAUSAL_KINDS, Instruction, Task, build_task
from declora.text_dataset import TextDataset
from declora.train import LocalTrainer, NodeStreams, label_prior_offsets

log = logging.getLogger(__name__)

# What a run's messages go through: a LocalExchange (DistExchange across processes), possibly wrapped for
# stragglers and then for privacy, robust mixing and attacks (the wrappers pass the rest to the inner one).
RunExchange = LocalExchange | AsyncExchange | GuardedExchange


@dataclass
class EvalSet:
    token_ids: list[list[int]]
    labels: np.ndarray


@dataclass
class Experiment:
    cfg: Config
    run_dir: Path
    fed: Federation
    algorithm: Algorithm
    schedule: Schedule  # matrix(t), online(t)
    exchange: RunExchange
    optimizer: NodeOptimizer
    trainer: LocalTrainer
    streams: NodeStreams
    parts: list[np.ndarray]
    node_eval: EvalSet  # examples every node is scored on
    consensus_eval: EvalSet  # examples the consensus / server models are scored on
    pad_id: int
    partition_summary: list[dict]  # every node's, on every rank
    task: Task  # what a row's loss and metric are (declora.tasks)
    group: Solo = field(default_factory=Solo)  # the processes of the run (Solo: this one hosts all nodes)
    privacy: PrivacyAccount | None = None  # privacy.level node or example: the budget spent so far
    honest: Tensor | None = None  # (n,) bool, global: the nodes that do not attack (None: no attack)
    label_names: tuple[str, ...] = ()  # classification: the name of each label id (exported with adapters)
    lr_schedule: RoundSchedule | None = None  # each of this process's nodes' place in train.schedule
    stragglers: Stragglers | None = None  # simulated speeds, clock, deadlines, asynchrony (None: not set)
    # data.validation_fraction: the validation rows the consensus models and each node are scored on
    validation: tuple[EvalSet, EvalSet] | None = None
    ran: bool = False  # engine.run has started on it: its state is that run's (an Experiment runs once)

    @property
    def n(self) -> int:
        """Nodes of the whole federation (this process hosts ``fed.n`` of them: ``group.nodes``)."""
        return self.group.layout.n or self.fed.n

    def local(self, mask: Tensor) -> Tensor:
        """This process's rows of a global (n,) per-node tensor (a local one is returned as it is)."""
        return mask[self.group.nodes] if mask.shape[0] == self.n else mask


CUT_WARNING = 0.01  # the share of cut texts above which a run warns (a few very long outliers are usual)


def _report_cut(cfg: Config, train: tuple[int, int], test: tuple[int, int]) -> None:
    """Say how many texts model.max_length cut short: a warning when it is more than a few, since the
    model then learns and is scored on their beginnings only (causal_lm: the rest of a paragraph)."""
    if not train[0] and not test[0]:
        return
    share = max(cut / max(total, 1) for cut, total in (train, test))
    say = log.warning if share > CUT_WARNING else log.info
    say(
        "model.max_length=%d cuts %d of %d training and %d of %d test %s short; raise it to keep them whole",
        cfg.model.max_length,
        *train,
        *test,
        {
            "label_words": "prompts",
            "instruction": "rows (the prompt's start goes first; a response keeps max_length - 1 tokens)",
        }.get(cfg.task.kind, "texts"),
    )


_DEFAULT_NAMES: set[Path] = set()  # handed out in this process, whether their folders exist yet or not


def default_run_dir(cfg: Config) -> Path:
    """``runs/<algorithm>-<time>``, with ``-2``, ``-3``, ... when that name is taken on disk or was given to
    an earlier run of this process in the same second (a sweep from Python builds several at once)."""
    base = Path("runs") / f"{cfg.algorithm.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path in _DEFAULT_NAMES or path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    _DEFAULT_NAMES.add(path)
    return path


def _eval_subset(
    token_ids: list[list[int]], labels: np.ndarray, limit: int | None, seed: int, key: str = ""
) -> EvalSet:
    if limit is not None and limit > len(labels):
        log.warning(
            "%s=%d asks for more than the %d held-out examples: all %d are scored",
            key,
            limit,
            len(labels),
            len(labels),
        )
    order = numpy_rng(seed, "eval").permutation(len(labels))
    keep = order if limit is None else order[:limit]
    return EvalSet([token_ids[i] for i in keep], labels[keep])


def preflight_model(cfg: Config) -> None:
    """The model folder and the seeding adapter, checked before any weight or data is loaded."""
    from declora.assets import GGUF_MODELS, asset_path, model_path
    from declora.gguf_cache import context_length
    from declora.preflight import (
        check_adapter,
        check_max_length,
        check_model_folder,
        check_model_shape,
        check_tokenizer,
    )

    if cfg.model.name in GGUF_MODELS:  # a shipped GGUF model becomes a folder on first use: its header
        check_max_length(cfg, context_length(asset_path(GGUF_MODELS[cfg.model.name])))
    else:
        folder = model_path(cfg.model.name)
        check_model_folder(folder)
        tokenizer = check_tokenizer(folder)
        check_model_shape(cfg, folder, cfg.task.kind in CAUSAL_KINDS, tokenizer.pad_token_id)
    if cfg.model.init_adapter:
        check_adapter(cfg, adapter_path(cfg.model.init_adapter))


def _task_from_folder(cfg: Config, label_names: tuple[str, ...]) -> tuple[Task, Any] | None:
    """The task and its tokenizer, built from the model folder before any weight loads, so that the task's
    checks (task.label_words against the data's labels and the tokenizer) cost nothing; None for a
    shipped GGUF model, whose tokenizer exists only once the model is converted."""
    from transformers import AutoTokenizer

    from declora.assets import GGUF_MODELS, model_path

    if cfg.model.name in GGUF_MODELS:
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(model_path(cfg.model.name)))
    return build_task(cfg.task, tokenizer, cfg.model.max_length, label_names), tokenizer


def _node_count(cfg: Config) -> int:
    return 1 if getattr(ALGORITHMS[cfg.algorithm.name], "single_node", False) else cfg.nodes


def _read_topology(cfg: Config) -> TopologyConfig:
    """The topology as the algorithm reads it: one that never gossips reads only which nodes are offline,
    so no graph of its is refused as disconnected."""
    if cfg.algorithm.name in NO_GOSSIP:
        return dataclasses.replace(cfg.topology, allow_disconnected=True)
    return cfg.topology


def check_inputs(cfg: Config, metric: str | None = None) -> None:
    """What building ``cfg``'s run checks before any weight loads (the graph, the model folder, the data,
    its partition and labels, the task), for a grid to check each cell before the first one runs; ``metric``:
    the grid's, which the cell must log (an F1 needs two labels)."""
    cfg = from_dict(to_dict(cfg))
    n = _node_count(cfg)
    build_schedule(_read_topology(cfg), n, cfg.seed)
    preflight_model(cfg)
    train = build_node_data(cfg, n, range(n), Solo()).train
    check_labels(cfg, train.label_names, metric)
    _task_from_folder(cfg, train.label_names)


def _warn_small_partitions(cfg: Config, summary: list[dict]) -> None:
    """A node with fewer rows than a batch steps on all of them: its batches are smaller than asked."""
    small = [i for i, node in enumerate(summary) if node["size"] < cfg.train.batch_size]
    if small:
        log.warning(
            "train.batch_size=%d is more than the training rows of node(s) %s (%s): each of their steps "
            "uses their whole partition",
            cfg.train.batch_size,
            small[:10],
            ", ".join(str(summary[i]["size"]) for i in small[:10]),
        )


def _warn_unlearnable_labels(cfg: Config, names: tuple[str, ...], summary: list[dict]) -> None:
    """A label no node trains on (a class only the held-out split has, say) cannot be learned: its
    held-out rows all count as errors, and the accuracy's ceiling drops by their share."""
    if cfg.task.kind in ("causal_lm", "instruction"):
        return
    totals = np.sum([node["label_counts"] for node in summary], axis=0)
    absent = [name for name, count in zip(names, totals, strict=True) if count == 0]
    if absent:
        log.warning(
            "labels %s have no training rows on any node: the model cannot learn them, and their held-out "
            "rows count as errors",
            absent,
        )


def _set_segments(cfg: Config, fed: Federation, tokenizer: Any) -> None:
    """Sentence pairs on a model that embeds two segments: its forward gets the pair's token types."""
    sep = getattr(tokenizer, "sep_token_id", None)
    if cfg.data.pair_column is not None and sep is not None and takes_segments(fed.model):
        fed.segment_sep = int(sep)


def _pad_id(fed: Federation, tokenizer: Any) -> int:
    """The id rows are padded with: config.json's pad_token_id where it has one, else the tokenizer's
    (else 0). The config's id comes first because a LLaMA-family classifier reads each row's last token
    that is not that id (the tokenizer may have none, or another); other models mask padding out, so
    for them any id serves."""
    from_config = getattr(fed.model.config, "pad_token_id", None)
    if isinstance(from_config, int):
        return from_config
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# More distinct labels than this, all numbers and some not whole, are read as a score (a similarity from
# 0 to 5, a rating), not classes; half-star ratings (0.5 to 5.0: ten classes) stay below it.
SCORE_CLASSES = 10


def check_labels(cfg: Config, names: tuple[str, ...], metric: str | None = None) -> None:
    """Labels that are legal but almost always a mistake, refused unless allow_degenerate: a single one
    (nothing to learn), or a score column taken for classes (each value a class of its own); and an F1
    to rank by (``metric``, a grid's, else eval.headline) without two labels."""
    if cfg.task.kind in ("causal_lm", "instruction"):
        return
    key, metric = ("eval.headline", cfg.eval.headline) if metric is None else ("metric", metric)
    if metric.startswith(TWO_LABEL_METRICS) and len(names) != 2:  # metrics of label 1
        accuracy = "acc_" + metric.split("_", 1)[1]
        raise ConfigError(
            f"{key}={metric!r}: the F1 and Matthews' correlation are logged for two labels (label 1 the "
            f"positive one), and the data has {len(names)} {list(names)[:5]}; rank by {accuracy}"
        )
    if cfg.allow_degenerate:
        return
    source = (
        f"data.node_files={cfg.data.node_files!r}"
        if cfg.data.node_files
        else f"data.dataset={cfg.data.dataset!r}"
    )
    if len(names) < 2:
        raise ConfigError(
            f"{source} has a single label {list(names)}: nothing to classify; "
            "use files with at least two labels, or set allow_degenerate=true"
        )
    try:
        numbers = [float(name) for name in names]
    except ValueError:  # class names, not numbers
        numbers = []
    if len(names) > SCORE_CLASSES and any(not x.is_integer() for x in numbers):
        raise ConfigError(
            f"{source} has {len(names)} distinct labels that are numbers, not all whole ({names[0]} to "
            f"{names[-1]}): a score to regress on, not classes; declora trains classifiers, so bin the "
            "score into classes, or set allow_degenerate=true to take each value as a class of its own"
        )


def _encode(
    cfg: Config, task: Task, train: TextDataset, test: TextDataset, labels: np.ndarray
) -> tuple[list[list[int]], np.ndarray, list[list[int]], np.ndarray]:
    """Token ids of the training and held-out rows, and their labels (instruction data: each row's
    response length); warns about empty responses and, above CUT_WARNING, about texts cut short."""
    test_labels = test.labels
    if train.responses is not None:  # task.kind=instruction: a row's "label" is its response length
        assert isinstance(task, Instruction) and test.responses is not None  # instruction data, both sets
        empty = sum(not r.strip() for r in train.responses)
        if empty:  # such a row teaches only to end the turn at once
            log.warning(
                "%d of %d training responses are empty: those rows train on the end of turn alone",
                empty,
                len(train.responses),
            )
        train_ids, labels = task.encode_pairs(train.texts, train.responses)
    else:
        train_ids = task.encode(train.texts, labels, train=True, pairs=train.pairs)
    train_cut = task.cut
    test_ids, test_labels = _encode_held_out(task, test)
    _report_cut(cfg, (train_cut, len(train_ids)), (task.cut, len(test_ids)))
    return train_ids, labels, test_ids, test_labels


def _encode_held_out(task: Task, rows: TextDataset) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of rows to score (the prompt alone for label words) and their labels (instruction
    data: each row's response length)."""
    if rows.responses is not None:
        assert isinstance(task, Instruction)  # instruction data
        return task.encode_pairs(rows.texts, rows.responses)
    return task.encode(rows.texts, rows.labels, train=False, pairs=rows.pairs), rows.labels


def _validation_sets(cfg: Config, task: Task, rows: TextDataset | None) -> tuple[EvalSet, EvalSet] | None:
    """The validation rows encoded as the test rows are: all of them for the consensus models, at most
    eval.node_examples of them for each node (the same seeded choice as the test rows')."""
    if rows is None:
        return None
    ids, labels = _encode_held_out(task, rows)
    seed, node_limit = cfg.eval.seed, min(cfg.eval.node_examples, len(labels))
    return _eval_subset(ids, labels, None, seed), _eval_subset(ids, labels, node_limit, seed)


def _build_exchange(
    cfg: Config,
    group: Solo,
    n: int,
    fed: Federation,
    stragglers: Stragglers | None,
    account: PrivacyAccount | None,
) -> RunExchange:
    """The exchange every message goes through: local or torch.distributed, with the codec, then wrapped
    for asynchronous stragglers and for privacy, robust mixing and attacks where the config asks."""
    codec = build_codec(cfg.comm.codec, **cfg.comm.codec_params())
    if isinstance(codec, TopKCodec) and codec.fraction >= codec.break_even():
        log.warning(
            "comm.fraction=%g with comm.codec=topk sends at least as many bytes as every entry in %s "
            "(each kept value also sends a 4-byte index; top-k saves bytes below fraction %g)",
            codec.fraction,
            codec.value_dtype,
            codec.break_even(),
        )
    exchange = (
        DistExchange(group, n, codec, cfg.seed, cfg.comm.consensus_step)
        if isinstance(group, Distributed)
        else LocalExchange(n, codec, cfg.seed, cfg.comm.consensus_step)
    )
    exchange.start(fed.tensors())  # CHOCO's public copies start at the shared initial adapter
    wrapped: RunExchange = exchange
    if stragglers is not None and cfg.stragglers.asynchronous:
        wrapped = AsyncExchange(wrapped, stragglers, dict(fed.tensors()))
    if needs_guard(cfg):
        wrapped = GuardedExchange(wrapped, cfg, group.nodes, dict(fed.tensors()), account)
    return wrapped


def build_experiment(cfg: Config, run_dir: Path | None = None, group: Solo | None = None) -> Experiment:
    """Everything global (partitions, W(t), data seeds) is derived for all n nodes; this process then
    keeps its slice ``group.nodes`` (all of them in one process) with its own frozen base. ``cfg`` is
    checked first, as load_config checks a file (one built or replaced in Python may not have been).
    The trained tensors are fp32 and trainable whatever the caller's default dtype or grad mode."""
    with torch.inference_mode(False), default_dtype(torch.float32):
        return _build_experiment(cfg, run_dir, group)


def _build_federation(cfg: Config, group: Solo, num_labels: int, middle: bool) -> Federation:
    """The frozen base with this process's nodes' LoRA factors (and heads) on this rank's device."""
    device = resolve_device(cfg.device)  # torchrun: this rank's GPU
    causal = cfg.task.kind in CAUSAL_KINDS
    fed = build_federation(cfg.model, len(group.nodes), num_labels, causal, device, cfg.precision)
    fed.node_ids = group.nodes
    # Example-level DP reads each row's own gradient: only the per-row product has one per row.
    fed.routing.product = "per_row" if cfg.privacy.level == "example" else cfg.train.lora_product
    if fed.routing.product != cfg.train.lora_product:
        log.info("privacy.level=example: train.lora_product=%s runs per_row", cfg.train.lora_product)
    log.info("device %s, precision %s", device, cfg.precision)
    if cfg.model.init_adapter:
        import_peft(fed, adapter_path(cfg.model.init_adapter))
    if middle:  # Fed-SB: R between frozen B and A, before the optimizer
        add_middle_factors(fed)
    return fed


def _build_stragglers(cfg: Config, n: int, group: Solo) -> Stragglers | None:
    """Simulated node speeds, deadlines and asynchrony (None: stragglers not set)."""
    if not enabled(cfg):
        return None
    if cfg.stragglers.asynchronous and group.world > 1:
        raise ConfigError(
            "stragglers.asynchronous=true runs in one process only (the held copies are global)"
        )
    return Stragglers(cfg, n)


def _build_trainer(
    cfg: Config,
    fed: Federation,
    group: Solo,
    parts: list[np.ndarray],
    train_ids: list[list[int]],
    labels: np.ndarray,
    pad_id: int,
    task: Task,
    account: PrivacyAccount | None,
    num_labels: int,
) -> LocalTrainer:
    """Local training of this process's nodes: their optimizer, batch streams and example-level DP."""
    lrs = {
        k: (cfg.train.head_lr or cfg.train.lr) if fed.kind_of(k) == "head" else cfg.train.lr
        for k in fed.tensors()
    }
    optimizer = build_optimizer(cfg.train, dict(fed.tensors()), lrs)
    secret = cfg.privacy.secure_noise and cfg.privacy.level == "example"  # the subsampling stays unknown
    stream_seed = secrets.randbits(62) if secret else cfg.seed
    first = int(group.nodes[0])
    streams = NodeStreams(parts, cfg.train.batch_size, stream_seed, offset=first, secret=secret)
    noise_seed = None if cfg.privacy.secure_noise else cfg.seed
    example_dp = None
    if account is not None and cfg.privacy.level == "example":
        example_dp = ExampleDP(cfg.privacy.clip, account, group.nodes, noise_seed)
    offsets = None
    if cfg.train.logit_adjustment:  # the labels each node trains on (label_flip's too)
        offsets = label_prior_offsets(parts, labels, num_labels, cfg.train.logit_adjustment)
    return LocalTrainer(
        fed,
        optimizer,
        streams,
        train_ids,
        labels,
        pad_id,
        cfg.train.max_grad_norm,
        cfg.train.tokens_per_chunk or default_tokens_per_chunk(fed.device),
        task,
        example_dp,
        group if isinstance(group, Replicas) else None,
        offsets,
    )


def _build_experiment(cfg: Config, run_dir: Path | None, group: Solo | None) -> Experiment:
    check_sections(cfg)
    cfg = from_dict(to_dict(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    group = group or Solo()
    algorithm_cls = ALGORITHMS[cfg.algorithm.name]
    n = _node_count(cfg)
    single = getattr(algorithm_cls, "single_node", False)
    if single and isinstance(group, Distributed):  # one node, P processes: a replica on each
        group = Replicas(group)
    group.set_nodes(n, cfg.dist.node_slices)
    if group.is_main:
        for line in ignored_settings(cfg):  # set, but never read by this algorithm, codec or schedule
            log.warning(line)
    first, n_local = int(group.nodes[0]), len(group.nodes)  # this process's contiguous slice
    stragglers = _build_stragglers(cfg, n, group)
    late = stragglers.late if stragglers is not None and cfg.stragglers.deadline is not None else None
    schedule = build_schedule(_read_topology(cfg), n, cfg.seed, late)  # graph checks first: they cost nothing
    preflight_model(cfg)
    data = build_node_data(cfg, n, range(first, first + n_local), group)
    train, test, parts, summary = data.train, data.test, data.parts, data.summary
    check_labels(cfg, train.label_names)
    if cfg.model.init_adapter:
        from declora.preflight import check_adapter_labels

        check_adapter_labels(cfg, train.label_names)
    early = _task_from_folder(cfg, train.label_names)  # before the model: its checks cost nothing
    if group.is_main:
        _warn_unlearnable_labels(cfg, train.label_names, summary)
        _warn_small_partitions(cfg, summary)
        if cfg.export_round == "best" and cfg.export != "none" and data.validation is None:
            log.warning(
                "export_round=best chooses the round by its score on the test rows, which then "
                "overstate it; set data.validation_fraction (0.1, say) to choose on validation rows"
            )
    if stragglers is not None:
        if cfg.train.local_unit == "epochs":  # a node's round is as long as its data
            sizes = np.array([node["size"] for node in summary])
            stragglers.set_steps(cfg.train.local_steps * -(-sizes // cfg.train.batch_size))
        stragglers.check()
    attackers = attacker_mask(cfg.attack, n, cfg.seed)  # (n,) bool
    labels = train.labels  # label_flip: the attackers train on poisoned labels (their parts unchanged)
    if cfg.attack.kind == "label_flip":
        labels = flip_labels(train.labels, parts, attackers[first : first + n_local], train.num_labels)
    fed = _build_federation(cfg, group, train.num_labels, getattr(algorithm_cls, "middle", False))
    from transformers import AutoTokenizer

    if early is None:  # a GGUF model's tokenizer: there once the model is converted
        tokenizer = AutoTokenizer.from_pretrained(str(fed.path))
        task = build_task(cfg.task, tokenizer, cfg.model.max_length, train.label_names)
    else:
        task, tokenizer = early
    train_ids, labels, test_ids, test_labels = _encode(cfg, task, train, test, labels)
    validation = _validation_sets(cfg, task, data.validation)
    _set_segments(cfg, fed, tokenizer)
    pad_id = _pad_id(fed, tokenizer)
    account = build_account(cfg, [node["size"] for node in summary], group.nodes)
    trainer = _build_trainer(
        cfg, fed, group, parts, train_ids, labels, pad_id, task, account, train.num_labels
    )
    optimizer, streams = trainer.optimizer, trainer.streams
    exchange = _build_exchange(cfg, group, n, fed, stragglers, account)
    return Experiment(
        cfg=cfg,
        run_dir=group.broadcast(run_dir or Path(cfg.run_dir or default_run_dir(cfg))),  # rank 0's clock
        fed=fed,
        algorithm=build_algorithm(fed, cfg, schedule),  # a registered one checked here
        schedule=schedule,
        exchange=exchange,
        optimizer=optimizer,
        trainer=trainer,
        streams=streams,
        parts=parts,
        node_eval=_eval_subset(
            test_ids, test_labels, cfg.eval.node_examples, cfg.eval.seed, "eval.node_examples"
        ),
        consensus_eval=_eval_subset(
            test_ids, test_labels, cfg.eval.consensus_examples, cfg.eval.seed, "eval.consensus_examples"
        ),
        pad_id=pad_id,
        partition_summary=summary,
        task=task,
        group=group,
        privacy=account,
        honest=~attackers if cfg.attack.kind != "none" else None,
        label_names=train.label_names,
        lr_schedule=RoundSchedule(cfg.train.schedule, cfg.train.warmup_rounds, cfg.rounds, fed.n),
        stragglers=stragglers,
        validation=validation,
    )
