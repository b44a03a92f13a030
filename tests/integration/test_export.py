"""Exported folders load with stock ``AutoPeftModelFor...`` loaders and predict what declora predicted;
``export_round=best`` keeps the adapters of the best evaluated round."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import WORDS
from safetensors.torch import load_file

from declora.adapter_card import CARD_FILE
from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment
from declora.report import best_final, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]
NAMES = ["bad", "good", "so-so"]


def _three_class(path, n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 3
        words = [WORDS[(label * 3 + int(k)) % 10] for k in rng.integers(0, 3, size=5)]
        rows.append({"text": " ".join(words), "label": NAMES[label]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _classifier_run(tiny_bert, tmp_path, name, *extra):
    train = _three_class(tmp_path / "train.jsonl", 60, 0)
    test = _three_class(tmp_path / "test.jsonl", 24, 1)
    overrides = [f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "nodes=3", "rounds=4"]
    overrides += [f"data.dataset={train}", f"data.test_file={test}", "train.batch_size=4", "train.lr=0.05"]
    overrides += ["train.local_steps=2", "eval.every=1", "eval.node_examples=8", "threads=1", "export=all"]
    exp = build_experiment(load_config(None, [*overrides, f"run_dir={tmp_path / name}", *extra]))
    run(exp)
    return exp, test


def test_best_round_folder_loads_with_auto_peft_and_predicts_declora_accuracy(tiny_bert, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    exp, test = _classifier_run(tiny_bert, tmp_path, "best", "export_round=best")
    evals = [r for r in read_metrics(exp.run_dir / "metrics.jsonl") if r["event"] == "eval"]
    best = best_final(evals, "acc_avg_factors")
    folder = exp.run_dir / "adapters" / "consensus"
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["task_type"] == "SEQ_CLS" and card["num_labels"] == 3 and card["pooling"] == "cls"
    assert card["id2label"] == {"0": "bad", "1": "good", "2": "so-so"} and card["label2id"]["so-so"] == 2
    assert card["round"] == best["best_round"] and card["metrics"]["acc_avg_factors"] == best["best"]
    assert card["inputs"] == {"max_length": 16, "base_quantization": "none"}  # what the numbers depend on
    assert "Texts were cut to 16 tokens" in (folder / "README.md").read_text()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_bert
    )

    # The README's own loading lines, run as a user would, then the stock forward.
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    model = scope["model"].eval()
    assert isinstance(model.base_model.model.config.id2label, dict) and model.config.id2label[2] == "so-so"
    assert _test_accuracy(model, test, tiny_bert) == pytest.approx(best["best"], abs=1e-6)  # float32 mean
    assert isinstance(AutoPeftModelForSequenceClassification, type)

    # A node's card gives that node's own accuracy, which its folder reproduces on the node test examples.
    node_folder = exp.run_dir / "adapters" / "node_002"
    node_card = json.loads((node_folder / CARD_FILE).read_text())
    best_eval = next(r for r in evals if r["round"] == best["best_round"])
    assert node_card["metrics"]["acc_this_node"] == best_eval["acc_node"][2]
    assert len(best_eval["acc_node"]) == 3 and min(best_eval["acc_node"]) == best_eval["acc_node_min"]
    node_scope: dict = {}
    node_code = re.search(r"```python\n(.*?)```", (node_folder / "README.md").read_text(), re.S).group(1)
    exec(node_code, node_scope)
    node_model = node_scope["model"].eval()
    ids = exp.node_eval.token_ids
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [exp.pad_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    with torch.no_grad():
        node_predicted = node_model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1).numpy()
    assert float((node_predicted == exp.node_eval.labels).mean()) == pytest.approx(
        node_card["metrics"]["acc_this_node"], abs=1e-6
    )

    # The best round's folder is the final folder of the same run stopped at that round, which this
    # seeded run reaches before its last round (so export_round=best is told apart from final).
    assert best["best_round"] < 4, evals
    stopped, _ = _classifier_run(tiny_bert, tmp_path, "stopped", f"rounds={best['best_round']}")
    for name in ("consensus", "node_002"):
        a = load_file(str(exp.run_dir / "adapters" / name / "adapter_model.safetensors"))
        b = load_file(str(stopped.run_dir / "adapters" / name / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_causal_folder_loads_with_auto_peft_and_gives_declora_logits(tiny_llama, tmp_path):
    from peft import AutoPeftModelForCausalLM

    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(" ".join(WORDS[(i + k) % 10] for k in range(8)) for i in range(30)))
    overrides = [f"model.name={tiny_llama}", "model.target_modules=[q_proj,v_proj]", "model.head=none"]
    overrides += [
        "model.rank=2",
        "model.max_length=24",
        "task.kind=causal_lm",
        "eval.headline=ppl_avg_factors",
    ]
    overrides += [f"data.dataset={data}", "nodes=3", "rounds=2", "train.batch_size=4", "train.lr=0.01"]
    overrides += ["eval.node_examples=4", "export=consensus", "threads=1", f"run_dir={tmp_path / 'lm'}"]
    exp = build_experiment(load_config(None, overrides))
    run(exp)
    folder = exp.run_dir / "adapters" / "consensus"
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["task_type"] == "CAUSAL_LM" and card["num_labels"] is None and card["round"] == 2
    assert card["inputs"] == {"max_length": 24, "base_quantization": "none"}  # no prompt: plain text
    assert "ppl_avg_factors" in (folder / "README.md").read_text().splitlines()[0]  # its own metric
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([exp.node_eval.token_ids[0]])
    with torch.no_grad():
        for v in exp.fed.tensors().values():  # every node holds the consensus adapter
            v.copy_(v.mean(0, keepdim=True).expand_as(v))
        with exp.fed.route(torch.zeros(1, dtype=torch.long)):
            ours = exp.fed(ids, torch.ones_like(ids))
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(theirs, ours.to(theirs.dtype), atol=1e-5, rtol=0)


def test_a_card_says_when_its_base_is_a_decoded_quantized_copy(tmp_path):
    from declora.adapter_card import AdapterCard, write_card

    for name, said in (("smollm2", True), ("minilm", False)):
        folder = tmp_path / name
        folder.mkdir()
        card = AdapterCard("the consensus adapter", name, round=3, inputs={"max_length": 64})
        write_card(folder, card, tmp_path, causal=name == "smollm2", pooling=None)
        readme = (folder / "README.md").read_text()
        assert ("the Q4_1 GGUF copy of that model" in readme) == said
        assert json.loads((folder / CARD_FILE).read_text())["inputs"] == {"max_length": 64}


def test_exported_and_checkpointed_tensors_are_as_readable_as_the_other_files(tmp_path, tiny_bert):
    from helpers import write_tiny_data

    from declora.cli import main

    data = write_tiny_data(tmp_path / "d.jsonl", 24)
    run = tmp_path / "run"
    args = [f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "nodes=2", "rounds=1"]
    args += [f"data.dataset={data}", "partition.min_size=2", "eval.node_examples=4", "export=consensus"]
    assert main(["run", *args, "threads=1", f"run_dir={run}"]) == 0
    mode = (run / "adapters/consensus/adapter_config.json").stat().st_mode & 0o777
    assert (run / "adapters/consensus/adapter_model.safetensors").stat().st_mode & 0o777 == mode
    assert all(f.stat().st_mode & 0o777 == mode for f in (run / "state").glob("*.safetensors"))


def _test_accuracy(model, test, tokenizer_folder) -> float:
    """A stock model's accuracy on the test rows, tokenized as declora did (16 tokens)."""
    from transformers import AutoTokenizer

    rows = [json.loads(x) for x in test.read_text().splitlines()]
    batch = AutoTokenizer.from_pretrained(str(tokenizer_folder))(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        predicted = model.eval()(**batch).logits.argmax(-1).numpy()
    return float((predicted == np.array([NAMES.index(r["label"]) for r in rows])).mean())


def _folder_accuracy(folder, test, tiny_bert) -> float:
    """The folder's own README loading lines, then the stock forward on the test rows."""
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1), scope)
    return _test_accuracy(scope["model"], test, tiny_bert)


