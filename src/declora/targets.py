"""Which linear layers LoRA adapts: ``model.target_modules`` read as PEFT reads it (a list of layer names,
each matching the last part of a layer's name; all-linear; a string: a regular expression the full name
matches whole), plus ``auto``: the layers PEFT adapts by default in a model of that type, else the
attention's query and value projections under the names the common families give them.
"""

from __future__ import annotations

import re

from torch import nn

from declora.config import ALL_LINEAR, AUTO_TARGETS, ConfigError

# The attention's query and value projections (or its fused projection) as the common families name them,
# for a model type PEFT has no default targets for (its names must all be linear layers of the model).
ATTENTION_PAIRS = (
    ("q_proj", "v_proj"),  # LLaMA, Mistral, Qwen, OPT, BART
    ("query", "value"),  # BERT, RoBERTa, ELECTRA
    ("q", "v"),  # MPNet, T5
    ("query_proj", "value_proj"),  # DeBERTa-v2
    ("q_lin", "v_lin"),  # DistilBERT
    ("Wqkv",),  # ModernBERT
    ("qkv_proj",),  # Phi-3
    ("query_key_value",),  # GPT-NeoX, Falcon
)


def suggested_targets(model_type: str, linears: list[str]) -> list[str]:
    """What PEFT adapts by default in a model of this type (where those are linear layers here), else the
    attention's query and value projections found among ``linears`` (layer names); [] when neither is."""
    try:  # PEFT's table of default targets per model type (an internal module: it may move)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    except ImportError:
        PEFT_DEFAULTS = {}
    peft = PEFT_DEFAULTS.get(model_type) or []
    if peft and set(peft) <= set(linears):
        return list(peft)
    return next((list(pair) for pair in ATTENTION_PAIRS if set(pair) <= set(linears)), [])


def layer_names(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """The names (last parts, once each, sorted) of ``model``'s layers of ``kinds``."""
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, kinds)})


def resolved_targets(
    targets: tuple[str, ...] | str, model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)
) -> tuple[str, ...] | str:
    """``targets`` with ``auto`` replaced by the names it picks among ``model``'s layers of ``kinds``; a
    ConfigError naming them where it finds none."""
    if targets != (AUTO_TARGETS,):
        return targets
    model_type, linears = getattr(model.config, "model_type", ""), layer_names(model, kinds)
    picked = suggested_targets(model_type, linears)
    if not picked:
        raise ConfigError(
            f"model.target_modules=auto knows no attention projections of this {model_type or 'model'} "
            f"(its linear layer names are {linears}): name the layers to adapt"
        )
    return tuple(picked)


def is_target(targets: tuple[str, ...] | str, name: str) -> bool:
    """Whether resolved ``targets`` name the linear layer ``name`` (by its last part; all-linear: every one
    but lm_head; a string: a regular expression the full name matches whole, PEFT's rule; the callers
    leave out the classifier head)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    leaf = name.split(".")[-1]
    return leaf != "lm_head" if ALL_LINEAR in targets else leaf in targets
