"""Config value checks: each key on its own against its allowed values (declora.allowed), then the checks
that relate several keys. Each failure is a ConfigError that names the bad value and what is allowed,
raised before any work. The privacy, robust and attack sections have their own module
(guard_rules.validate_guard), the stragglers section is checked beside its code
(stragglers.validate_stragglers); ``validate`` calls both. Which keys may change on resume:
declora.resume_rules."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import typing
from typing import Any

from declora.allowed import MAX_EPOCHS, TWO_LABEL_METRICS, check_choices, check_ranges, refuse_empty_names
from declora.config import ALL_LINEAR, ALTERNATING, AUTO_TARGETS, Config, ConfigError, flatten, to_dict


def _validate_partition(cfg: Config) -> None:
    part = cfg.partition
    if part.kind == "column" and not part.column:
        raise ConfigError(
            "partition.kind=column needs partition.column, the column whose values are the nodes"
        )
    if cfg.data.node_files is not None and cfg.data.test_file is None:
        raise ConfigError(
            "data.node_files needs data.test_file: every node is scored on the same held-out rows"
        )


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express; names the bad value and the allowed ones."""
    from declora.plugins import load_plugins

    load_plugins(cfg.plugins)  # first: they add the algorithm names checked below
    flat = flatten(to_dict(cfg))
    _check_values(cfg, flat)
    cfg = _resolve_headline(cfg)
    _check_training_keys(cfg)
    for check in CROSS_CHECKS:
        check(cfg)
    _validate_heterogeneous(cfg)
    _validate_server(cfg)
    _validate_task(cfg)
    _validate_topk(cfg)
    _validate_partition(cfg)
    from declora.stragglers import validate_stragglers

    validate_stragglers(cfg)
    from declora.guard_rules import validate_guard  # privacy, robust mixing and attacks

    validate_guard(cfg)
    _check_registered(cfg, flat)  # a typo stops the run before the model loads
    _check_trackers(cfg)
    return cfg