def test_nodes_of_unequal_ranks_are_scored_and_exported_as_they_run(tiny_bert, tmp_path):
    """HetLoRA with ranks [1, 2, 2]: every node stores the server model but runs its own truncation, so the
    consensus adapter averages the truncated factors (as the consensus metrics read them), and the
    untruncated server model is exported beside it; each folder predicts its own logged score."""
    hetero = ("algorithm.name=hetlora", "algorithm.ranks=[1,2,2]", "server.optimizer=average", "train.lr=0.1")
    exp, test = _classifier_run(tiny_bert, tmp_path, "het", *hetero)
    last = [r for r in read_metrics(exp.run_dir / "metrics.jsonl") if r["event"] == "eval"][-1]
    adapters = exp.run_dir / "adapters"
    assert _folder_accuracy(adapters / "consensus", test, tiny_bert) == pytest.approx(last["acc_avg_factors"])
    assert _folder_accuracy(adapters / "server", test, tiny_bert) == pytest.approx(last["acc_server"])
    server = json.loads((adapters / "server" / CARD_FILE).read_text())
    assert server["metrics"]["acc_server"] == last["acc_server"]
    assert (adapters / "server" / "README.md").read_text().startswith("# declora adapter: the server model")

    def tensors(name):
        return load_file(str(adapters / name / "adapter_model.safetensors"))

    consensus, stored = tensors("consensus"), tensors("server")
    nodes = [tensors(f"node_{i:03d}") for i in range(3)]
    for key, value in consensus.items():
        if "lora_" not in key:
            continue
        # a node's folder keeps its first r_i components: padded back to rank 2, their mean is the consensus
        padded = [
            torch.nn.functional.pad(
                v[key], (0, 2 - v[key].shape[-1]) if "lora_B" in key else (0, 0, 0, 2 - v[key].shape[0])
            )
            for v in nodes
        ]
        torch.testing.assert_close(value, torch.stack(padded).mean(0))
        assert not torch.equal(value, stored[key])  # node 0 drops a component the server model has
    assert last["cross_term"] > 0  # the nodes run different models, and so three models are scored:
    assert (
        len({last["acc_avg_factors"], last["acc_avg_product"], last["acc_server"]}) == 3
    )  # 0.71, 0.75, 0.88


