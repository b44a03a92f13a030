"""Checks of the files a user hands in, before any weight is loaded: model folder and PEFT adapter.

A model folder needs a readable config.json and safetensors weights whose header and length agree
(pickle-only weights, ``pytorch_model.bin``, are refused without being opened: unpickling runs code). The
model's shape comes from its config on the meta device (no memory, no weights), so that
``model.max_length``, ``model.rank`` and ``model.target_modules`` are checked against the real model. An
adapter must match the run exactly (rank, scale alpha/r, target modules), or it is refused.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from declora.assets import fetch_hint
from declora.config import ALL_LINEAR, AUTO_TARGETS, Config, ConfigError, ModelConfig, shown_targets
from declora.targets import is_target, resolved_targets, suggested_targets

log = logging.getLogger(__name__)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; missing, corrupt or non-object files name the file."""
    if not path.is_file():
        raise ConfigError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what}: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a .safetensors file, after checking that the file holds every byte it announces."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConfigError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is corrupt: its safetensors header is not JSON") from err
    try:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError) as err:
        raise ConfigError(f"{path} is corrupt: its safetensors header lists no tensor offsets") from err
    announced = 8 + n + max(ends, default=0)
    if announced != size:
        raise ConfigError(f"{path} is truncated or corrupt: {size} bytes, its header announces {announced}")
    return header


def check_model_folder(folder: Path) -> dict[str, Any]:
    """config.json readable and safetensors weights complete; returns the config."""
    if not (folder / "config.json").exists():  # an adapter or a run folder given as the base model
        from declora.runfolder import is_run_folder

        if (folder / "adapter_config.json").is_file():
            raise ConfigError(
                f"model.name={str(folder)!r} is a LoRA adapter, not a base model: give it as "
                "model.init_adapter, and the model it was trained on as model.name"
            )
        if is_run_folder(folder):
            raise ConfigError(
                f"model.name={str(folder)!r} is a run folder, not a base model; to start from its adapter, "
                f"give model.init_adapter={folder / 'adapters' / 'consensus'} (or a node's)"
            )
    config = read_json_file(folder / "config.json", f"model folder {folder}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise ConfigError(
                f"model folder {folder} has only pickle weights {pickled}; they are refused without being "
                "loaded (unpickling can run code): convert them to .safetensors"
            )
        raise ConfigError(f"model folder {folder} has no weights (*.safetensors)")
    for path in weights:
        safetensors_header(path)
    return config


