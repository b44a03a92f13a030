"""What a model learns from a row of tokens: how the row is encoded, its loss, and its metric.

- ``sequence_classification``: an encoder with a per-node classifier head; logits (rows, K); cross-entropy;
  accuracy, and with two labels the F1 score of label 1 (``extras``: ``f1``), as for label words.
- ``label_words``: classification as generation with a causal LM. A training row is the prompt (the
  template around the text) followed by the label word's tokens; the loss is the next-token cross-entropy
  on the label word's tokens only, the prompt masked out. A test row is the prompt alone, and its
  prediction is the label whose word's first token has the largest logit after the prompt.
- ``causal_lm``: plain language modelling; the loss is the next-token cross-entropy on every token, and
  the metric perplexity exp(total NLL / total predicted tokens) over the test rows.
- ``instruction``: prompt then response; the loss and the perplexity read the response tokens only, and
  the exact match (``extras``: ``em``) is the share of rows whose greedy continuation of the prompt is
  the reference response, token for token through EOS.

Rows are right-padded (real tokens first), so a row's last real token sits at ``mask.sum() - 1``. The
metric of a set of rows is ``finalize`` of the column sums of ``row_stats`` (rows, ``width``), so
per-node, per-chunk and per-process sums all give the same number; columns 0 and 1 are the headline
metric's (sum, count), further pairs feed ``extras`` (named secondary metrics).

A task may read the logits at a few positions only (``positions``: label words read the answer's
positions in training and the prompt's last one in evaluation); the model then projects just those onto
the vocabulary, and ``row_loss`` / ``row_stats`` get logits (rows, P, V) at those P positions. The numbers
are the same as from full logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from declora.config import TaskConfig
from declora.data import count_cut, tokenize

IGNORE = -100  # target of a position that contributes no loss (the transformers convention)


class Task(Protocol):
    metric: str  # "acc" | "ppl": the prefix of the evaluation keys
    causal: bool  # True: the base is a causal LM (AutoModelForCausalLM), with no classifier head
    width: int  # columns of ``row_stats``: 2, or more for ``extras``
    cut: int  # how many texts (or prompts) of the last ``encode`` lost tokens to ``max_length``

    def encode(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        train: bool,
        pairs: Sequence[str] | None = None,
    ) -> list[list[int]]: ...

    def positions(self, input_ids: Tensor, mask: Tensor, labels: Tensor, train: bool) -> Tensor | None:
        """Sorted positions (P,), the same for every row, whose logits ``row_loss`` (``train``) or
        ``row_stats`` read; None: every position (or a classifier's (rows, K) logits)."""
        ...

    def row_loss(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        """(rows,) each row's mean loss (what training minimises); ``logits`` at ``positions`` if given."""
        ...

    def row_stats(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        """(rows, k): each row's (sum, count) of the metric, then any columns of the task's own (k = 2; 4
        for Instruction, 5 for two-label classification); ``logits`` at ``positions`` if given."""
        ...

    def finalize(self, totals: Tensor) -> Tensor:
        """(..., width) summed stats -> (...) metric values."""
        ...

    def extras(self, totals: Tensor) -> dict[str, Tensor]:
        """(..., width) summed stats -> secondary metrics by key prefix (e.g. "em"), each (...)."""
        ...


# ---------------------------------------------------------------- maths on logits


def token_nll(logits: Tensor, targets: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next-token NLL of ``targets`` (rows, seq; IGNORE = no loss) under ``logits`` (rows, seq, V), or
    (rows, P, V) at ``positions`` (P,), each below seq - 1, that cover every target's predecessor.

    Position p's logits predict token p + 1. Returns each row's summed NLL and its number of targets.
    """
    if positions is None:
        logits, shifted = logits[:, :-1], targets[:, 1:]  # (rows, seq - 1)
    else:
        shifted = targets[:, positions + 1]  # (rows, P)
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none"
    )  # (rows, seq - 1 or P), 0 where ignored
    return nll.sum(1), (shifted != IGNORE).sum(1)


def answer_span(mask: Tensor, answer_len: Tensor, shift: int = 0) -> Tensor:
    """(rows, seq) True at each row's last ``answer_len`` real tokens (the label word), moved ``shift``."""
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)  # (1, seq)
    length = mask.sum(1, keepdim=True) + shift  # (rows, 1)
    return (pos >= length - answer_len.unsqueeze(1)) & (pos < length)


def answer_targets(input_ids: Tensor, mask: Tensor, answer_len: Tensor) -> Tensor:
    """Targets (rows, seq) keeping only each row's last ``answer_len`` real tokens (the label word)."""
    keep = answer_span(mask, answer_len.to(mask.device))
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE))


def last_logits(logits: Tensor, mask: Tensor, positions: Tensor | None = None) -> Tensor:
    """(rows, V): the logits at each row's last real token (what follows the prompt); ``logits`` at
    ``positions`` (which hold every row's last token) if given."""
    last = mask.sum(1) - 1  # (rows,)
    if positions is not None:
        last = torch.searchsorted(positions, last)  # where it sits among the kept positions
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def greedy_matches(logits: Tensor, targets: Tensor, positions: Tensor | None = None) -> Tensor:
    """(rows,) True where every target (IGNORE: none) is the argmax of its predecessor's logits
    (arguments as ``token_nll``). Greedy decoding feeds back its own argmax, so it reproduces the targets
    exactly when each argmax under the reference prefix is the next reference token: this is the exact
    match of greedy decoding, read from the teacher-forced pass (no generation loop)."""
    if positions is None:
        logits, shifted = logits[:, :-1], targets[:, 1:]  # (rows, seq - 1)
    else:
        shifted = targets[:, positions + 1]  # (rows, P)
    hit = (logits.argmax(-1) == shifted) | (shifted == IGNORE)  # (rows, seq - 1 or P)
    return hit.all(1)


def _ratio(totals: Tensor, at: int = 0) -> Tensor:
    return totals[..., at] / totals[..., at + 1].clamp(min=1)


class _OneMetric:
    """Tasks whose stats are just the headline metric's (sum, count)."""

    width = 2

    def extras(self, totals: Tensor) -> dict[str, Tensor]:
        return {}


class _Classes:
    """Classification's stats: (correct, 1) a row, and with two labels also its (true positive, false
    positive, false negative) of label 1, from which ``extras`` gives the F1 score (``f1``) that GLUE's
    MRPC and QQP report (label 1: "equivalent", "duplicate") and Matthews' correlation (``mcc``), CoLA's."""

    width, binary = 2, False

    def count_positives(self, num_labels: int) -> None:
        self.binary = num_labels == 2
        self.width = 5 if self.binary else 2

    def class_stats(self, predicted: Tensor, labels: Tensor) -> Tensor:
        correct = (predicted == labels).float()
        columns = [correct, torch.ones_like(correct)]
        if self.binary:
            said, true = predicted == 1, labels == 1
            columns += [(said & true).float(), (said & ~true).float(), (~said & true).float()]
        return torch.stack(columns, 1)

    def finalize(self, totals: Tensor) -> Tensor:
        return _ratio(totals)  # the accuracy

    def extras(self, totals: Tensor) -> dict[str, Tensor]:
        if not self.binary:
            return {}
        tp, fp, fn = totals[..., 2], totals[..., 3], totals[..., 4]
        tn = totals[..., 1] - tp - fp - fn
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)  # 0 when label 1 is neither said nor true
        spread = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).double().sqrt()
        # a label never said (or never true) zeroes the spread and the numerator alike: an MCC of 0
        mcc = (tp * tn - fp * fn).double() / spread.clamp(min=1e-12)
        return {"f1": f1, "mcc": mcc.to(f1.dtype)}


