"""What an encoder classifier's head reads: the [CLS] pooler (``cls``) or the mean of the token states.

``model.pooling``:
- ``cls``: the transformers model as is (BERT: the head reads the pooler's tanh(dense(h_[CLS]))).
- ``mean``: the head reads the mean of the last hidden states over the real tokens (attention mask 1,
  [CLS] and [SEP] included), as sentence-transformers models such as all-MiniLM-L6-v2 were trained to
  be read. Two kinds of head can (``mean_head_input``): one linear layer on the hidden state (BERT,
  DistilBERT, DeBERTa: it gets the mean as a vector), and a head that reads the first position of the
  token states it is given (RoBERTa, XLM-R, MPNet, ELECTRA: it gets a one-position sequence holding the
  mean, so its dense + activation + out_proj run on the mean instead of on <s>).
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
    logits = HEAD_CALL
```
"""
# How the recipe hands the mean to each kind of head (mean_head_input).
HEAD_CALLS = {
    "vector": "inner.classifier(pooled)  # (rows, NUM_LABELS)",
    "sequence": "inner.classifier(pooled[:, None])  # (rows, NUM_LABELS); it reads position 0: the mean",
}


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


def mean_head_input(model: nn.Module) -> str | None:
    """How the model's ``classifier`` can read a mean-pooled state: ``vector`` (one linear layer on the
    hidden state), ``sequence`` (a head that reads only the first position of the token states it is
    given, found by trying it), or None (neither: no ``classifier``, or a head of another shape)."""
    head = getattr(model, "classifier", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(head, nn.Module) or not isinstance(hidden, int) or model.base_model is model:
        return None
    if isinstance(head, nn.Linear):
        return "vector" if head.in_features == hidden else None
    return "sequence" if _reads_first_position(head, hidden) else None


def _reads_first_position(head: nn.Module, hidden: int) -> bool:
    """Whether ``head`` maps token states (rows, seq, hidden) to (rows, K) by their first position alone:
    more positions after it change nothing, another first position changes the output."""
    weight = next(head.parameters(), None)
    if weight is None:
        return False
    states = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(0)).to(weight)
    training = head.training
    head.eval()  # dropout off, so that two calls compare
    try:
        with torch.no_grad():
            full, first = head(states), head(states[:, :1])
            other = head(torch.cat([states[:, 1:2], states[:, 1:]], 1))
    except Exception:  # a head that takes other arguments or shapes: it cannot be handed the mean
        return False
    finally:
        head.train(training)
    if not isinstance(full, Tensor) or full.dim() != 2 or full.shape[0] != 2:
        return False
    return bool(torch.allclose(full, first, atol=1e-5)) and not torch.allclose(full, other, atol=1e-5)


def mean_poolable(model: nn.Module) -> bool:
    """True when the head can read a pooled token state (``mean_head_input``)."""
    return mean_head_input(model) is not None


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
            f"family) or reads the first token's state (RoBERTa family); {path} has {head_name(model)}: use "
            "model.pooling=cls"
        )
    return pooling


def head_name(model: nn.Module) -> str:
    head = getattr(model, "classifier", None)
    return f"a {type(head).__name__} head" if head is not None else "no 'classifier' head"


def warn_unfollowed(pooling: str, resolved: str, path: Path, model: nn.Module) -> None:
    """``auto`` on a folder whose sentence-transformers config pools the mean, with a head that cannot read
    it: say that the head reads the model's own pooling instead."""
    if pooling == "auto" and resolved == "cls" and folder_pooling(path) == "mean":
        log.warning(
            "model.pooling=auto: %s's sentence-transformers config pools the mean of the tokens, but it has "
            "%s, which cannot read it: the head reads the model's own pooling",
            path,
            head_name(model),
        )


def pooled_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    head_input: str,
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """(rows, K) logits of the head on the masked mean of the last hidden states (``mean`` pooling),
    handed to it as ``head_input`` says (``mean_head_input``); ``token_type_ids``: a pair's segments."""
    # Submodules of a classifier that mean_head_input accepted; nn.Module types them Tensor | Module.
    base, classifier = cast(nn.Module, model.base_model), cast(nn.Module, model.classifier)
    segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
    pooled = masked_mean(hidden, attention_mask)
    return classifier(pooled if head_input == "vector" else pooled[:, None])


def pooling_howto(pooling: str, num_labels: int, max_length: int, head_input: str | None = None) -> str:
    """Markdown: how a stock transformers + PEFT user gets this head's prediction (``head_input``: how a
    mean-pooled head is handed the mean, ``mean_head_input``)."""
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
        "the first token ([CLS], <s>), so `model(**batch).logits` is NOT this adapter's prediction.\n"
        "Reproduce it:\n\n"
        + RECIPE.replace("HEAD_CALL", HEAD_CALLS[head_input or "vector"])
        .replace("NUM_LABELS", str(num_labels))
        .replace("MAX_LENGTH", str(max_length))
    )


def write_pooling_note(
    folder: Path, pooling: str, base: str, num_labels: int, max_length: int, head_input: str | None = None
) -> None:
    """``declora_pooling.json`` and README.md: how a stock PEFT user reproduces this adapter's prediction."""
    note: dict[str, object] = {"pooling": pooling, "num_labels": num_labels, "max_length": max_length}
    if head_input is not None:
        note["head_input"] = head_input  # mean pooling: the mean as a vector, or as a one-position sequence
    (folder / POOLING_FILE).write_text(json.dumps(note, indent=1))
    how = pooling_howto(pooling, num_labels, max_length, head_input)
    (folder / "README.md").write_text(
        f"# declora adapter\n\nBase model: `{base}` (BASE below); pooling: `{pooling}` "
        f"({POOLING_FILE}).\n\n{how}"
    )
