"""PEFT as the interchange format: any node's adapter, or a consensus adapter, written as a standard PEFT
folder that stock PeftModel loads and reproduces (export_peft), and a PEFT folder read back to seed every
node of a run (import_peft)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from declora.adapter_card import AdapterCard, write_card
from declora.config import ALL_LINEAR
from declora.model import HEAD_ROOTS, Federation, fold_middle
from declora.pooling import skipped_by_mean, write_pooling_note
from declora.quantize import QuantizedLinear
from declora.runfolder import save_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def export_targets(fed: Federation) -> list[str]:
    """The target_modules an exported adapter names: the config's (auto: the names it picked), or under
    all-linear the names of the layers it resolved to (explicit, so that stock PEFT adapts exactly these
    whatever its own shorthand takes in); under a regular expression the full names of the adapted layers,
    which PEFT matches exactly."""
    if isinstance(fed.targets, str):
        return sorted(fed.lora)
    if ALL_LINEAR in fed.targets:
        return sorted({name.split(".")[-1] for name in fed.lora})
    return sorted(fed.targets)


def unadapted_targets(fed: Federation) -> list[str]:
    """Linear layers whose name matches the exported target_modules but that carry no LoRA (the head, and
    what mean pooling never reads, such as BERT's pooler: pooling.MEAN_SKIPS): PEFT must leave them alone."""
    targets = export_targets(fed)
    return sorted(
        name
        for name, module in fed.model.named_modules()
        if isinstance(module, (nn.Linear, QuantizedLinear))
        and name.split(".")[-1] in targets
        and name not in fed.lora
        and not name.startswith(HEAD_ROOTS)
    )


def _frozen_saved_modules(fed: Federation, roots: list[str]) -> dict[str, Tensor]:
    """The frozen weights of modules that PEFT's modules_to_save (``roots``) also catches, by the end of
    their names, though the run does not train them (DistilBERT's pre_classifier beside its classifier
    under mean pooling): stock PEFT loads such a module's copy from the adapter file and fails without it."""
    state = {}
    for name, module in fed.model.named_modules():
        if name and name.split(".")[0] not in roots and any(name.endswith(root) for root in roots):
            for key, value in module.state_dict().items():
                state[f"base_model.model.{name}.{key}"] = value.detach().float().cpu().contiguous().clone()
    return state


def export_peft(
    fed: Federation,
    single: dict[str, Tensor],
    folder: str | Path,
    card: AdapterCard | None = None,
    shown: Path | None = None,
) -> Path:
    """Write one adapter (tensors with a node axis of 1) as a PEFT folder that PeftModel loads; with a
    ``card``, also what stock loaders and people need (declora.adapter_card), its README naming the
    folder as ``shown`` (its final place) when that is given."""
    from peft import LoraConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    single = fold_middle(single)  # Fed-SB's R into B: PEFT has no middle factor and would ignore it
    rank = next(v.shape[1] for k, v in single.items() if k.endswith(".lora_A"))
    state = {}
    for k, v in single.items():
        module, _, leaf = k.rpartition(".")
        key = f"{module}.{leaf}.weight" if leaf.startswith("lora_") else k
        state[f"base_model.model.{key}"] = v[0].detach().cpu().contiguous().clone()  # from any device
    roots = sorted({name.split(".")[0] for name in fed.heads})
    state.update(_frozen_saved_modules(fed, roots))
    # A rank-m adapter keeps the run's effective scale s: PEFT applies alpha'/m (or alpha'/sqrt(m)).
    alpha = fed.scale * (math.sqrt(rank) if fed.cfg.rslora else rank)
    # absolute: a relative folder would be read as a hub id from any other working directory
    base = Path(fed.path).resolve()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; it reads any number (alpha / r)
        target_modules=export_targets(fed),
        exclude_modules=unadapted_targets(fed) or None,
        lora_dropout=fed.cfg.dropout,
        use_rslora=fed.cfg.rslora,
        task_type="CAUSAL_LM" if fed.causal else "SEQ_CLS",
        modules_to_save=roots or None,
        base_model_name_or_path=str(base),
    )
    config.save_pretrained(str(folder))
    save_tensors(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if not fed.causal:  # how to reproduce the prediction with stock PEFT (what the head reads)
        num_labels = cast("PreTrainedConfig", fed.model.config).num_labels  # fed.model: an HF model
        assert num_labels is not None  # load_base built it with num_labels, so its id2label is set
        write_pooling_note(folder, fed.pooling, str(base), num_labels, fed.cfg.max_length, fed.head_input)
    if card is not None:
        pooling = None if fed.causal else fed.pooling
        write_card(folder, card, base, fed.causal, pooling, shown, fed.head_input)
    return folder


def check_same_pooling(fed: Federation, folder: Path) -> None:
    """A classifier head trained on one pooling (declora's export records it) reads another feature under
    the other: the run would start far from the adapter's accuracy, silently. Known only once the run's
    ``auto`` is resolved, so checked here, with the model built and nothing of the run written yet."""
    from declora.pooling import POOLING_FILE

    note = folder / POOLING_FILE
    if fed.causal or not note.is_file():
        return
    try:
        theirs = json.loads(note.read_text()).get("pooling")
    except (ValueError, AttributeError):
        return  # not declora's note: nothing known about the pooling
    if theirs in ("mean", "cls") and theirs != fed.pooling:
        raise ValueError(
            f"adapter {folder} was trained with pooling {theirs!r} ({POOLING_FILE}); this run pools "
            f"{fed.pooling!r} (model.pooling={fed.cfg.pooling}), so its head would read another feature: "
            f"set model.pooling={theirs}"
        )


def import_peft(fed: Federation, folder: str | Path) -> None:
    """Seed every node with the adapter in a PEFT folder (same targets, rank and scale as the run)."""
    folder = Path(folder)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{folder} is not a PEFT adapter folder: need adapter_config.json and adapter_model.safetensors"
        )
    from declora.preflight import check_adapter_config, read_json_file  # preflight imports this module

    check_adapter_config(read_json_file(cfg_file, f"adapter {folder}"), fed.cfg, folder, fed.targets)
    check_same_pooling(fed, folder)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    used = set()
    with torch.no_grad():
        for name, param in fed.tensors().items():
            module, _, leaf = name.rpartition(".")
            key = f"{module}.{leaf}.weight" if leaf.startswith("lora_") else name
            if key in state:
                used.add(key)
                value = state[key]
                if tuple(value.shape) != tuple(param.shape[1:]):
                    raise ValueError(
                        f"adapter in {folder}: {key} has shape {tuple(value.shape)}, the run needs "
                        f"{tuple(param.shape[1:])}"
                    )
                if not torch.isfinite(value).all():
                    raise ValueError(f"adapter in {folder}: {key} holds NaN or Inf values")
                param.copy_(value.expand_as(param))
            elif Federation.kind_of(name) != "head":
                raise KeyError(f"adapter in {folder} has no tensor for {key}")
    # What mean pooling never reads (DistilBERT's pre_classifier, which declora's own export carries for
    # stock PEFT) changes no prediction of this run: it is not applied, and not a reason to refuse.
    unread = {k for k in state if fed.pooling == "mean" and skipped_by_mean(k)}
    unused = sorted(set(state) - used - unread)
    if unused:  # e.g. a trained lm_head (modules_to_save), or a head for a run that has none (a causal LM)
        raise ValueError(
            f"adapter in {folder} holds {len(unused)} tensors this run would not apply ({unused[:3]}"
            f"{' ...' if len(unused) > 3 else ''}): it would start from another model than the adapter's"
        )
