"""``declora eval ADAPTER``: a run's exported adapter gets the run's own numbers back, a stock PEFT adapter
is scored as stock transformers predicts, and bad adapters are refused in one line, writing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import WORDS, folder_digest, write_tiny_data
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from declora.adapter_card import CARD_FILE
from declora.cli import main
from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment
from declora.report import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


def _other_rows(path, n):
    """Rows the run never saw: five seeded draws of the tiny data's words, labelled by the first."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        words = [WORDS[k] for k in rng.integers(0, 10, size=5)]
        rows.append(
            {"text": " ".join(words), "label": int(words[0] in ("good", "fine", "great", "nice", "fun"))}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(tiny_bert, data, *extra):
    return [
        f"model.name={tiny_bert}",
        *("model.rank=2", "model.alpha=4", "model.max_length=16", f"data.dataset={data}", "nodes=3"),
        *("rounds=3", "train.batch_size=4", "train.lr=0.05", "eval.every=3", "eval.node_examples=8"),
        *("export=all", "threads=1"),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A finished 3-node run of the tiny BERT on 60 two-label rows, every adapter exported."""
    folder = tmp_path_factory.mktemp("eval")
    data = write_tiny_data(folder / "train.jsonl", 60)
    exp = build_experiment(load_config(None, _overrides(tiny_bert, data, f"run_dir={folder / 'run'}")))
    run(exp)
    last = [r for r in read_metrics(exp.run_dir / "metrics.jsonl") if r["event"] == "eval"][-1]
    return exp.run_dir, last, folder


def _eval(capsys, *argv):
    code = main(["eval", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    return code, (json.loads(out) if code == 0 else err), err


def test_a_run_s_consensus_adapter_gets_the_run_s_numbers_back(trained, capsys):
    run_dir, last, _ = trained
    before = folder_digest(run_dir)
    code, result, _ = _eval(capsys, run_dir / "adapters" / "consensus")
    assert code == 0
    assert result["acc"] == pytest.approx(last["acc_avg_factors"], abs=1e-7)
    assert result["f1"] == pytest.approx(last["f1_avg_factors"], abs=1e-6)
    assert result["mcc"] == pytest.approx(last["mcc_avg_factors"], abs=1e-6)
    assert result["rows"] == 12  # the run's held-out rows (its own config: a fifth of 60)
    assert folder_digest(run_dir) == before  # nothing written, not even a run folder
    # the run's training settings play no part: early stopping, and validation rows it holds out (the
    # test rows stay the same)
    code, again, _ = _eval(
        capsys, run_dir / "adapters" / "consensus", "data.validation_fraction=0.2", "eval.patience=2"
    )
    assert code == 0 and again["acc"] == result["acc"] and again["rows"] == 12


def test_other_rows_are_scored_as_stock_peft_predicts_them(trained, capsys):
    from peft import PeftModel

    run_dir, _, folder = trained
    other = _other_rows(folder / "other.jsonl", 30)
    adapter = run_dir / "adapters" / "node_001"
    code, result, _ = _eval(capsys, adapter, f"data.test_file={other}")
    assert code == 0 and result["rows"] == 30

    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_name, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter)
    assert result["acc"] == pytest.approx(_stock_accuracy(model, base_name, other), abs=1e-7)


def test_a_stock_peft_adapter_is_scored_with_its_own_rank_and_the_cls_pooler(tiny_bert, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    # a base whose sentence-transformers config says mean pooling, as MiniLM's: model.pooling=auto reads the
    # mean there, but a stock PEFT classifier was trained (and predicts) on the [CLS] pooler
    tiny_bert = Path(shutil.copytree(tiny_bert, tmp_path / "base"))
    (tiny_bert / "1_Pooling").mkdir()
    (tiny_bert / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    test = _other_rows(tmp_path / "test.jsonl", 40)
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    lora = LoraConfig(
        r=3, lora_alpha=5, target_modules=["query", "value", "dense"], modules_to_save=["classifier"]
    )
    model = get_peft_model(base, lora)
    # trained as a stock PEFT script trains it (here on the rows it is then scored on: a test of parity,
    # not of generalisation), so that its predictions depend on the text
    batch = AutoTokenizer.from_pretrained(str(tiny_bert))(
        [r["text"] for r in rows], padding=True, return_tensors="pt"
    )
    labels = torch.tensor([r["label"] for r in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path / "theirs")
    train = write_tiny_data(tmp_path / "train.jsonl", 20)
    # the default config (MiniLM's settings: rank 8, alpha 16, query and value) with the tiny BERT: the
    # adapter's rank, alpha and targets are its own, and a head with no pooling note reads [CLS]
    given = (
        f"model.name={tiny_bert}",
        f"data.dataset={train}",
        f"data.test_file={test}",
        "model.max_length=16",
    )
    code, result, _ = _eval(capsys, tmp_path / "theirs", *given)
    assert code == 0 and result["rows"] == 40
    assert result["acc"] == pytest.approx(_stock_accuracy(model, tiny_bert, test), abs=1e-7)
    assert result["acc"] > 0.7 and result["mcc"] > 0.4  # it learned: both labels said, mostly right
    # a pooling named on the command line is what is read: the mean gives other predictions here
    code, mean_read, _ = _eval(capsys, tmp_path / "theirs", *given, "model.pooling=mean")
    assert code == 0 and mean_read["acc"] != result["acc"]
    # without model.name the adapter's own base (base_model_name_or_path, a folder here) is loaded, not the
    # default experiment's model
    code, own_base, _ = _eval(capsys, tmp_path / "theirs", *given[1:])
    assert code == 0 and own_base == {**result, "seconds": own_base["seconds"]}


def _stock_accuracy(model, base, rows_file):
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    batch = AutoTokenizer.from_pretrained(str(base))(
        [r["text"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        said = model.eval()(**batch).logits.argmax(-1)
    return float((said == torch.tensor([r["label"] for r in rows])).float().mean())


def _refused(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.startswith("declora: error:")]
    assert code == 2 and len(lines) == 1 and not out, (code, out, err)
    return lines[0]


def test_what_is_not_an_adapter_is_refused_in_one_line_and_nothing_is_written(
    trained, tiny_bert, tmp_path, capsys
):
    from peft import LoraConfig, get_peft_model

    run_dir, _, folder = trained
    before = folder_digest(run_dir)
    consensus = run_dir / "adapters" / "consensus"
    line = _refused(capsys, run_dir)
    assert "is a run folder, not an adapter" in line and str(consensus) in line
    assert "no adapter_config.json" in _refused(capsys, run_dir / "adapters")
    assert "is not a folder" in _refused(capsys, tmp_path / "nowhere")
    assert "needs an adapter folder" in _refused(capsys) and "needs an adapter" in _refused(capsys, "nodes=2")
    # an override that contradicts the adapter, and a bad value
    assert "has rank r=2, the run has model.rank=4" in _refused(capsys, consensus, "model.rank=4")
    assert "eval.consensus_examples" in _refused(capsys, consensus, "eval.consensus_examples=-1")
    # rows whose labels are not the ones the adapter was trained on (here three labels, in another order)
    three = [tmp_path / "three_train.jsonl", tmp_path / "three_test.jsonl"]
    for path in three:
        rows = [{"text": w, "label": ["b", "a", "c"][i % 3]} for i, w in enumerate(WORDS * 3)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _refused(capsys, consensus, f"data.dataset={three[0]}", f"data.test_file={three[1]}")
    assert "trained on the labels ['0', '1']" in line and "['a', 'b', 'c']" in line and "cannot" in line
    # a classifier adapter saved without its head would be scored with a random one
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])).save_pretrained(
        tmp_path / "headless"
    )
    data = write_tiny_data(tmp_path / "rows.jsonl", 20)
    line = _refused(capsys, tmp_path / "headless", f"model.name={tiny_bert}", f"data.dataset={data}")
    assert "holds no trained classifier head" in line and "modules_to_save" in line
    assert folder_digest(run_dir) == before


def _orphaned(adapter, folder):
    """A copy of a declora export whose run folder is gone (sent to a colleague, say): only its own files
    say how it was made."""
    copy = Path(shutil.copytree(adapter, folder))
    card = json.loads((copy / CARD_FILE).read_text())
    card["run"]["folder"] = str(folder / "deleted-run")
    (copy / CARD_FILE).write_text(json.dumps(card))
    return copy


def test_an_export_whose_run_is_gone_is_remade_from_its_own_files(trained, tmp_path, capsys):
    run_dir, last, folder = trained
    orphan = _orphaned(run_dir / "adapters" / "consensus", tmp_path / "orphan")
    # the default config (MiniLM, rank 8, max_length 64, mean pooling) and the run's data: the base, rank,
    # alpha, pooling and max_length come from the adapter's files
    code, result, _ = _eval(capsys, orphan, f"data.dataset={folder / 'train.jsonl'}")
    assert code == 0 and result["acc"] == pytest.approx(last["acc_avg_factors"], abs=1e-7)


def _relabelled(consensus, folder, names):
    """A copy of the adapter whose card records other label names (as an export made on other data)."""
    copy = Path(shutil.copytree(consensus, folder))
    card = json.loads((copy / CARD_FILE).read_text())
    card["id2label"] = {str(i): name for i, name in enumerate(names)}
    (copy / CARD_FILE).write_text(json.dumps(card))
    return copy


def test_labels_the_adapter_names_in_another_order_are_renumbered_and_other_names_taken_in_order(
    trained, tmp_path, capsys, caplog
):
    run_dir, last, folder = trained
    consensus = run_dir / "adapters" / "consensus"
    # a card whose head says '1' at output 0: the data's labels are numbered so, and every answer that
    # was right is now wrong (two labels)
    swapped = _relabelled(consensus, tmp_path / "swapped", ["1", "0"])
    code, result, _ = _eval(capsys, swapped)
    assert code == 0 and result["acc"] == pytest.approx(1 - last["acc_avg_factors"], abs=1e-6)
    # per-node files are not renumbered (each process reads its own): refused, unless meant
    files = [str(write_tiny_data(tmp_path / f"node_{i}.jsonl", 12)) for i in range(3)]
    by_node = (f"data.node_files={files}", f"data.test_file={folder / 'train.jsonl'}")
    line = _refused(capsys, swapped, *by_node)
    assert "the same labels in another order" in line and "per-node files are not renumbered" in line
    named = _relabelled(consensus, tmp_path / "named", ["rotten", "fresh"])
    code, result, _ = _eval(capsys, named)
    assert code == 0 and result["acc"] == pytest.approx(last["acc_avg_factors"], abs=1e-7)
    assert "each data label k is taken as the adapter's label k" in caplog.text


@pytest.mark.parametrize(
    "kind", [("task.kind=label_words", "task.label_words=[' bad',' good']"), ("task.kind=causal_lm",)]
)
def test_a_causal_lm_adapter_gets_its_run_s_numbers_back(kind, tiny_llama, tmp_path, capsys):
    data = write_tiny_data(tmp_path / "rows.jsonl", 40)
    overrides = [
        f"model.name={tiny_llama}",
        *("model.target_modules=[q_proj,v_proj]", "model.head=none", "model.rank=2", "model.max_length=24"),
        *(f"data.dataset={data}", "nodes=2", "rounds=2", "train.batch_size=4", "train.lr=0.01"),
        *(
            "eval.every=2",
            "eval.node_examples=4",
            "export=consensus",
            "threads=1",
            f"run_dir={tmp_path / 'run'}",
        ),
        *kind,
    ]
    exp = build_experiment(load_config(None, overrides))
    last = run(exp)[-1]
    metric = exp.task.metric
    code, result, _ = _eval(capsys, exp.run_dir / "adapters" / "consensus")
    assert code == 0 and result["rows"] == len(exp.consensus_eval.labels)
    assert result[metric] == pytest.approx(last[f"{metric}_avg_factors"], rel=1e-6)
    # with its run folder gone, the card's task (kind, template, words) and base remake the scoring
    orphan = _orphaned(exp.run_dir / "adapters" / "consensus", tmp_path / "orphan")
    code, again, _ = _eval(capsys, orphan, f"data.dataset={data}")
    assert code == 0 and again[metric] == pytest.approx(result[metric], rel=1e-6)


def test_an_adapter_of_a_run_on_one_file_per_node_gets_its_numbers_back(tiny_bert, tmp_path, capsys):
    files = [write_tiny_data(tmp_path / f"node_{i}.jsonl", 16 + 4 * i) for i in range(3)]
    test = _other_rows(tmp_path / "test.jsonl", 20)
    overrides = _overrides(tiny_bert, files[0], f"data.node_files={[str(f) for f in files]}")
    overrides += [f"data.test_file={test}", "export=consensus", f"run_dir={tmp_path / 'run'}"]
    exp = build_experiment(load_config(None, overrides))
    last = run(exp)[-1]
    code, result, _ = _eval(capsys, exp.run_dir / "adapters" / "consensus")
    assert code == 0, result
    assert result["rows"] == 20
    assert result["acc"] == pytest.approx(last["acc_avg_factors"], abs=1e-7)


def test_several_adapters_share_one_base_and_score_as_each_alone(trained, capsys):
    run_dir, last, _ = trained
    folders = [run_dir / "adapters" / name for name in ("consensus", "node_000", "node_002")]
    alone = [_eval(capsys, folder)[1] for folder in folders]
    assert main(["eval", *map(str, folders), "--json"]) == 0
    together = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(alone, together, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert together[0]["acc"] == pytest.approx(last["acc_avg_factors"], abs=1e-7)
    assert main(["eval", *map(str, folders)]) == 0  # a table, a row an adapter
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"config    its run's config {run_dir / 'config.yaml'}"
    assert out[1].split() == ["adapter", "rows", "acc", "%", "f1", "mcc"]
    assert [line.split()[0] for line in out[2:]] == [str(f) for f in folders]
    assert "takes one config file" in _refused(capsys, folders[0], "a.yaml", "b.yml")


def test_a_headless_adapter_after_another_is_refused_not_scored_with_the_other_s_head(
    trained, tmp_path, capsys
):
    from safetensors.torch import load_file, save_file

    run_dir, _, _ = trained
    headless = Path(shutil.copytree(run_dir / "adapters" / "node_000", tmp_path / "headless"))
    weights = headless / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "classifier" not in k}, str(weights))
    line = _refused(capsys, run_dir / "adapters" / "consensus", headless)
    assert "holds no trained classifier head" in line and str(headless) in line


def test_an_adapter_s_recorded_base_names_the_model_that_loads_it_here(tmp_path):
    from declora.adapter_eval import base_of

    assert base_of(str(tmp_path)) == str(tmp_path)  # a folder on this machine
    assert base_of("sentence-transformers/all-MiniLM-L6-v2") == "minilm"  # a shipped model's public name
    assert base_of("sentence-transformers/all-mpnet-base-v2/") == "mpnet"
    assert base_of("nobody/no-such-model") is None  # neither: the config's model, with the base warning
    assert base_of(None) is None and base_of("") is None
