"""Plain helpers every test folder imports (``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "fun", "sad"]


def write_tiny_data(path: Path, rows: int) -> Path:
    """``rows`` five-word texts with alternating labels as a .jsonl file."""
    lines = [
        {"text": " ".join(WORDS[(i * k) % 10] for k in range(1, 6)), "label": i % 2} for i in range(rows)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def crash_after_round(exp, k: int) -> None:
    """Run ``exp`` (a new run) and stop it as a kill would once round ``k`` is logged, before that round's
    checkpoint: round ``k - 1`` is the last one a resume finds."""
    import os

    import pytest

    from declora import engine
    from declora.runfolder import CRASH_ENV, CrashPoint, reset_crash_counts

    before = os.environ.get(CRASH_ENV)
    os.environ[CRASH_ENV] = f"round.logged:{k}"  # the k-th round logged by this run
    reset_crash_counts()
    try:
        with pytest.raises(CrashPoint):
            engine.run(exp)
    finally:
        reset_crash_counts()
        if before is None:
            del os.environ[CRASH_ENV]
        else:
            os.environ[CRASH_ENV] = before


def assert_same_tensors(a, b) -> None:
    """Two experiments' trained tensors (every node's factors and heads) are bit-identical."""
    import torch

    for k, v in a.fed.tensors().items():
        assert torch.equal(v.detach(), b.fed.tensors()[k].detach()), k


def tiny_run_overrides(tmp_path_factory, tiny_bert: Path, rows: int, *extra: str) -> list[str]:
    """Command-line overrides for a run of seconds: the tests' tiny BERT at rank 2 on ``rows`` labelled
    rows (written to a fresh folder), batches of 4, every round evaluated on 4 examples a node and
    checkpointed, the consensus exported, one thread; then ``extra`` (nodes, rounds, partition, ...)."""
    data = write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.jsonl", rows)
    return [
        f"model.name={tiny_bert}",
        *("model.rank=2", "model.max_length=16", f"data.dataset={data}", "train.batch_size=4"),
        *("eval.every=1", "eval.node_examples=4", "checkpoint_every=1", "export=consensus", "threads=1"),
        *extra,
    ]


def metrics_records(run_dir: Path) -> list[dict]:
    """Every line of a run folder's metrics.jsonl, in order."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tiny_grid_file(tmp_path: Path, tiny_bert: Path, more_overrides=(), **extra) -> Path:
    """tmp_path/grid.yaml: a grid of seconds-long runs of the tests' tiny BERT (3 nodes, 2 rounds, every
    round evaluated and checkpointed), dec_lora against local on seeds 0 and 1 into tmp_path/grid;
    ``extra`` replaces any of the file's keys (grid, seeds, metric, ...)."""
    import yaml

    grid = {
        "out": str(tmp_path / "grid"),
        "overrides": [
            f"model.name={tiny_bert}",
            "model.rank=2",
            "nodes=3",
            "rounds=2",
            "data.train_limit=48",
            "data.test_limit=12",
            "train.batch_size=4",
            "train.local_steps=1",
            "eval.every=1",
            "eval.node_examples=6",
            "checkpoint_every=1",
            "export=none",
            "threads=1",
            *more_overrides,
        ],
        "grid": {"algorithm.name": ["dec_lora", "local"]},
        "seeds": [0, 1],
        "target_accuracy": 0.0,
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def as_at_a_terminal() -> None:
    """A started process's signals as at an interactive terminal (Popen's preexec_fn): a shell that runs the
    tests in the background (`cmd &`) leaves SIGINT ignored and `nohup` leaves SIGHUP ignored, which the
    process would inherit and then never be stopped by them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def special_adding_tokenizer(single: str):
    """A byte-level BPE tokenizer whose post-processor writes ``single`` around every text: "<s> $A" adds
    BOS as LLaMA's and Mistral's do, "<s> $A </s>" also EOS, as T5's or a LLaMA tokenizer with
    add_eos_token do. Its vocabulary is trained on the texts the tests use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "[INST]", "[/INST]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = "what is two plus two? four. hello there. Review: a fine film\nSentiment: negative positive"
    bpe.train_from_iterator([corpus] * 20, trainer)
    ids = [(token, bpe.token_to_id(token)) for token in ("<s>", "</s>") if token in single.split()]
    bpe.post_processor = processors.TemplateProcessing(single=single, special_tokens=ids)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def folder_digest(folder: Path) -> str | None:
    """A hash of a folder's file names and contents (None: no folder): did a command leave it as it was?"""
    if not folder.exists():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()