def _check_values(cfg: Config, flat: dict[str, Any]) -> None:
    """Each key on its own: choices, positive counts, ranges, names, the device and the quantizer."""
    check_choices(flat)
    if (
        cfg.model.quant_backend == "bitsandbytes"
        and cfg.model.base_quantization == "nf4"  # the only base it decodes (else warned as unread)
        and importlib.util.find_spec("bitsandbytes") is None
    ):
        raise ConfigError(
            "model.quant_backend=bitsandbytes but bitsandbytes is not installed "
            "(pip install 'declora[quant]'); use model.quant_backend=auto or declora"
        )
    from declora.device import check_device

    try:
        check_device(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_ranges(flat)
    refuse_empty_names(flat)
    targets = cfg.model.target_modules
    if isinstance(targets, str):  # a regular expression (PEFT's rule): it must compile
        try:
            re.compile(targets)
        except re.error as err:
            raise ConfigError(
                f"model.target_modules={targets!r} is not a regular expression ({err}); a string other "
                f"than {ALL_LINEAR} is matched whole against each layer's full name, as in PEFT, or give a "
                "list of layer names"
            ) from err
    elif ALL_LINEAR in targets and len(targets) > 1:
        raise ConfigError(
            f"model.target_modules={list(targets)}: {ALL_LINEAR} already names every linear layer; give it "
            "alone, or list the layers"
        )
    elif AUTO_TARGETS in targets and len(targets) > 1:
        raise ConfigError(
            f"model.target_modules={list(targets)}: {AUTO_TARGETS} picks the layers itself; give it alone, "
            "or list the layers"
        )


def _check_training_keys(cfg: Config) -> None:
    """The switching interval, epochs per round and warm-up rounds, each against the keys it depends on."""
    interval = cfg.algorithm.switch_interval
    if interval != "auto" and (not isinstance(interval, int) or interval <= 0):
        raise ConfigError(f"algorithm.switch_interval={interval!r} must be a positive integer or 'auto'")
    if interval == "auto" and cfg.algorithm.name in ALTERNATING - {"tad_lora"}:
        from declora.algorithms.alternating import auto_interval_refused

        raise ConfigError(auto_interval_refused(cfg.algorithm.name))
    if cfg.train.local_unit == "epochs" and cfg.train.local_steps > MAX_EPOCHS:
        raise ConfigError(
            f"train.local_steps={cfg.train.local_steps} epochs per round is out of range with "
            f"train.local_unit=epochs; allowed: [1, {MAX_EPOCHS}]"
        )
    if not 0 <= cfg.train.warmup_rounds <= cfg.rounds:
        raise ConfigError(
            f"train.warmup_rounds={cfg.train.warmup_rounds} must be in [0, rounds={cfg.rounds}]"
        )


def _check_registered(cfg: Config, flat: dict[str, Any]) -> None:
    """Codec, graph, weights, schedule and algorithm are names in registries (a plugin's included), and a
    registered algorithm's own check_config passes."""
    from declora.algorithms import ALGORITHMS, SHIPPED
    from declora.comm.codecs import CODECS, build_codec
    from declora.plugins import check_listed
    from declora.schedules import SCHEDULES
    from declora.topology import GRAPHS, WEIGHTS

    for key, registry in (
        ("comm.codec", CODECS),
        ("topology.graph", GRAPHS),
        ("topology.weights", WEIGHTS),
        ("topology.schedule", SCHEDULES),
    ):
        if flat[key] not in registry:
            raise ConfigError(f"{key}={flat[key]!r} is not known; choose one of {sorted(registry)}")
    try:
        build_codec(cfg.comm.codec, **cfg.comm.codec_params())
    except ValueError as err:
        raise ConfigError(f"comm: {err}") from err
    if cfg.algorithm.name not in ALGORITHMS:
        added = sorted(set(ALGORITHMS) - SHIPPED)
        hint = (
            f"plugins {list(cfg.plugins)} were imported; registered algorithms: {added}"
            if cfg.plugins
            else "or register your own: plugins=[module or .py file], docs/extending.md"
        )
        raise ConfigError(
            f"algorithm.name={cfg.algorithm.name!r} is not known; choose one of {sorted(SHIPPED)} ({hint})"
        )
    check_listed(cfg.algorithm.name, cfg.plugins)
    own_check = getattr(ALGORITHMS[cfg.algorithm.name], "check_config", None)  # a registered algorithm's
    if own_check is not None:
        try:
            own_check(cfg)
        except ValueError as err:
            raise ConfigError(f"algorithm.name={cfg.algorithm.name}: {err}") from err
        except Exception as err:  # a bug in the check itself: say whose, and what it raised
            raise ConfigError(
                f"algorithm.name={cfg.algorithm.name}: its check_config raised {type(err).__name__}: {err}"
            ) from err


def _check_trackers(cfg: Config) -> None:
    from declora.trackers import TRACKERS, setup_problem

    unknown = sorted(set(cfg.log.trackers) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"log.trackers: {unknown[0]!r} is not a tracker; choose from {sorted(TRACKERS)}")
    twice = sorted({t for t in cfg.log.trackers if cfg.log.trackers.count(t) > 1})
    if twice:  # two mirrors of one kind would write one run folder's logs twice over
        raise ConfigError(f"log.trackers names {twice[0]!r} twice; list each tracker once")
    if problem := setup_problem(cfg):  # before any work, not after the run folder is made
        raise ConfigError(problem)


def _check_graph_fits(cfg: Config) -> None:
    """The mixing matrix W(t) is dense (n x n float64, a few copies while it is built and checked): a
    node count whose W cannot fit in this machine's memory is refused before any work."""
    n = cfg.nodes
    need = 4 * n * n * 8  # bytes: W, its checks and the spectral summary's copies
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: nothing to compare with
        return
    if need > memory:
        raise ConfigError(
            f"nodes={n}: the dense mixing matrix W ({n} x {n}) and its working copies need about "
            f"{need / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB"
        )


def _check_degenerate(cfg: Config) -> None:
    if cfg.model.alpha == 0 and not cfg.allow_degenerate:
        raise ConfigError(
            "model.alpha=0 makes every LoRA update zero (scale alpha/r = 0); use a positive alpha, or set "
            "allow_degenerate=true if that is what you mean"
        )
    a, m = cfg.algorithm, cfg.model
    a_first = a.name in ALTERNATING and a.first_phase == "A"
    if a_first and m.head != "train" and not m.init_adapter and not cfg.allow_degenerate:
        raise ConfigError(
            f"algorithm.first_phase=A with algorithm.name={a.name} and model.head={m.head}: B starts at "
            "0, so A's gradient is zero and nothing trains in the first phase; use first_phase=B, start "
            "from model.init_adapter, or set allow_degenerate=true if that is what you mean"
        )


def _check_slices(cfg: Config) -> None:
    from declora.algorithms import ALGORITHMS

    slices = cfg.dist.node_slices
    if slices is not None and getattr(ALGORITHMS.get(cfg.algorithm.name), "single_node", False):
        raise ConfigError(
            f"dist.node_slices={list(slices)} does not apply to algorithm.name={cfg.algorithm.name}, a "
            "single-node algorithm: every process holds a replica of the one node and a share of each "
            "batch; remove dist.node_slices"
        )
    if slices is not None and (sum(slices) != cfg.nodes or min(slices) < 1):
        raise ConfigError(
            f"dist.node_slices={list(slices)} must be positive counts that sum to nodes={cfg.nodes}"
        )


def refuse_if_set(section: str, values: Any, keys: typing.Iterable[str], why: str) -> None:
    """A setting that would be silently ignored is refused: the first of ``keys`` of the config
    section ``values`` (a dataclass named ``section``) that differs from its default, with ``why``."""
    defaults = type(values)()
    for key in keys:
        value = getattr(values, key)
        if value != getattr(defaults, key):
            raise ConfigError(f"{section}.{key}={value!r} has no effect {why}")


def _check_optimizer(cfg: Config) -> None:
    """A setting of the optimizer not chosen would be silently ignored: refuse it instead."""
    t = cfg.train
    foreign = {"adamw": ("momentum", "nesterov"), "sgd": ("betas", "eps")}[t.optimizer]
    other = "sgd" if t.optimizer == "adamw" else "adamw"
    refuse_if_set(
        "train", t, foreign, f"with train.optimizer={t.optimizer}; set train.optimizer={other} or drop it"
    )
    if t.nesterov and t.momentum == 0:
        raise ConfigError("train.nesterov=true needs train.momentum > 0 (it is 0)")


def _check_logit_adjustment(cfg: Config) -> None:
    """The offsets are a classifier's, and read each node's label counts, which DP-SGD does not cover."""
    tau = cfg.train.logit_adjustment
    if tau and cfg.task.kind != "sequence_classification":
        raise ConfigError(
            f"train.logit_adjustment={tau} adjusts a classifier head's logits (task.kind="
            f"sequence_classification); task.kind={cfg.task.kind} has none: set train.logit_adjustment=0"
        )
    if tau and cfg.privacy.level == "example":
        raise ConfigError(
            f"train.logit_adjustment={tau} with privacy.level=example: the offsets come from each node's "
            "label counts, which example-level DP does not account for; set train.logit_adjustment=0 or use "
            "privacy.level=node"
        )


# read from a user's table
TABLE_KEYS = ("subset", "split", "test_file", "test_split", "text_column", "label_column", "pair_column")


def _check_unread_data_keys(cfg: Config) -> None:
    """Column and split settings that the data would silently ignore are refused: a table's settings with a
    shipped corpus (its own columns and held-out split; Rotten Tomatoes: by movie), and the text and label
    columns with instruction data."""
    from declora.assets import DATA

    d = cfg.data
    if cfg.task.kind == "instruction":  # prompts and responses: the text and label columns are not read
        why = "with task.kind=instruction, which reads data.prompt_column and data.response_column"
        why += " (or data.messages_column)"
        refuse_if_set("data", d, ("text_column", "label_column"), why)
    else:  # a text and (but for plain language modelling) a label per row: no prompt or messages
        why = f"with task.kind={cfg.task.kind}; it applies to task.kind=instruction"
        refuse_if_set("data", d, ("prompt_column", "response_column", "messages_column"), why)
    if cfg.task.kind == "causal_lm":
        refuse_if_set("data", d, ("label_column",), "with task.kind=causal_lm, which reads the text alone")
    if cfg.task.kind not in ("sequence_classification", "label_words"):  # a text alone: no second one
        why = f"with task.kind={cfg.task.kind}; pairs are classified (sequence_classification, label_words)"
        refuse_if_set("data", d, ("pair_column",), why)
    if d.test_file is not None:
        refuse_if_set("data", d, ("test_fraction",), "with data.test_file, which holds the held-out rows")
    if d.node_files is not None:
        why = "with data.node_files: each node's file is its own; hold out validation rows of each file"
        refuse_if_set("data", d, ("validation_fraction",), why)
    if cfg.eval.patience is not None and d.validation_fraction is None:
        raise ConfigError(
            f"eval.patience={cfg.eval.patience} stops on the score of validation rows, and the run has none: "
            "set data.validation_fraction (0.1, say); stopping on the test rows would choose by them"
        )
    if d.dataset in DATA and d.node_files is None:
        why = f"with the shipped data.dataset={d.dataset!r} (its own columns and held-out split)"
        why += "; it applies to a user's table or folder"
        refuse_if_set("data", d, TABLE_KEYS, why)


def _check_columns_differ(cfg: Config) -> None:
    """A label column that is the text column gives every row its own class (of a user's table)."""
    d = cfg.data
    if cfg.task.kind not in ("causal_lm", "instruction") and d.text_column == d.label_column:
        raise ConfigError(
            f"data.text_column and data.label_column are both {d.text_column!r}: name the column of the "
            "labels in data.label_column"
        )
    if d.pair_column is not None and d.pair_column in (d.text_column, d.label_column):
        other = "text" if d.pair_column == d.text_column else "label"
        raise ConfigError(
            f"data.pair_column and data.{other}_column are both {d.pair_column!r}: data.pair_column names "
            "the column of each row's second text (sentence2, hypothesis)"
        )


# Checks that relate several keys; each takes the whole config and raises ConfigError.
CROSS_CHECKS: list[typing.Callable[[Config], None]] = [
    _check_graph_fits,
    _check_degenerate,
    _check_slices,
    _check_optimizer,
    _check_logit_adjustment,
    _check_unread_data_keys,
    _check_columns_differ,
]


def _validate_heterogeneous(cfg: Config) -> None:
    a, r = cfg.algorithm, cfg.model.rank
    for key, values in (("ranks", a.ranks), ("sketch_ratios", a.sketch_ratios)):
        if values is not None and len(values) != cfg.nodes:
            raise ConfigError(f"algorithm.{key} has {len(values)} entries; nodes={cfg.nodes} needs one each")
    if a.ranks is not None and not all(1 <= k <= r for k in a.ranks):
        raise ConfigError(f"algorithm.ranks={list(a.ranks)}: every rank must be in [1, model.rank={r}]")
    if a.sketch_ratios is not None and not all(0 < x <= 1 for x in a.sketch_ratios):
        raise ConfigError(f"algorithm.sketch_ratios={list(a.sketch_ratios)}: every ratio must be in (0, 1]")
    m = a.clients_per_round
    if m is not None and not 1 <= m <= cfg.nodes:
        raise ConfigError(f"algorithm.clients_per_round={m} must be in [1, nodes={cfg.nodes}] or null")


def topk_of_states(name: str, who: str, other: str = "") -> ConfigError:
    """Why top-k cannot carry a whole state to a server (the config's check, and ServerModel's for a
    registered algorithm)."""
    return ConfigError(
        f"comm.codec=topk with algorithm.name={name}: {who} to the server, and top-k of a state (not of a "
        f"change) drops most of it; use comm.codec=quantize or fp16{other}"
    )


def _validate_topk(cfg: Config) -> None:
    """topk is sound where a node sends a change against a reference its receivers share: gossip through
    CHOCO's public copies on a fixed graph, and FSLoRA/HetLoRA's deltas to the server."""
    from declora.algorithms import SENDS_STATES

    c, t, name = cfg.comm, cfg.topology, cfg.algorithm.name
    if c.codec != "topk" or name in ("local", "centralized"):
        return
    if name in SENDS_STATES:
        raise topk_of_states(name, "the nodes upload whole factors")
    if name in ("fslora", "hetlora") and cfg.model.head == "train":
        raise topk_of_states(name, "the nodes upload their trained head", ", or model.head=frozen")
    if name == "dec_gt":
        raise ConfigError(
            "comm.codec=topk with algorithm.name=dec_gt: CHOCO's public copies are not built for its "
            "tracking message; use comm.codec=quantize, fp16, bf16 or fp32"
        )
    if name in ("fslora", "hetlora"):
        return
    if c.error_feedback:
        raise ConfigError(
            "comm.error_feedback=true with gossip: CHOCO-gossip already carries what was not sent "
            "(X - X̂ is sent again next round); set comm.error_feedback=false"
        )
    moving = {"topology.schedule": (t.schedule, "static"), "topology.link_failure": (t.link_failure, 0.0)}
    moving["topology.node_dropout"] = (t.node_dropout, 0.0)
    moving["stragglers.deadline"] = (cfg.stragglers.deadline, None)  # a late node is offline that round
    for key, (value, needed) in moving.items():
        if value != needed:
            raise ConfigError(
                f"{key}={value!r} with comm.codec=topk: CHOCO-gossip needs every neighbour to hear every "
                f"message so that their public copies agree; use {key}={needed!r} (or another codec)"
            )


def _validate_server(cfg: Config) -> None:
    s = cfg.server
    if s.betas is not None and not all(0 <= b < 1 for b in s.betas):
        raise ConfigError(f"server.betas={list(s.betas)}: each must be in [0, 1)")
    from declora.algorithms import FOLDS_INTO_BASE, SERVED, SHIPPED

    # A server setting for a run with no server would be ignored (a registered algorithm may have one).
    if cfg.algorithm.name not in SERVED and cfg.algorithm.name in SHIPPED:
        keys = [f.name for f in dataclasses.fields(s)]
        why = f"with algorithm.name={cfg.algorithm.name}, which has no server"
        why += f"; server.* applies to {sorted(SERVED)}"
        refuse_if_set("server", s, keys, why)
    folds = cfg.algorithm.name in FOLDS_INTO_BASE
    if folds and cfg.server.optimizer not in ("auto", "average"):
        raise ConfigError(
            f"server.optimizer={cfg.server.optimizer} with algorithm.name={cfg.algorithm.name}: its exact "
            "aggregation is the plain weighted mean; use server.optimizer=average (or auto)"
        )
    # The fold is exact only into fp32 weights: a quantized base has none to add to, and a bf16 base
    # rounds most of FedEx-LoRA's small residual away (measured: 90 % of it in one round of a tiny BERT).
    given = {"export": cfg.export, "model.base_quantization": cfg.model.base_quantization}
    given["precision"] = cfg.precision
    needed = {"export": "none", "model.base_quantization": "none", "precision": "fp32"}
    bad = [f"{key}={value!r}" for key, value in given.items() if value != needed[key]]
    if folds and bad:
        raise ConfigError(
            f"algorithm.name={cfg.algorithm.name} folds each round's aggregate into the frozen base: it "
            "needs export=none (the factors alone would not reproduce the model), "
            "model.base_quantization=none and precision=fp32 (a fold into a bf16 or quantized base is "
            f"rounded away); got {' and '.join(bad)}"
        )
    if cfg.algorithm.name in ("scaffold", "dec_gt") and cfg.train.local_unit != "steps":
        raise ConfigError(
            f"algorithm.name={cfg.algorithm.name} with train.local_unit={cfg.train.local_unit!r}: its "
            "corrections divide by the local step count K, the same for every node; use "
            "train.local_unit=steps"
        )
    if cfg.algorithm.name in ("fed_sb", "dec_sb"):
        _validate_middle(cfg)
    if s.fraction < 1 and cfg.algorithm.clients_per_round is not None:
        raise ConfigError(
            f"server.fraction={s.fraction} and algorithm.clients_per_round={cfg.algorithm.clients_per_round} "
            "both sample nodes: set only one"
        )


def _validate_middle(cfg: Config) -> None:
    """Fed-SB's frozen B is its own seeded draw and R's gradient comes through autograd (not per row)."""
    name = cfg.algorithm.name
    if cfg.model.init_adapter:
        raise ConfigError(
            f"algorithm.name={name} with model.init_adapter={cfg.model.init_adapter!r}: its B is a frozen "
            "seeded draw and its R starts at 0; drop model.init_adapter"
        )
    if cfg.privacy.level == "example":
        raise ConfigError(
            f"algorithm.name={name} with privacy.level=example is not supported (per-example gradients of "
            "R are not collected); use privacy.level none or node"
        )


def _measure(kind: str) -> str:
    """The prefix of the metrics a task logs: perplexity for generation, else accuracy."""
    return "ppl_" if kind in ("causal_lm", "instruction") else "acc_"


def _resolve_headline(cfg: Config) -> Config:
    """eval.headline=auto -> the metric a run of this task and algorithm has a model for: the averaged
    factors, or each node's own model where no model is shared (PERSONAL)."""
    if cfg.eval.headline != "auto":
        return cfg
    from declora.algorithms import PERSONAL

    metric = _measure(cfg.task.kind) + ("node_mean" if cfg.algorithm.name in PERSONAL else "avg_factors")
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, headline=metric))


