"""``declora eval ADAPTER``: score one LoRA adapter folder on a config's held-out rows, with the metrics,
the checks and the fixed evaluation set of a run, so an adapter trained anywhere (a declora export, a
Flower or PEFT script) is measured on the same terms as declora's runs. Nothing is written.

Which config: the one given; else, for a declora export whose run folder is still there, that run's own
config.yaml (so the adapter is scored on the rows its run scored, and the consensus adapter gets the
run's ``acc_avg_factors`` back); else configs/default.yaml. Overrides apply on top (``data.test_file``:
other rows). The adapter fixes what it was made with: its base (where ``base_model_name_or_path`` loads
here), rank, scale and target modules from its ``adapter_config.json`` unless an override names them,
and an encoder classifier head with no declora pooling note is read as stock transformers reads it, from
the [CLS] pooler (``model.pooling=cls``).

The scoring is a one-node experiment seeded by the adapter (``model.init_adapter``): one model, so the
averaged factors, the averaged product and the node's own model are the adapter itself; its training
settings (algorithm, graph, privacy, optimizer) play no part and are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from declora.adapter_card import read_card
from declora.config import AlgorithmConfig, Config, ConfigError, ModelConfig, load_config, parse_override
from declora.pooling import POOLING_FILE

# What an adapter_config.json sets, as the ModelConfig keys it fixes.
ADAPTER_KEYS = {
    "r": "rank",
    "lora_alpha": "alpha",
    "use_rslora": "rslora",
    "target_modules": "target_modules",
}


def run_config_of(card: dict[str, Any]) -> Path | None:
    """The config.yaml of the run that exported the adapter, if that folder is still there."""
    folder = (card.get("run") or {}).get("folder") if isinstance(card.get("run"), dict) else None
    config = Path(folder) / "config.yaml" if isinstance(folder, str) else None
    return config if config is not None and config.is_file() else None


def base_of(recorded: object) -> str | None:
    """The model.name that loads an adapter's ``base_model_name_or_path`` here: a folder on this machine,
    a shipped model's public name (as the shipped copy), a hub id in the Hugging Face cache; else None."""
    from declora.assets import hub_cached, shipped_name

    if not isinstance(recorded, str) or not recorded:
        return None
    if Path(recorded).expanduser().is_dir():
        return recorded
    return shipped_name(recorded) or (recorded if hub_cached(recorded) is not None else None)


def adapter_model_keys(adapter: Path, named: set[str]) -> dict[str, Any]:
    """The model.* overrides the adapter's own files fix, leaving out those the command line ``named``:
    its rank, scale and targets, and its base where that loads here."""
    from declora.preflight import read_json_file

    ac = read_json_file(adapter / "adapter_config.json", f"adapter {adapter}")
    keys: dict[str, Any] = {}
    base = base_of(ac.get("base_model_name_or_path"))
    if base is not None and "model.name" not in named:
        keys["model.name"] = base
    for theirs, ours in ADAPTER_KEYS.items():
        value = ac.get(theirs)
        if value is None or f"model.{ours}" in named:
            continue
        if ours == "target_modules" and isinstance(value, list):  # a string is a pattern, as in PEFT
            value = sorted(value)
        keys[f"model.{ours}"] = value
    return keys


def card_keys(card: dict[str, Any]) -> dict[str, Any]:
    """What a declora export's card records of how its numbers were made, as the keys that remake it:
    the base (when its folder is on this machine), the pooling, how inputs were cut and built, the task."""
    recorded = card.get("inputs")
    inputs: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    keys: dict[str, Any] = {}
    base = card.get("base_model")
    if isinstance(base, str) and Path(base).is_dir():
        keys["model.name"] = base
    if card.get("pooling") in ("mean", "cls"):
        keys["model.pooling"] = card["pooling"]
    for key, ours in (("max_length", "model.max_length"), ("base_quantization", "model.base_quantization")):
        if inputs.get(key) is not None:
            keys[ours] = inputs[key]
    if inputs.get("precision"):
        keys["precision"] = inputs["precision"]
    if card.get("task_type") == "CAUSAL_LM":
        keys["model.head"] = "none"
        keys["task.kind"] = inputs.get("task", "label_words" if "template" in inputs else "causal_lm")
        if "template" in inputs:
            keys["task.template"], keys["task.label_words"] = inputs["template"], inputs.get("label_words")
    return keys


def adapter_folder(name: str) -> Path:
    """The adapter folder ``name`` names (a folder, or an adapter's hub id already in the cache); a run
    folder, or any folder without adapter_config.json, is refused naming what to give."""
    from declora.assets import adapter_path
    from declora.preflight import check_adapter_folder

    folder = adapter_path(name)
    check_adapter_folder(folder, f"adapter {name!r}", name)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{name} is not a PEFT adapter folder: it has no adapter_config.json")
    return folder


