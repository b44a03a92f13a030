"""The real CLI on the shipped MiniLM and review data (configs/smoke.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from declora.cli import main

pytestmark = pytest.mark.integration
SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", str(SMOKE), f"run_dir={run_dir}"]) == 0
    return run_dir


def test_smoke_run_writes_everything(smoke_run, capsys):
    records = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["round"] for r in evals] == [1, 2, 3]
    last = evals[-1]
    for key in (
        "acc_node_mean",
        "acc_node_std",
        "acc_avg_factors",
        "acc_avg_product",
        "consensus_A",
        "consensus_B",
        "consensus_BA",
        "cross_term",
        "bytes_round",
        "bytes_total",
        "peak_mem_mb",
    ):
        assert np.isfinite(last[key]), key
    assert last["bytes_total"] == 3 * last["bytes_round"]  # static ring: the same bytes every round
    partition = next(r for r in records if r["event"] == "partition")
    assert sum(node["size"] for node in partition["nodes"]) == 64
    for name in ("config.yaml", "report.md", "curves.png", "state/latest.json"):
        assert (smoke_run / name).is_file(), name
    assert sorted(p.name for p in (smoke_run / "adapters").iterdir()) == [
        "consensus",
        "node_000",
        "node_001",
        "node_002",
        "node_003",
    ]


def test_consensus_adapter_predicts_what_declora_evaluated(smoke_run):
    """PeftModel.from_pretrained on the exported folder, read as its README says (the shipped MiniLM's head
    reads the mean of the token states), reproduces declora's consensus accuracy."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from declora.assets import model_path
    from declora.config import load_config
    from declora.data import load_dataset
    from declora.seeding import numpy_rng

    cfg = load_config(smoke_run / "config.yaml")
    _, test = load_dataset(cfg.data, cfg.eval.seed)
    path = model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    order = numpy_rng(cfg.eval.seed, "eval").permutation(len(test))
    texts, labels = [test.texts[i] for i in order], test.labels[order]
    folder = smoke_run / "adapters" / "consensus"
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2), str(folder)
    ).eval()
    pooling = json.loads((folder / "declora_pooling.json").read_text())["pooling"]
    assert pooling == "mean"  # model.pooling=auto on the shipped MiniLM
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt"
    )
    with torch.no_grad():  # the folder README's recipe
        inner = model.get_base_model()
        hidden = inner.base_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        preds = inner.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).argmax(-1).numpy()
    last = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert float((preds == labels).mean()) == pytest.approx(last["acc_avg_factors"], abs=1e-9)


def test_bad_override_stops_before_any_work(tmp_path, capsys):
    assert main(["run", str(SMOKE), "topology.graph=moebius", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "moebius" in err and "ring" in err
    assert not (tmp_path / "r").exists()


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_no_config_and_no_default_experiment_is_refused_not_the_builtin_defaults(
    tmp_path, capsys, monkeypatch
):
    # An installed (not editable) declora has no configs/default.yaml beside its source: the dataclass
    # defaults are another experiment than the default one README describes, so they are not run unasked.
    from declora import run_setup

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        run_setup, "DEFAULT_CONFIGS", (Path("configs/default.yaml"), tmp_path / "src/configs/default.yaml")
    )
    for command in (["run", f"run_dir={tmp_path / 'r'}"], ["topology"]):
        assert main(command) == 2
        assert "configs/default.yaml (the default experiment) is neither in" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "configs").mkdir()  # the current directory's is the one taken
    (tmp_path / "configs/default.yaml").write_text("nodes: 3\ntopology: {graph: complete}\n")
    assert main(["topology", "--out", str(tmp_path / "w.png")]) == 0
    assert "nodes: 3" in capsys.readouterr().out