def check_measured(cfg: Config, metric: str, key: str = "eval.headline") -> None:
    """A run of ``cfg`` logs ``metric`` (named ``key`` in the error): the task measures its kind, and a
    ``*_server`` metric needs an algorithm with a server model."""
    kind = cfg.task.kind
    prefix = _measure(kind)
    # exact match: instruction only; F1 and MCC of label 1: classification (two labels: checked with the data)
    classes = (prefix, *TWO_LABEL_METRICS)
    allowed = {"instruction": (prefix, "em_"), "causal_lm": (prefix,)}.get(kind, classes)
    if not metric.startswith(allowed):
        raise ConfigError(
            f"{key}={metric!r} is not measured for task.kind={kind}; use {' or '.join(allowed)}*"
        )
    from declora.algorithms import PERSONAL, SERVER_MODEL, SHIPPED

    if metric.endswith("_server") and cfg.algorithm.name not in SHIPPED:
        raise ConfigError(
            f"{key}={metric!r}: a registered algorithm ({cfg.algorithm.name}) cannot rank by a *_server "
            f"metric (its {metric} is logged all the same when it has a server model); use "
            f"{metric.replace('_server', '_avg_factors')}"
        )
    if metric.endswith("_server") and cfg.algorithm.name not in SERVER_MODEL:
        own = "_node_mean" if cfg.algorithm.name in PERSONAL else "_avg_factors"
        raise ConfigError(
            f"{key}={metric!r}: algorithm.name={cfg.algorithm.name} has no server model; "
            f"use {metric.replace('_server', own)} or a server algorithm {sorted(SERVER_MODEL)}"
        )