def _meta_model(cfg: Config, folder: Path, causal: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model folder {folder}: config.json is not a transformers config ({err})") from err
    if getattr(config, "is_encoder_decoder", False):  # T5, BART: neither one encoder nor one decoder
        raise ConfigError(
            f"model.name={cfg.model.name!r} is an encoder-decoder model ({config.model_type}), which declora "
            "does not train: use an encoder (BERT family) or a decoder-only causal LM (LLaMA family)"
        )
    if causal:
        _check_generates(cfg, config.architectures)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except (ValueError, AssertionError, NotImplementedError) as err:
        raise _unbuildable(cfg, folder, config.model_type, causal, err) from err
    if not causal:
        _check_known_head(cfg, model)
    return model


def _unbuildable(cfg: Config, folder: Path, model_type: str, causal: bool, err: Exception) -> ConfigError:
    """Why transformers could not build the model of a folder's config.json, and what to do instead."""
    if "Unrecognized configuration class" not in str(err):  # a config its own model class refuses
        return ConfigError(
            f"model folder {folder}: transformers cannot build the model its config.json describes "
            f"({type(err).__name__}: {err})"
        )
    if causal:  # transformers has no class of the kind the task needs for this model type
        return ConfigError(
            f"model.name={cfg.model.name!r} is a {model_type} model, which transformers cannot load as a "
            "causal LM (AutoModelForCausalLM): use a decoder-only causal LM (LLaMA family)"
        )
    return ConfigError(
        f"model.name={cfg.model.name!r} is a {model_type} model, which transformers cannot load as a "
        "classifier (AutoModelForSequenceClassification); classify with its language-model head instead: "
        "task.kind=label_words model.head=none (README: Causal language models)"
    )


def _check_known_head(cfg: Config, model: nn.Module) -> None:
    """declora trains, gossips and exports the classification head under the names transformers gives
    it in the BERT, DistilBERT, RoBERTa and LLaMA families; another head would stay frozen, and random."""
    from declora.model import HEAD_ROOTS

    roots = {name.split(".")[0] for name, _ in model.named_children()}
    if not roots & set(HEAD_ROOTS):
        raise ConfigError(
            f"model.name={cfg.model.name!r}: its {type(model).__name__} has no classification head declora "
            f"trains (one named {list(HEAD_ROOTS)}; its top-level modules are {sorted(roots)})"
        )


GENERATING = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # transformers' class-name endings


def _check_generates(cfg: Config, architectures: list[str] | None) -> None:
    """A causal task needs a model trained to predict the next token. An encoder's config (BERT, MiniLM)
    loads as a causal LM too, with an untrained LM head, and its perplexity would mean nothing."""
    if architectures and not any(name.endswith(GENERATING) for name in architectures):
        raise ConfigError(
            f"task.kind={cfg.task.kind} needs a causal LM; model.name={cfg.model.name!r} is {architectures} "
            "(its config.json architectures): use smollm2 or a model folder whose architectures end in "
            "ForCausalLM"
        )


def check_max_length(cfg: Config, limit: object) -> None:
    """model.max_length within the positions the model was trained for (``limit``; not an int: unknown)."""
    if isinstance(limit, int) and cfg.model.max_length > limit:
        raise ConfigError(
            f"model.max_length={cfg.model.max_length} exceeds the model's max_position_embeddings={limit}"
        )


def check_model_shape(
    cfg: Config, folder: Path, causal: bool, pad_id: int | None = None
) -> dict[str, tuple[int, int]]:
    """max_length, rank and target modules against the model, and a last-token classifier's pad id
    against ``pad_id``, the tokenizer's; returns {module: (d_in, d_out)}."""
    from declora.model import HEAD_ROOTS

    model = _meta_model(cfg, folder, causal)
    check_max_length(cfg, getattr(model.config, "max_position_embeddings", None))
    targets = resolved_targets(cfg.model.target_modules, model)
    dims = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and is_target(targets, name) and not name.startswith(HEAD_ROOTS)
    }
    if not dims and isinstance(targets, str):  # a regular expression: show full names to match
        linears = [
            k for k, m in model.named_modules() if isinstance(m, nn.Linear) and not k.startswith(HEAD_ROOTS)
        ]
        raise ConfigError(
            f"model.target_modules={targets!r} (a regular expression, matched whole against each layer's "
            f"full name, as PEFT does) matches no linear layer of {folder}; their names run from "
            f"{linears[0]!r} to {linears[-1]!r}"
            if linears
            else f"{folder} has no linear layer to adapt"
        )
    if not dims:
        other = sorted(  # named as asked, but not nn.Linear: GPT-2's Conv1D, a convolution, an embedding
            {
                f"{k.split('.')[-1]} ({type(m).__name__})"
                for k, m in model.named_modules()
                if k.split(".")[-1] in targets and not isinstance(m, nn.Linear)
            }
        )
        if other:
            conv = " (GPT-2-style Conv1D is not supported)" if any("(Conv1D)" in o for o in other) else ""
            raise ConfigError(
                f"model.target_modules={list(targets)} names layers of {folder} that "
                f"are not nn.Linear: {other}; declora's LoRA adapts nn.Linear layers only{conv}"
            )
        raise ConfigError(
            f"model.target_modules={list(targets)} matches no linear layer of {folder}; "
            f"{_adaptable_names(model)}"
        )
    named = set() if isinstance(targets, str) else set(targets)
    unmatched = sorted(named - {name.split(".")[-1] for name in dims} - {ALL_LINEAR})
    if unmatched:  # a misspelt name beside a right one would leave its layers silently unadapted
        raise ConfigError(
            f"model.target_modules names {unmatched}, which match no linear layer of {folder} that LoRA "
            f"adapts; {_adaptable_names(model)}"
        )
    if not causal:
        _check_last_token_pad(cfg, model, pad_id)
    smallest = min(min(d) for d in dims.values())
    if cfg.model.rank > smallest:
        raise ConfigError(
            f"model.rank={cfg.model.rank} exceeds the smallest adapted dimension ({smallest}) of "
            f"model.target_modules={shown_targets(targets)}; allowed: 1..{smallest}"
        )
    return dims


def _adaptable_names(model: nn.Module) -> str:
    """The names LoRA can target (a head trains whole, so it is not among them), and any Conv1D layers."""
    from declora.model import HEAD_ROOTS

    linears = sorted(
        {
            k.split(".")[-1]
            for k, m in model.named_modules()
            if isinstance(m, nn.Linear) and not k.startswith(HEAD_ROOTS)
        }
    )
    said = f"its linear layer names are {linears}"
    conv = sorted({k.split(".")[-1] for k, m in model.named_modules() if type(m).__name__ == "Conv1D"})
    if conv:
        said += f" (its {conv} are GPT-2-style Conv1D layers, which declora's LoRA does not adapt)"
    suggested = suggested_targets(getattr(model.config, "model_type", ""), linears)
    if suggested:
        said += f"; the usual choice for this model: model.target_modules=[{','.join(suggested)}]"
    return said