def test_an_nf4_card_names_the_stock_loading_that_reproduces_its_score(tiny_bert, tmp_path):
    """The card's BitsAndBytesConfig gives the same NF4 base (QLoRA's codes in blocks of 64, the head
    left fp32), so stock transformers + PEFT predict what declora scored; the fp32 base need not."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BitsAndBytesConfig,
    )

    # bitsandbytes' CPU kernel wants layers of at least 64 inputs: the tiny BERT at hidden 64, saved with
    # the task's 3 labels (transformers 5.17 loads a saved head of another size as is under a quantization
    # config, whatever num_labels says; later versions resize it)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    shape["num_labels"] = 3
    torch.manual_seed(0)
    wider = tmp_path / "bert64"
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **shape)).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    tiny_bert = wider
    exp, test = _classifier_run(
        tiny_bert,
        tmp_path,
        "nf4",
        "model.base_quantization=nf4",
        "export=consensus",
        "rounds=8",
        "model.rank=8",
        "train.head_lr=0.05",
    )
    last = [r for r in read_metrics(exp.run_dir / "metrics.jsonl") if r["event"] == "eval"][-1]
    folder = exp.run_dir / "adapters" / "consensus"
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["inputs"]["kept_fp32"] == ["pre_classifier", "classifier", "score", "lm_head"]
    readme = (folder / "README.md").read_text()
    said = re.search(r"quantization_config=(BitsAndBytesConfig\(.*?\))\)`", readme).group(1)
    config = eval(said, {"BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch})
    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert),
        num_labels=3,
        quantization_config=config,
        dtype=torch.float32,
        ignore_mismatched_sizes=True,
    )
    model = PeftModel.from_pretrained(base, str(folder))
    assert _test_accuracy(model, test, tiny_bert) == pytest.approx(last["acc_avg_factors"], abs=1e-6)


def test_a_bf16_card_says_the_base_was_bf16(tmp_path):
    from declora.adapter_card import AdapterCard, write_card

    card = AdapterCard(
        "the consensus adapter", "minilm", round=3, inputs={"max_length": 64, "precision": "bf16"}
    )
    write_card(tmp_path, card, tmp_path, causal=False, pooling=None)
    assert "with the frozen base stored in bf16 (declora `precision`)" in (tmp_path / "README.md").read_text()


def test_a_local_folder_is_not_named_by_the_parent_its_config_records(tmp_path):
    """A fine-tuned folder records the model it came from (all-MiniLM-L6-v2: nreimers/MiniLM-L6-H384-uncased):
    named as the public base, a user would attach the adapter to other weights of the same shapes."""
    from declora.adapter_card import AdapterCard, write_card

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"}))
    folder = tmp_path / "adapter"
    folder.mkdir()
    card = AdapterCard("the consensus adapter", str(base), ("neg", "pos"), 3, inputs={"max_length": 64})
    write_card(folder, card, base, causal=False, pooling="cls")
    meta = json.loads((folder / CARD_FILE).read_text())
    assert (
        meta["base_model_public"] is None and meta["base_model_recorded"] == "nreimers/MiniLM-L6-H384-uncased"
    )
    readme = (folder / "README.md").read_text()
    assert "Base model: `(not known: the local folder below)`" in readme
    assert (
        "records `nreimers/MiniLM-L6-H384-uncased` as its origin: that may be the model it was fine-tuned"
        in (" ".join(readme.split()))
    )
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    write_card(
        shipped, AdapterCard("x", "minilm", ("neg", "pos"), 3, inputs={"max_length": 64}), base, False, "cls"
    )
    assert (
        json.loads((shipped / CARD_FILE).read_text())["base_model_public"]
        == "sentence-transformers/all-MiniLM-L6-v2"
    )


def test_a_relative_model_folder_exports_an_adapter_that_loads_from_anywhere_and_keeps_its_pooling(
    tiny_bert, tmp_path, monkeypatch
):
    """A relative model.name went into adapter_config.json as is: PEFT then took it for a hub id from any
    other folder. And an adapter's head trained on mean pooling was silently put on the [CLS] pooler."""
    from declora.config import ConfigError

    monkeypatch.chdir(tiny_bert.parent)
    exp, test = _classifier_run(
        tiny_bert, tmp_path, "rel", f"model.name={tiny_bert.name}", "model.pooling=mean"
    )
    folder = exp.run_dir / "adapters" / "consensus"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere: the README's loading lines still find the base
    load_it = (folder / "README.md").read_text().split("## Load it")[1]
    code = re.search(r"```python\n(.*?)```", load_it, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    assert scope["model"].peft_config["default"].base_model_name_or_path == str(tiny_bert.resolve())

    def seeded(*extra: str):
        overrides = [f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "nodes=3", "rounds=1"]
        overrides += [f"data.dataset={tmp_path / 'train.jsonl'}", f"data.test_file={test}", "threads=1"]
        return load_config(None, [*overrides, "export=none", f"run_dir={tmp_path / 'seeded'}", *extra])

    with pytest.raises(
        ValueError,
        match=r"trained with pooling 'mean' \(declora_pooling.json\); this run pools "
        r"'cls' \(model.pooling=cls\), so its head would read another feature: set model.pooling=mean",
    ):
        build_experiment(seeded(f"model.init_adapter={folder}", "model.pooling=cls"))
    with pytest.raises(ValueError, match=r"this run pools 'cls' \(model.pooling=auto\)"):  # auto: cls here
        build_experiment(seeded(f"model.init_adapter={folder}"))
    assert not (tmp_path / "seeded").exists()
    build_experiment(seeded(f"model.init_adapter={folder}", "model.pooling=mean"))  # the same pooling: fine
    with pytest.raises(
        ConfigError,
        match=r"is a run folder, not an adapter; pass one of its adapters: .*/adapters/consensus, ",
    ):
        build_experiment(seeded(f"model.init_adapter={exp.run_dir}"))


def test_an_instruction_card_gives_the_recipe_that_reproduces_its_perplexity(tiny_llama, tmp_path):
    """The card said `truncation=True`, which cuts the response; declora cuts the prompt's start."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    pairs = [
        ("What is 2 + 3? " * 3, "2 + 3 = 5."),
        ("Name a colour.", "Blue."),
        ("Say hi " * 4, "hi there, friend"),
    ]
    data, test = tmp_path / "chats.jsonl", tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs * 4))
    test.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    overrides = [f"model.name={tiny_llama}", "model.target_modules=[q_proj,v_proj]", "model.head=none"]
    overrides += [
        "model.rank=2",
        "model.max_length=20",
        "task.kind=instruction",
        "eval.headline=ppl_avg_factors",
    ]
    overrides += [f"data.dataset={data}", f"data.test_file={test}", "nodes=2", "rounds=1", "threads=1"]
    overrides += [
        "export=consensus",
        "partition.kind=iid",
        "partition.min_size=1",
        f"run_dir={tmp_path / 'r'}",
    ]
    exp = build_experiment(load_config(None, overrides))
    run(exp)
    folder = exp.run_dir / "adapters" / "consensus"
    card = json.loads((folder / CARD_FILE).read_text())
    readme = " ".join((folder / "README.md").read_text().split())
    assert card["inputs"]["task"] == "instruction" and card["inputs"]["chat_template"] is False
    assert "loses the START of its prompt" in readme and "`truncation=True` would cut the response" in readme
    assert "as `role: content` lines and then `assistant: `" in readme  # this tokenizer has no template

    # The card's recipe, with stock PEFT: user/assistant lines, response + EOS, the prompt cut from its start.
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    nll, count, limit = 0.0, 0, card["inputs"]["max_length"]
    for prompt, response in pairs:
        answer = (tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: limit - 1]
        head = tok(f"user: {prompt}\nassistant: ")["input_ids"][-(limit - len(answer)) :]
        ids = torch.tensor([head + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        picked = logp[torch.arange(len(targets)), targets][-len(answer) :]
        nll, count = nll - float(picked.sum()), count + len(answer)
    assert math.exp(nll / count) == pytest.approx(card["metrics"]["ppl_avg_factors"], rel=1e-4)


def test_a_logit_adjusted_adapter_scores_as_declora_did_and_its_card_says_how_to_add_a_prior(
    tiny_bert, tmp_path
):
    exp, test = _classifier_run(
        tiny_bert, tmp_path, "adjusted", "train.logit_adjustment=1", "partition.kind=dirichlet"
    )
    last = [r for r in read_metrics(exp.run_dir / "metrics.jsonl") if r["event"] == "eval"][-1]
    folder = exp.run_dir / "adapters" / "consensus"
    assert json.loads((folder / CARD_FILE).read_text())["inputs"]["logit_adjustment"] == 1.0
    readme = (folder / "README.md").read_text()
    assert "`train.logit_adjustment=1`" in readme and "add `1 * prior.log()` to the logits" in readme
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", readme, re.S).group(1), scope)  # the folder's own load lines
    assert _test_accuracy(scope["model"].eval(), test, tiny_bert) == pytest.approx(
        last["acc_avg_factors"], abs=1e-6
    )