def eval_config(adapter: str, config: str | None, overrides: list[str]) -> tuple[Config, str]:
    """The config that scores ``adapter`` and where it came from (said to the user)."""
    from declora.run_setup import config_path

    folder = adapter_folder(adapter)
    card = read_card(folder)
    named = {parse_override(text)[0] for text in overrides}
    source = Path(config) if config is not None else run_config_of(card)
    origin = "its run's config" if config is None and source is not None else "the config"
    if source is None:
        source = config_path(None)
    fixed: dict[str, Any] = {}
    if origin != "its run's config":  # the adapter's own files say what it was made with
        fixed = {k: v for k, v in card_keys(card).items() if k not in named}
        fixed.update(adapter_model_keys(folder, named))
    cfg = load_config(source, [*(f"{k}={json.dumps(v)}" for k, v in fixed.items()), *overrides])
    stock = not (folder / POOLING_FILE).is_file() and cfg.task.kind == "sequence_classification"
    if stock and "model.pooling" not in named:  # a stock transformers classifier reads the [CLS] pooler
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pooling="cls"))
    return one_node(cfg, str(folder)), f"{origin} {source}"


def one_node(cfg: Config, adapter: str) -> Config:
    """A one-node experiment that holds just ``adapter``: the run's model, task, data and evaluation,
    none of its training settings (which a one-node model need not satisfy)."""
    model: ModelConfig = dataclasses.replace(cfg.model, init_adapter=adapter, dropout=0.0)
    nodes = cfg.nodes if cfg.data.node_files else 1  # one file a node: the one node pools them all
    return Config(
        nodes=nodes,
        rounds=1,
        seed=cfg.seed,
        export="none",
        threads=cfg.threads,
        device=cfg.device,
        precision=cfg.precision,
        allow_degenerate=cfg.allow_degenerate,
        plugins=cfg.plugins,
        model=model,
        task=cfg.task,
        data=cfg.data,
        # one model: node_examples sets aside rows no one scores (1, so no warning says it asks for too many)
        eval=dataclasses.replace(cfg.eval, headline="auto", node_examples=1, patience=None),
        algorithm=AlgorithmConfig(name="centralized"),
    )


def check_has_head(exp: Any, adapter: Path) -> None:
    """A classifier adapter without its head would be scored with a random head: refused."""
    from declora.preflight import safetensors_header

    if exp.fed.causal or exp.cfg.model.head == "frozen":
        return
    heads = list(exp.fed.tensors(("head",)))
    names = {
        k.removeprefix("base_model.model.") for k in safetensors_header(adapter / "adapter_model.safetensors")
    }
    if heads and not set(heads) <= names:
        raise ConfigError(
            f"adapter {adapter} holds no trained classifier head ({heads[0]}): its predictions would be a "
            "random head's; save the head with the adapter (PEFT: modules_to_save=['classifier'])"
        )


def score(cfg: Config) -> dict[str, Any]:
    """Build the one-node experiment and score its model on the held-out rows: the metric, its extras
    (f1 and mcc with two labels, em for instruction data) and how many rows."""
    return score_all([cfg])[0]


def score_all(configs: list[Config]) -> list[dict[str, Any]]:
    """``score`` of each config's adapter. Adapters whose configs agree but for the adapter share one
    experiment (one base loaded, the rows tokenized once): each is imported into it in turn, with the
    checks a run makes of an adapter it starts from."""
    from declora.experiment import build_experiment
    from declora.peft_io import import_peft
    from declora.preflight import check_adapter, check_adapter_labels

    results, exp, built_for = [], None, None
    for cfg in configs:
        adapter = Path(str(cfg.model.init_adapter))
        others = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_adapter=None))
        if exp is None or others != built_for:
            exp, built_for = build_experiment(cfg), others
        else:  # the same base, task and rows: only the adapter changes
            check_adapter(cfg, adapter)
            check_adapter_labels(cfg, exp.label_names)
            import_peft(exp.fed, adapter)
        results.append(_scored(exp, adapter))
    return results


def _scored(exp: Any, adapter: Path) -> dict[str, Any]:
    from declora.evaluate import scores_of

    check_has_head(exp, adapter)
    began = time.perf_counter()
    out: dict[str, Any] = {"adapter": str(adapter), "rows": len(exp.consensus_eval.labels)}
    out.update(scores_of(exp, {k: v.detach() for k, v in exp.fed.tensors().items()}))
    out["seconds"] = round(time.perf_counter() - began, 2)
    return out


METRICS = ("acc", "f1", "mcc", "ppl", "em")


def table(results: list[dict[str, Any]]) -> list[str]:
    """Several adapters' results, one row each: accuracies and F1 in %, Matthews' correlation ×100."""
    keys = [k for k in METRICS if k in results[0]]
    header = ["adapter", "rows", *(f"{k} %" if k in ("acc", "em") else k for k in keys)]
    rows = [
        [
            r["adapter"],
            f"{r['rows']:,}",
            *(f"{r[k]:.4g}" if k == "ppl" else f"{100 * r[k]:.2f}" for k in keys),
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    return [line(row) for row in [header, *rows]]


def lines(result: dict[str, Any], origin: str) -> list[str]:
    """What ``declora eval`` prints: the adapter, the rows, and each metric (accuracy with its error)."""
    shown = [
        f"adapter   {result['adapter']}",
        f"config    {origin}",
        f"rows      {result['rows']:,} held out",
    ]
    rows = result["rows"]
    for key in METRICS:
        if key not in result:
            continue
        value = result[key]
        if key == "acc":
            error = 100 * math.sqrt(value * (1 - value) / max(rows, 1))
            shown.append(f"acc       {100 * value:.2f} %  (standard error {error:.2f} points)")
        elif key == "ppl":
            shown.append(f"ppl       {value:.4g}")
        else:
            shown.append(f"{key:<9} {100 * value:.2f}")
    return shown