def _check_last_token_pad(cfg: Config, model: nn.Module, theirs: int | None) -> None:
    """A LLaMA-family classifier (its head is ``score``) reads each row's last token that is not
    config.json's pad_token_id: without one, transformers cannot classify a padded batch at all; with one
    the tokenizer does not pad with (``theirs``), a stock user's padded batch would be read at a pad."""
    if getattr(model, "score", None) is None:
        return
    config = getattr(model, "config", None)  # the transformers config (nn.Module types attributes loosely)
    ours = getattr(config, "pad_token_id", None)
    if ours is None:
        eos = getattr(config, "eos_token_id", None)
        fit = theirs if theirs is not None else eos if isinstance(eos, int) else None
        example = (
            f" (e.g. {fit}, the tokenizer's {'pad' if theirs is not None else 'eos'} id)"
            if fit is not None
            else ""
        )
        raise ConfigError(
            f"model.name={cfg.model.name!r}: its classifier reads each row's last real token, found by "
            f'config.json\'s pad_token_id, which it lacks: set "pad_token_id" in its config.json{example}'
        )
    if theirs is not None and theirs != ours:
        raise ConfigError(
            f"model.name={cfg.model.name!r}: config.json's pad_token_id is {ours} but its tokenizer pads "
            f"with {theirs}; its classifier finds each row's last real token by {ours}, so a batch the "
            "tokenizer pads would be read at a pad token: set both to one id"
        )


def check_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer. A folder without its tokenizer files still loads one, which knows only the
    special tokens: every word would become [UNK], and the run would train on nothing and end at chance."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ConfigError(
            f"model folder {folder}: its tokenizer knows only the special tokens "
            f"{tokenizer.all_special_tokens}; the folder lacks its tokenizer files (tokenizer.json, "
            "vocab.txt, ...): copy them from the base model"
        )
    return tokenizer


def check_adapter_folder(folder: Path, named: str, given: str) -> None:
    """An adapter folder (``given`` as the user wrote it, ``folder`` where it resolved, ``named`` how a
    message names it): a missing folder, and a run folder given for one of its adapters, are refused."""
    from declora.runfolder import is_run_folder

    if not folder.is_dir():
        fetch = fetch_hint(given)
        cache = f", nor an adapter in the Hugging Face cache ({fetch.removeprefix('; ')})" if fetch else ""
        raise ConfigError(f"{named} is not a folder{cache}")
    if (folder / "adapter_config.json").is_file():
        return
    exported = sorted(p for p in (folder / "adapters").glob("*") if (p / "adapter_config.json").is_file())
    if exported or is_run_folder(folder):
        shown = ", ".join(map(str, exported)) or "none (it ran with export=none)"
        raise ConfigError(f"{named} is a run folder, not an adapter; pass one of its adapters: {shown}")