# ---------------------------------------------------------------- the tasks


class _Truncated(_OneMetric):
    """Tasks whose row is the text's tokens, cut at ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length, self.cut = tokenizer, max_length, 0

    def encode(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        train: bool,
        pairs: Sequence[str] | None = None,
    ) -> list[list[int]]:
        rows = tokenize(texts, self.tokenizer, self.max_length, pairs)
        self.cut = count_cut(texts, rows, self.tokenizer, self.max_length, pairs)
        return rows


class SequenceClassification(_Classes, _Truncated):
    metric, causal = "acc", False

    def __init__(self, tokenizer: Any, max_length: int, num_labels: int = 0) -> None:
        super().__init__(tokenizer, max_length)
        self.count_positives(num_labels)

    def positions(self, input_ids: Tensor, mask: Tensor, labels: Tensor, train: bool) -> Tensor | None:
        return None  # the head's logits are (rows, K) already

    def row_loss(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def row_stats(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        return self.class_stats(logits.argmax(-1), labels)


def split_template(template: str) -> tuple[str, tuple[str, ...], str, str]:
    """A label-words template as (before the first field, the fields in order, between them, after the
    last): ``"Q: {pair}\nP: {text}\nA:"`` -> ("Q: ", ("pair", "text"), "\nP: ", "\nA:"). Validation
    requires {text} once, and {pair} once with data.pair_column (else not at all)."""
    if "{pair}" not in template:
        prefix, suffix = template.split("{text}", 1)
        return prefix, ("text",), "", suffix
    fields = ("text", "pair") if template.index("{text}") < template.index("{pair}") else ("pair", "text")
    prefix, rest = template.split("{" + fields[0] + "}", 1)
    middle, suffix = rest.split("{" + fields[1] + "}", 1)
    return prefix, fields, middle, suffix


def _appended_specials(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer`` writes after a text (EOS for T5's, or a LLaMA tokenizer with
    add_eos_token): none of them may sit between a prompt's text and what a task puts after it."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[start + len(plain) :]
    return []


def _without_appended(ids: Sequence[int], appended: list[int]) -> list[int]:
    ids = list(ids)
    return ids[: len(ids) - len(appended)] if appended and ids[-len(appended) :] == appended else ids


class LabelWords(_Classes, _OneMetric):
    """Classification as generation: ``template`` with the text, then the label word (see the module)."""

    metric, causal = "acc", True

    def __init__(self, tokenizer: Any, max_length: int, template: str, words: Sequence[str]) -> None:
        self.tokenizer, self.max_length, self.cut = tokenizer, max_length, 0
        self.prefix, self.fields, self.middle, self.suffix = split_template(template)
        self.tail = tokenizer(self.suffix, add_special_tokens=False)["input_ids"]
        self.answers = [list(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
        empty = [w for w, a in zip(words, self.answers, strict=True) if not a]
        if empty:
            raise ValueError(
                f"task.label_words={list(words)}: {empty[0]!r} has no tokens; give every label a word"
            )
        firsts = [a[0] for a in self.answers]
        if len(set(firsts)) != len(firsts):
            raise ValueError(
                f"task.label_words={list(words)} must each start with a different token (first tokens: "
                f"{firsts}): accuracy compares the first token's logits"
            )
        self.first_ids = torch.tensor(firsts)  # (K,)
        self.count_positives(len(words))
        # Train and test prompts get the same budget, so a test prompt is exactly its training prefix.
        longest = max(len(a) for a in self.answers)
        self.budget = max_length - len(self.tail) - longest
        self.appended = _appended_specials(tokenizer)  # e.g. EOS: the template's tail follows the text
        start = len(self.prompt_ids([self.prefix])[0])  # BOS (if the tokenizer adds one) and the prefix
        if self.budget <= start:
            raise ValueError(
                f"model.max_length={max_length} leaves no room for the text: the template takes {start} "
                f"tokens before it and {len(self.tail)} after it, the longest label word {longest}"
            )

    def encode(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        train: bool,
        pairs: Sequence[str] | None = None,
    ) -> list[list[int]]:
        if (pairs is not None) != ("pair" in self.fields):  # validation refuses either without the other
            raise ValueError("task.template has {pair} exactly when data.pair_column gives second texts")
        bodies = list(texts)
        if pairs is not None:  # the two texts in the template's order, the template between them
            by_field = {"text": texts, "pair": pairs}
            first, second = by_field[self.fields[0]], by_field[self.fields[1]]
            bodies = [a + self.middle + b for a, b in zip(first, second, strict=True)]
        # prefix + the texts in one call (the tokenizer may add BOS), cut at its end; the template's end
        # follows.
        heads = self.prompt_ids([self.prefix + body for body in bodies])
        self.cut = sum(len(h) > self.budget for h in heads)
        prompts = [list(h[: self.budget]) + self.tail for h in heads]
        if not train:
            return prompts
        return [p + self.answers[int(y)] for p, y in zip(prompts, labels, strict=True)]

    def prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens with the specials the tokenizer writes before it (BOS), not after it."""
        rows = self.tokenizer(list(texts), verbose=False)["input_ids"]
        return [_without_appended(row, self.appended) for row in rows]

    def _answer_len(self, labels: Tensor) -> Tensor:
        lengths = [len(self.answers[y]) for y in labels.tolist()]  # one copy to the host, not one per row
        return torch.tensor(lengths, device=labels.device)

    def positions(self, input_ids: Tensor, mask: Tensor, labels: Tensor, train: bool) -> Tensor | None:
        """Training: the positions that predict some row's answer tokens (one before each); evaluation:
        every row's last prompt token."""
        if not train:
            return torch.unique(mask.sum(1) - 1)  # sorted
        needed = answer_span(mask, self._answer_len(labels), shift=-1)  # (rows, seq)
        return torch.nonzero(needed.any(0)).flatten()

    def row_loss(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        targets = answer_targets(input_ids, mask, self._answer_len(labels))
        total, count = token_nll(logits, targets, positions)
        return total / count.clamp(min=1)

    def scores(self, logits: Tensor, mask: Tensor, positions: Tensor | None = None) -> Tensor:
        """(rows, K): each label word's first-token logit after the prompt."""
        return last_logits(logits, mask, positions)[:, self.first_ids.to(logits.device)]

    def row_stats(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        return self.class_stats(self.scores(logits, mask, positions).argmax(-1), labels)


class CausalLM(_Truncated):
    metric, causal = "ppl", True

    def positions(self, input_ids: Tensor, mask: Tensor, labels: Tensor, train: bool) -> Tensor | None:
        return None  # every token is predicted

    def _nll(self, logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return token_nll(logits, torch.where(mask.bool(), input_ids, torch.full_like(input_ids, IGNORE)))

    def row_loss(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        total, count = self._nll(logits, input_ids, mask)
        return total / count.clamp(min=1)

    def row_stats(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        return torch.stack([t.to(torch.float32) for t in self._nll(logits, input_ids, mask)], 1)

    def finalize(self, totals: Tensor) -> Tensor:
        return torch.exp(_ratio(totals))


class Instruction:
    """Instruction / chat data: a row is the prompt turns, formatted with the tokenizer's chat template
    when it has one (else ``role: content`` lines and ``assistant:``), then the response and EOS. The
    loss is the next-token cross-entropy on the response tokens only; the metric is the response
    perplexity, and ``extras`` adds the greedy exact match (``em``, see ``greedy_matches``).
    ``encode_pairs`` returns each row's response token count, which stands in for the row's label
    (``answer_targets`` keeps the last that many real tokens)."""

    metric, causal, width = "ppl", True, 4  # stats: (NLL, response tokens, exact match, 1)

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length, self.cut = tokenizer, max_length, 0
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.appended = _appended_specials(tokenizer)  # written after a text (EOS): the response follows

    def _texts(self, turns: list[dict[str, str]], response: str) -> tuple[str, str]:
        if getattr(self.tokenizer, "chat_template", None):
            render = self.tokenizer.apply_chat_template
            prompt = render(turns, tokenize=False, add_generation_prompt=True)
            full = render([*turns, {"role": "assistant", "content": response}], tokenize=False)
            if full.startswith(prompt):  # the template's own end-of-turn tokens follow the response
                return prompt, full[len(prompt) :]
            return prompt, response
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant: "
        return prompt, response

    def encode_pairs(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[list[list[int]], np.ndarray]:
        """Token rows (prompt then response; the prompt's start is cut when the row is too long, the
        response keeps at most max_length - 1 tokens) and each row's response token count."""
        rows, lengths, self.cut = [], [], 0
        # A chat template writes its own special tokens (a LLaMA or Mistral template starts with BOS), as
        # apply_chat_template(..., tokenize=True) at inference does: the tokenizer adds none then, or every
        # row would start with two BOS. The role: content lines get BOS where the tokenizer adds one, and
        # not the EOS some tokenizers write after a text (the response follows).
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        for turns, response in zip(prompts, responses, strict=True):
            prompt_text, response_text = self._texts(json.loads(turns), response)
            head = self.tokenizer(prompt_text, add_special_tokens=not templated, verbose=False)["input_ids"]
            head = head if templated else _without_appended(head, self.appended)
            answer = list(self.tokenizer(response_text, add_special_tokens=False)["input_ids"])
            # Generation stops at EOS: when the template ends the turn with it (SmolLM2's <|im_end|>),
            # what the template writes after it (a newline) is no part of the answer.
            if self.eos and self.eos[0] in answer:
                answer = answer[: answer.index(self.eos[0]) + 1]
            else:
                answer += self.eos
            self.cut += len(head) + len(answer) > self.max_length
            answer = answer[: self.max_length - 1]
            head = list(head)[-(self.max_length - len(answer)) :]
            rows.append(head + answer)
            lengths.append(len(answer))
        return rows, np.array(lengths, dtype=np.int64)

    def encode(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        train: bool,
        pairs: Sequence[str] | None = None,
    ) -> list[list[int]]:
        raise ValueError("task.kind=instruction encodes (prompt, response) pairs: use encode_pairs")

    def positions(self, input_ids: Tensor, mask: Tensor, labels: Tensor, train: bool) -> Tensor | None:
        """The positions that predict some row's response tokens (one before each)."""
        return torch.nonzero(answer_span(mask, labels, shift=-1).any(0)).flatten()

    def _nll(self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None):
        return token_nll(logits, answer_targets(input_ids, mask, labels), positions)

    def row_loss(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        total, count = self._nll(logits, input_ids, mask, labels, positions)
        return total / count.clamp(min=1)

    def row_stats(
        self, logits: Tensor, input_ids: Tensor, mask: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        total, count = self._nll(logits, input_ids, mask, labels, positions)
        exact = greedy_matches(logits, answer_targets(input_ids, mask, labels), positions)
        columns = (total, count, exact, torch.ones_like(exact))
        return torch.stack([c.to(torch.float32) for c in columns], 1)

    def finalize(self, totals: Tensor) -> Tensor:
        return torch.exp(_ratio(totals))

    def extras(self, totals: Tensor) -> dict[str, Tensor]:
        return {"em": _ratio(totals, 2)}


def label_words_of(cfg: TaskConfig, label_names: Sequence[str]) -> tuple[str, ...]:
    """label_words' word per label: the given ones, else " <label name>"."""
    return tuple(cfg.label_words or (f" {name}" for name in label_names))


def check_room(kind: str, tokenizer: Any, max_length: int) -> None:
    """A row must keep a text token (causal_lm: two, one to predict the next; instruction: a prompt token
    and a response token), else every row is the tokenizer's special tokens alone and the run trains on
    nothing. label_words checks its template itself."""
    specials = tokenizer.num_special_tokens_to_add(pair=False) if kind != "instruction" else 0
    needed = specials + {"sequence_classification": 1, "causal_lm": 2, "instruction": 2}.get(kind, 0)
    if max_length < needed:
        what = (
            f"the tokenizer adds {specials} special tokens to each text"
            if specials
            else "a prompt and its response"
        )
        raise ValueError(
            f"model.max_length={max_length} leaves no room for the text ({what}); allowed: at least {needed}"
        )


def build_task(cfg: TaskConfig, tokenizer: Any, max_length: int, label_names: Sequence[str]) -> Task:
    check_room(cfg.kind, tokenizer, max_length)
    if cfg.kind == "instruction":
        return Instruction(tokenizer, max_length)
    if cfg.kind == "sequence_classification":
        return SequenceClassification(tokenizer, max_length, len(label_names))
    if cfg.kind == "causal_lm":
        return CausalLM(tokenizer, max_length)
    if cfg.kind == "label_words":
        words = label_words_of(cfg, label_names)
        if len(words) != len(label_names):
            raise ValueError(
                f"task.label_words has {len(words)} words {list(words)}; the data has {len(label_names)} "
                f"labels {list(label_names)} (one word each, in that order)"
            )
        said, names = [w.strip().lower() for w in words], [str(n).strip().lower() for n in label_names]
        if sorted(said) == sorted(names) and said != names:  # the label names, but out of the data's order
            in_order = [words[said.index(n)] for n in names]
            raise ValueError(
                f"task.label_words={list(words)} name the labels in another order than the data's "
                f"{list(label_names)} (word k stands for label k): give {in_order}"
            )
        try:
            return LabelWords(tokenizer, max_length, cfg.template, words)
        except ValueError as err:
            if cfg.label_words or not str(err).startswith("task.label_words="):  # a max_length error, say
                raise
            # the words were derived from the label names: say so, since the user never wrote them
            raise ValueError(
                f"{err} (task.label_words is unset, so the words are the label names with a leading space: "
                "set task.label_words to one word per label, in the data's label order)"
            ) from None
    raise ValueError(
        f"task.kind={cfg.kind!r} is not known; choose one of sequence_classification, label_words, "
        "causal_lm, instruction"
    )


CAUSAL_KINDS = ("label_words", "causal_lm", "instruction")
