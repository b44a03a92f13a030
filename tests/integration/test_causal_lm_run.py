"""Causal LMs through the normal engine and CLI, on the tiny random LLaMA (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import WORDS, write_tiny_data
from safetensors.torch import load_file
from transformers import AutoConfig

from declora import engine
from declora.algorithms import ALGORITHMS, FOLDS_INTO_BASE
from declora.cli import main
from declora.config import load_config
from declora.engine import MEASURED
from declora.experiment import build_experiment
from declora.model import as_run, averaged_factors, fold_middle
from declora.train import pad

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]
LABEL_WORDS = "task.label_words=[' negative',' positive']"


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data") / "reviews.jsonl", 40)


def tiny(tiny_llama, reviews, tmp_path, *extra):
    return build_experiment(
        load_config(
            None,
            [
                f"model.name={tiny_llama}",
                "model.target_modules=[q_proj,v_proj]",
                "model.head=none",
                "model.rank=2",
                "model.max_length=24",
                "task.kind=label_words",
                "task.template='Review: {text}\nSentiment:'",
                LABEL_WORDS,
                f"data.dataset={reviews}",
                "nodes=4",
                "rounds=2",
                "train.batch_size=4",
                "train.local_steps=1",
                "train.lr=0.01",
                "eval.every=2",
                "eval.node_examples=8",
                "checkpoint_every=2",
                "export=consensus",
                "algorithm.switch_interval=1",
                "threads=1",
                f"run_dir={tmp_path / 'run'}",
                *extra,
            ],
        )
    )


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_on_a_causal_lm(name, tiny_llama, reviews, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)  # the report has its own tests
    no_export = ("export=none",) if name in FOLDS_INTO_BASE else ()  # the base holds the aggregate
    exp = tiny(tiny_llama, reviews, tmp_path, f"algorithm.name={name}", *no_export)
    assert not exp.fed.heads and exp.fed.causal
    records = engine.run(exp)
    assert len(records) == 2 and all(math.isfinite(r["train_loss"]) for r in records)
    for key in ("acc_node_mean", "acc_avg_factors", "acc_avg_product", "consensus_BA"):
        assert math.isfinite(records[-1][key]), key
    if not no_export:
        config = json.loads((exp.run_dir / "adapters" / "consensus" / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM"
        _assert_export_predicts_what_declora_reports(exp, records[-1], tiny_llama)


def _assert_export_predicts_what_declora_reports(exp, record, tiny_llama):
    """AutoModelForCausalLM + PeftModel.from_pretrained on the consensus folder give the label-word scores
    of the model declora's evaluation scores (the mean of the adapters the nodes run: Fed-SB's R folded
    into B, rank gates into the factors), and so the accuracy the run reported."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fed, data = exp.fed, exp.consensus_eval
    input_ids, mask = pad(data.token_ids, pad_id=0)
    gate = None if fed.rank_mask.gate is None else fed.rank_mask.gate.detach()
    running = as_run(fed, fold_middle({k: v.detach() for k, v in fed.tensors().items()}), gate)
    rows = torch.zeros(len(input_ids), dtype=torch.long)
    with torch.no_grad(), fed.override(averaged_factors(running)), fed.route(rows):
        ours = exp.task.scores(fed(input_ids, mask), mask)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(exp.run_dir / "adapters" / "consensus")).eval()
    with torch.no_grad():
        theirs = exp.task.scores(model(input_ids=input_ids, attention_mask=mask).logits, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    preds = theirs.argmax(-1)
    assert torch.equal(preds, ours.argmax(-1))
    accuracy = float((preds == torch.as_tensor(data.labels)).float().mean())
    assert accuracy == pytest.approx(record["acc_avg_factors"], abs=1e-6)


def test_exported_adapter_predicts_what_declora_predicts(tiny_llama, reviews, tmp_path, monkeypatch):
    """AutoModelForCausalLM + PeftModel.from_pretrained on the consensus folder: the same label-word
    logits, predictions and accuracy as declora's averaged-factor evaluation; the folder's card and the
    README's own code build declora's prompts."""
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    exp = tiny(tiny_llama, reviews, tmp_path, "algorithm.name=dec_lora", "train.local_steps=3")
    record = engine.run(exp)[-1]
    _assert_export_predicts_what_declora_reports(exp, record, tiny_llama)
    card = json.loads((exp.run_dir / "adapters" / "consensus" / "declora_adapter.json").read_text())
    assert card["inputs"]["template"] == exp.cfg.task.template  # the prompt and words, with the folder
    assert card["inputs"]["label_words"] == [" negative", " positive"]
    names = dict(enumerate(exp.label_names))  # the data's label names, which the words stand for
    assert card["num_labels"] == 2 and card["id2label"] == {str(i): n for i, n in names.items()}
    assert card["label2id"] == {n: i for i, n in names.items()}
    readme = (exp.run_dir / "adapters" / "consensus" / "README.md").read_text()
    assert "0 = ' negative', 1 = ' positive'" in readme and "Labels: 0 = " in readme
    # The README's own code, run as a user would: it loads the folder and builds declora's prompts, also
    # for a text too long for max_length (cut inside the prompt; the template's end stays)
    scope: dict = {}
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        exec(block, scope)
    texts = ["a fine film", " ".join(["a very long review that goes on"] * 12)]
    ours_ids = exp.task.encode(texts, [0, 1], train=False)
    users = [scope["tok"](scope["prefix"] + t)["input_ids"][: scope["budget"]] + scope["tail"] for t in texts]
    assert users == ours_ids
    full = len(scope["tok"](scope["prefix"] + texts[1])["input_ids"]) + len(scope["tail"])
    assert len(ours_ids[1]) == scope["budget"] + len(scope["tail"]) < full  # the long one was cut
    with torch.no_grad():
        logits = scope["model"](input_ids=torch.tensor(ours_ids[1:])).logits[0, -1]
    assert scope["predict"](texts[1]) == int(logits[[a[0] for a in scope["answers"]]].argmax())


def test_cli_language_modelling_on_a_text_file_resumes(tiny_llama, tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"The {w} cat sat on the {v} mat." for w in WORDS for v in WORDS[:3]))
    run_dir = tmp_path / "lm"
    args = [
        f"model.name={tiny_llama}",
        "model.target_modules=[q_proj,v_proj]",
        "model.head=none",
        "model.rank=2",
        "model.max_length=16",
        "task.kind=causal_lm",
        "partition.kind=iid",
        "eval.headline=ppl_avg_factors",
        f"data.dataset={text}",
        "nodes=2",
        "rounds=2",
        "train.batch_size=4",
        "train.local_steps=2",
        "train.lr=0.01",
        "eval.every=1",
        "eval.node_examples=4",
        "checkpoint_every=1",
        "threads=1",
        f"run_dir={run_dir}",
    ]
    assert main(["run", *args]) == 0
    assert main(["run", "--resume", str(run_dir), "rounds=3"]) == 0
    out = capsys.readouterr().out
    assert "ppl_avg_factors *" in out and "headline (ppl_avg_factors): final" in out
    evals = _evals(run_dir)
    assert [r["round"] for r in evals] == [1, 2, 3]
    for key in ("ppl_node_mean", "ppl_avg_factors", "ppl_avg_product"):
        assert all(1.0 < r[key] < 1e6 for r in evals), key
    assert evals[-1]["ppl_avg_factors"] < evals[0]["ppl_avg_factors"]  # the tiny model learns the text
    assert (run_dir / "curves.png").is_file() and (run_dir / "adapters" / "node_001").is_dir()
    # The resumed run is the run that never stopped: the same numbers every round, the same adapters
    twin = tmp_path / "twin"
    assert main(["run", *args[:-1], "rounds=3", f"run_dir={twin}"]) == 0
    computed = [{k: v for k, v in r.items() if k not in MEASURED} for r in evals]
    assert computed == [{k: v for k, v in r.items() if k not in MEASURED} for r in _evals(twin)]
    for folder in ("consensus", "node_000", "node_001"):
        name = f"adapters/{folder}/adapter_model.safetensors"
        ours, theirs = load_file(str(run_dir / name)), load_file(str(twin / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    vocab = AutoConfig.from_pretrained(str(tiny_llama)).vocab_size
    assert all(r["ppl_avg_factors"] < vocab for r in evals)  # below what a uniform guess scores


def _evals(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "eval"]


def test_label_words_on_sentence_pairs_export_a_recipe_that_builds_declora_s_prompts(
    tiny_llama, tmp_path, monkeypatch
):
    """task.template with {pair} (data.pair_column): each prompt holds both texts in the template's order,
    and the consensus folder's README code builds the same prompts for a user's (text, pair)."""
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    rows = [
        {"text": " ".join(WORDS[(i * k) % 10] for k in range(1, 4)), "hint": WORDS[i % 10], "label": i % 2}
        for i in range(40)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    template = "task.template='Hint: {pair}\nReview: {text}\nSentiment:'"
    exp = tiny(tiny_llama, data, tmp_path, f"data.dataset={data}", "data.pair_column=hint", template)
    engine.run(exp)
    readme = (exp.run_dir / "adapters" / "consensus" / "README.md").read_text()
    assert "the second text in place of {pair}" in readme
    scope: dict = {}
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        exec(block, scope)
    texts, hints = ["a fine film", " ".join(["a very long review that goes on"] * 12)], ["cat", "dog"]
    ours = exp.task.encode(texts, [0, 1], train=False, pairs=hints)
    prompts = [scope["prefix"] + h + scope["middle"] + t for t, h in zip(texts, hints, strict=True)]
    users = [scope["tok"](p)["input_ids"][: scope["budget"]] + scope["tail"] for p in prompts]
    assert users == ours  # the hint first, as the template has it; the long one cut before the tail
    with torch.no_grad():
        logits = scope["model"](input_ids=torch.tensor(ours[:1])).logits[0, -1]
    assert scope["predict"](texts[0], hints[0]) == int(logits[[a[0] for a in scope["answers"]]].argmax())