def _validate_task(cfg: Config) -> None:
    kind, head = cfg.task.kind, cfg.model.head
    check_measured(cfg, cfg.eval.headline)
    from declora.tables import file_format

    for key in ("dataset", "test_file"):
        source = getattr(cfg.data, key)
        if kind != "causal_lm" and source is not None and file_format(source) == ".txt":
            raise ConfigError(
                f"data.{key}={source!r}: a .txt file is plain text, one example per paragraph, for "
                f"task.kind=causal_lm; task.kind={kind} reads a table with a text and a label column "
                "(csv, tsv, jsonl, parquet, ...)"
            )
    if kind != "sequence_classification" and cfg.model.pooling == "mean":
        raise ConfigError(
            f"model.pooling='mean' is for encoder classifiers (task.kind=sequence_classification); "
            f"task.kind={kind} reads the causal LM's own logits: leave model.pooling=auto"
        )
    if kind == "sequence_classification":
        if head == "none":
            raise ConfigError(
                "model.head='none' is for causal LMs (task.kind=label_words, causal_lm or instruction); "
                "task.kind=sequence_classification needs model.head=train or frozen"
            )
        return
    if head == "train":  # a causal LM predicts with its own (frozen, shared) LM head: nothing per node
        raise ConfigError(
            f"model.head='train' needs a classifier head, and task.kind={kind} runs a causal LM (model.name: "
            "smollm2 or a LLaMA-family folder, not an encoder), which has none: set model.head=none (or "
            "frozen)"
        )
    if kind == "label_words" and cfg.task.template.count("{text}") != 1:  # the other kinds never read it
        raise ConfigError(
            f"task.template={cfg.task.template!r} must contain {{text}} exactly once (the review goes there; "
            "any other {...} stays as written)"
        )
    if kind == "label_words":  # {pair} where data.pair_column's text goes: both or neither
        pairs, slots = cfg.data.pair_column is not None, cfg.task.template.count("{pair}")
        if pairs and slots != 1:
            raise ConfigError(
                f"task.template={cfg.task.template!r} must contain {{pair}} exactly once with "
                f"data.pair_column={cfg.data.pair_column!r} (the second text goes there)"
            )
        if slots and not pairs:
            raise ConfigError(
                f"task.template={cfg.task.template!r} has {{pair}}, and no data.pair_column gives a second "
                "text to put there; name its column, or drop {pair}"
            )
