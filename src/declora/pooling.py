"""What an encoder classifier's head reads: the [CLS] pooler (``cls``) or the mean of the token states.

``model.pooling``:
- ``cls``: the transformers model as is (BERT: the head reads the pooler's tanh(dense(h_[CLS]))).
- ``mean``: the head reads the mean of the last hidden states over the real tokens (attention mask 1,
  [CLS] and [SEP] included), as sentence-transformers models such as all-MiniLM-L6-v2 were trained to
  be read. Needs a head that is one linear layer on the hidden state (the BERT family's ``classifier``).
- ``auto``: what the model folder's sentence-transformers pooling config (``1_Pooling/config.json``)
  says: ``mean`` when it pools mean tokens and the head allows it, else ``cls``.

An exported PEFT folder carries ``declora_pooling.json`` and a README with the few lines that reproduce
the prediction with stock transformers + PEFT (``RECIPE``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
POOLINGS = ("auto", "mean", "cls")
POOLING_FILE = "declora_pooling.json"

RECIPE = """\
```python
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

base = AutoModelForSequenceClassification.from_pretrained(  # a head the base has gives way to the folder's
    BASE, num_labels=NUM_LABELS, ignore_mismatched_sizes=True
)
model = PeftModel.from_pretrained(base, FOLDER).eval()
tokenize = AutoTokenizer.from_pretrained(BASE)  # the run cut every text to MAX_LENGTH tokens
batch = tokenize(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
inner = model.get_base_model()  # the transformers model, with the LoRA layers in it
with torch.no_grad():
    hidden = inner.base_model(**batch).last_hidden_state  # (rows, seq, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean over the real tokens
    logits = inner.classifier(pooled)  # (rows, NUM_LABELS)
```
"""


# What a model's own pooling applies before its classifier, which the mean-pooled head skips: BERT's
# pooler, ModernBERT's prediction head, DistilBERT's pre_classifier.
MEAN_SKIPS = ("pooler", "head", "pre_classifier")


def skipped_by_mean(key: str) -> bool:
    """Whether mean pooling never reads this weight (``bert.pooler.dense.weight``, ``head.norm.weight``)."""
    parts = key.split(".")
    return "pooler" in parts or parts[0] in MEAN_SKIPS


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """(rows, seq, h), (rows, seq) -> (rows, h) float32: the mean of each row's real tokens (mask 1);
    summed in float32 so that a bf16 forward does not round the sum."""
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


def mean_poolable(model: nn.Module) -> bool:
    """True when the head is one linear layer on the hidden state, so it can read a pooled token state."""
    head = getattr(model, "classifier", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return (
        getattr(head, "in_features", None) == hidden and hidden is not None and model.base_model is not model
    )


def folder_pooling(path: Path) -> str | None:
    """``mean`` or ``cls`` from a sentence-transformers folder's 1_Pooling/config.json; None without one."""
    config = path / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    modes = json.loads(config.read_text())
    return "mean" if modes.get("pooling_mode_mean_tokens") else "cls"


def resolve_pooling(pooling: str, path: Path, model: nn.Module) -> str:
    """The pooling a run uses: ``auto`` resolved; ``mean`` on a head that cannot read it is an error."""
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling={pooling!r} is not allowed; choose one of {list(POOLINGS)}")
    if pooling == "auto":
        return "mean" if folder_pooling(path) == "mean" and mean_poolable(model) else "cls"
    if pooling == "mean" and not mean_poolable(model):
        raise ValueError(
            f"model.pooling='mean' needs a classifier that is one linear layer on the hidden state (BERT "
            f"family); {path} has {head_name(model)}: use model.pooling=cls"
        )
    return pooling


def head_name(model: nn.Module) -> str:
    head = getattr(model, "classifier", None)
    return f"a {type(head).__name__} head" if head is not None else "no 'classifier' head"


def warn_unfollowed(pooling: str, resolved: str, path: Path, model: nn.Module) -> None:
    """``auto`` on a folder whose sentence-transformers config pools the mean, with a head that cannot read
    it (RoBERTa's, MPNet's): say that the head reads the model's own first-token pooling instead."""
    if pooling == "auto" and resolved == "cls" and folder_pooling(path) == "mean":
        log.warning(
            "model.pooling=auto: %s's sentence-transformers config pools the mean of the tokens, but it has "
            "%s, which reads its own first-token pooling: the head reads that",
            path,
            head_name(model),
        )


def pooled_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(rows, K) logits of the head on the masked mean of the last hidden states (``mean`` pooling)."""
    # Submodules of a BERT-family classifier (mean_poolable); nn.Module types them Tensor | Module.
    base, classifier = cast(nn.Module, model.base_model), cast(nn.Module, model.classifier)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return classifier(masked_mean(hidden, attention_mask))


def pooling_howto(pooling: str, num_labels: int, max_length: int) -> str:
    """Markdown: how a stock transformers + PEFT user gets this head's prediction."""
    if pooling == "cls":
        return (
            "The head reads the model's own pooling (BERT: the [CLS] pooler; a LLaMA-family `score`: the\n"
            "last real token, found by config.json's pad_token_id, the id the tokenizer pads with):\n"
            "`model(**batch).logits` of\n"
            "`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE, "
            f"num_labels={num_labels}, ignore_mismatched_sizes=True), FOLDER)` is the prediction, for a "
            "batch tokenized with "
            f"`truncation=True, max_length={max_length}` as the run did.\n"
        )
    return (
        "The head reads the MEAN of the last hidden states over the real tokens (attention mask 1), not\n"
        "the [CLS] pooler, so `model(**batch).logits` is NOT this adapter's prediction. Reproduce it:\n\n"
        + RECIPE.replace("NUM_LABELS", str(num_labels)).replace("MAX_LENGTH", str(max_length))
    )


def write_pooling_note(folder: Path, pooling: str, base: str, num_labels: int, max_length: int) -> None:
    """``declora_pooling.json`` and README.md: how a stock PEFT user reproduces this adapter's prediction."""
    note = {"pooling": pooling, "num_labels": num_labels, "max_length": max_length}
    (folder / POOLING_FILE).write_text(json.dumps(note, indent=1))
    how = pooling_howto(pooling, num_labels, max_length)
    (folder / "README.md").write_text(
        f"# declora adapter\n\nBase model: `{base}` (BASE below); pooling: `{pooling}` "
        f"({POOLING_FILE}).\n\n{how}"
    )