def check_adapter(cfg: Config, folder: Path) -> None:
    """A PEFT adapter that seeds the run must be applied exactly: same rank, scale and target modules."""
    check_adapter_folder(folder, f"model.init_adapter={str(folder)!r}", str(cfg.model.init_adapter))
    ac = read_json_file(folder / "adapter_config.json", f"adapter {folder}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"adapter {folder}: adapter_model.safetensors is missing")
    safetensors_header(weights)
    check_adapter_config(ac, cfg.model, folder)
    _warn_other_base(cfg, folder, ac.get("base_model_name_or_path"))


def check_adapter_labels(cfg: Config, names: tuple[str, ...]) -> None:
    """A declora export records the labels its head was trained on, in order. Data with another number of
    labels cannot use the head; data naming the same labels in another order is numbered in the adapter's
    order (node_data.adapter_label_order), except per-node files, where it would read label k as the
    adapter's label k, silently wrong (refused unless allow_degenerate). Other names are taken in order,
    with a warning: "0"/"1" for "rotten"/"fresh" is how most files write labels."""
    from declora.adapter_card import card_labels
    from declora.assets import adapter_path

    if not cfg.model.init_adapter or cfg.task.kind in ("causal_lm", "instruction"):
        return
    folder = adapter_path(cfg.model.init_adapter)
    theirs, ours = card_labels(folder), [str(name) for name in names]
    if theirs is None or theirs == ours:
        return
    said = f"adapter {folder} was trained on the labels {theirs} (label k is the k-th); the data's are {ours}"
    if len(theirs) != len(ours):
        raise ConfigError(f"{said}: its head cannot classify these; give data with its {len(theirs)} labels")
    if sorted(theirs) == sorted(ours) and not cfg.allow_degenerate:
        raise ConfigError(
            f"{said}: the same labels in another order, so each would be read as another; per-node files "
            "are not renumbered: give the labels as numbers in the adapter's order, or set "
            "allow_degenerate=true if the order is meant"
        )
    if sorted(theirs) != sorted(ours):
        log.warning("%s: each data label k is taken as the adapter's label k", said)


def check_adapter_config(
    ac: dict[str, Any], m: ModelConfig, folder: Path, resolved: tuple[str, ...] | str | None = None
) -> None:
    """An adapter_config.json that the run ``m`` applies exactly: same rank, scale and target modules, and
    no PEFT feature declora's LoRA lacks (also checked where an adapter is imported, for Python callers,
    with ``resolved``: the targets the built model resolved ``auto`` to)."""
    from declora.lora import lora_scale

    r, alpha, rslora = ac.get("r"), ac.get("lora_alpha"), bool(ac.get("use_rslora", False))
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"adapter {folder}: adapter_config.json needs an integer r and a number lora_alpha")
    if r != m.rank:
        raise ConfigError(f"adapter {folder} has rank r={r}, the run has model.rank={m.rank}")
    theirs, ours = lora_scale(alpha, r, rslora), lora_scale(m.alpha, m.rank, m.rslora)
    if not math.isclose(theirs, ours, rel_tol=1e-6):
        raise ConfigError(
            f"adapter {folder} scales its update by {theirs:g} (lora_alpha={alpha}, r={r}, rslora={rslora}); "
            f"the run by {ours:g} (model.alpha={m.alpha}): set model.alpha so the scales agree"
        )
    unsupported = {  # PEFT features declora's LoRA does not apply: the run would start from another model
        "use_dora": "DoRA's magnitude vectors",
        "alpha_pattern": "per-module alphas",
        "rank_pattern": "per-module ranks",
        "lora_bias": "a bias on lora_B",
        "trainable_token_indices": "trained token embeddings",
        "layer_replication": "replicated layers",
        "layers_to_transform": "a subset of the layers",
        "exclude_modules": "excluded modules",
    }
    if _excludes_only_what_declora_leaves(ac.get("exclude_modules")):
        unsupported.pop("exclude_modules")  # declora's own export with mean pooling: the unread pooler
    for key, what in unsupported.items():
        if ac.get(key):
            raise ConfigError(
                f"adapter {folder} sets {key}={ac[key]!r} ({what}), which declora cannot apply; start from a "
                "plain LoRA adapter"
            )
    if ac.get("bias", "none") != "none":
        raise ConfigError(f"adapter {folder} trains biases (bias={ac['bias']!r}), which declora cannot apply")
    targets = ac.get("target_modules")
    targets = sorted([targets] if isinstance(targets, str) else targets or [])
    # all-linear resolves against the model: import_peft then finds a tensor for every adapted layer or stops
    # a regular expression too: the run's own export lists the full names it resolved to; auto is compared
    # once resolved (where the adapter is imported into the built model)
    run = m.target_modules if resolved is None or m.target_modules != (AUTO_TARGETS,) else resolved
    if isinstance(run, str) or {ALL_LINEAR, AUTO_TARGETS} & set(run) or targets == sorted(run):
        return
    said = f"auto, which adapts {sorted(run)} here" if run != m.target_modules else str(sorted(run))
    raise ConfigError(f"adapter {folder} targets {targets}, the run model.target_modules={said}")


def _excludes_only_what_declora_leaves(excluded: object) -> bool:
    """An adapter's exclude_modules that names only layers declora never adapts itself: what mean pooling
    never reads (the pooler; declora's export lists it) and a classifier head. A run with
    ``model.pooling=cls`` adapts the pooler, and importing such an adapter then stops at its missing
    tensors, naming them."""
    from declora.model import HEAD_ROOTS
    from declora.pooling import skipped_by_mean

    names = [excluded] if isinstance(excluded, str) else excluded
    return (
        isinstance(names, list)
        and bool(names)
        and all(
            isinstance(name, str) and (skipped_by_mean(name) or name.startswith(HEAD_ROOTS)) for name in names
        )
    )


def _warn_other_base(cfg: Config, folder: Path, theirs: object) -> None:
    """An adapter made on another base fits every shape of the run's and still starts it from another
    model: say so (a warning, since one model may live under two names, a hub id and a local folder)."""
    from declora.assets import GGUF_MODELS, model_path

    if not isinstance(theirs, str) or not theirs or cfg.model.name in GGUF_MODELS:
        return
    ours = model_path(cfg.model.name)
    same = Path(theirs).expanduser().resolve() == ours.resolve() or Path(theirs).name == ours.name
    if not same:
        log.warning(
            "adapter %s was made on base %r; this run's base is %s: if they are not the same model, the "
            "nodes start from another model than the adapter's",
            folder,
            theirs,
            ours,
        )
