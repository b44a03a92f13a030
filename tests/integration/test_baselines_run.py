"""The FL baselines through the real CLI on the tiny BERT: two rounds each, and resume == uninterrupted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_tensors, crash_after_round, write_tiny_data

from declora import engine
from declora.cli import main
from declora.config import load_config
from declora.experiment import build_experiment

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.jsonl", 48)


def _overrides(tiny_bert, tiny_data, run_dir, *extra):
    return [
        f"model.name={tiny_bert}",
        f"data.dataset={tiny_data}",
        "model.rank=2",
        "model.max_length=16",
        "nodes=4",
        "partition.kind=iid",
        "rounds=2",
        "train.batch_size=4",
        "train.local_steps=1",
        "eval.every=1",
        "eval.node_examples=8",
        "checkpoint_every=1",
        "export=consensus",
        "threads=1",
        f"run_dir={run_dir}",
        *extra,
    ]


RUNS = {
    "fedavg_adam_size": ("algorithm.name=fedavg", "server.optimizer=adam", "server.weighting=size"),
    "fedavg_avgm_sampled": ("algorithm.name=fedavg", "server.optimizer=avgm", "server.fraction=0.5"),
    "ffa_lora_yogi": ("algorithm.name=ffa_lora", "server.optimizer=yogi"),
    "rolora_adagrad": ("algorithm.name=rolora", "server.optimizer=adagrad", "algorithm.switch_interval=1"),
    "fslora_sgd": ("algorithm.name=fslora", "server.optimizer=sgd", "server.lr=0.5"),
    "hetlora_average": ("algorithm.name=hetlora", "server.optimizer=average", "algorithm.ranks=[1,2,2,1]"),
    "flexlora_adam": ("algorithm.name=flexlora", "server.optimizer=adam", "algorithm.ranks=[1,2,2,1]"),
    "fedprox": ("algorithm.name=fedprox", "algorithm.mu=0.1"),
    "dec_prox": ("algorithm.name=dec_prox", "algorithm.mu=0.1"),
    "scaffold_sampled": ("algorithm.name=scaffold", "server.fraction=0.5"),
    "dec_lora_cosine": ("train.schedule=cosine", "train.warmup_rounds=1"),
    "fedsa_lora": ("algorithm.name=fedsa_lora",),
    "fedex_lora": ("algorithm.name=fedex_lora", "export=none"),
    "flora": ("algorithm.name=flora", "export=none", "algorithm.ranks=[1,2,2,1]"),
    "fed_sb": ("algorithm.name=fed_sb",),
    "dec_sb": ("algorithm.name=dec_sb",),
    "dec_gt": ("algorithm.name=dec_gt",),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_round_cli_run(name, tiny_bert, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / name
    assert main(["run", *_overrides(tiny_bert, tiny_data, run_dir, *RUNS[name])]) == 0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["round"] for r in evals] == [1, 2]
    assert all(r["bytes_round"] > 0 and r["train_loss"] == r["train_loss"] for r in evals)  # sent; no NaN
    exported = (run_dir / "adapters" / "consensus" / "adapter_config.json").is_file()
    assert exported == ("export=none" not in RUNS[name])


CRASHES = {
    "fedadam_cosine": ("algorithm.name=fedavg", "server.optimizer=adam", "train.schedule=cosine"),
    "scaffold_linear": ("algorithm.name=scaffold", "train.schedule=linear", "train.warmup_rounds=1"),
    "fedex_lora": ("algorithm.name=fedex_lora", "export=none"),  # the folded base deltas
    "fed_sb_adam": ("algorithm.name=fed_sb", "server.optimizer=adam"),  # R and its server moments
    "dec_gt_cosine": ("algorithm.name=dec_gt", "train.schedule=cosine"),  # the tracking corrections
}


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_server_and_schedule_state_survive_a_crash(name, tiny_bert, tiny_data, tmp_path, monkeypatch):
    """Server optimizer moments, control variates and every node's schedule position are checkpointed."""
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    sampled = () if name == "dec_gt_cosine" else ("server.fraction=0.5",)  # dec_gt has no server to sample
    extra = (*CRASHES[name], *sampled, "rounds=3")

    def build(folder):
        return build_experiment(load_config(None, _overrides(tiny_bert, tiny_data, folder, *extra)))

    full = build(tmp_path / "a")
    engine.run(full)
    crashed = build(tmp_path / "b")

    crash_after_round(crashed, 3)  # logged, not yet checkpointed: round 2 is the last checkpoint
    resumed = build_experiment(crashed.cfg, crashed.run_dir)
    engine.run(resumed, resume=True)
    for k, v in full.algorithm.state_dict().items():
        assert torch.equal(v, resumed.algorithm.state_dict()[k]), k
    assert_same_tensors(full, resumed)
    for k, layer in full.fed.lora.items():  # the frozen base too (FedEx-LoRA folds into it)
        assert torch.equal(layer.base.weight, resumed.fed.lora[k].base.weight), k
    assert torch.equal(full.lr_schedule.progress, resumed.lr_schedule.progress)


def test_fed_sb_trains_only_r_and_sends_r_squared(tiny_bert, tiny_data, tmp_path, monkeypatch):
    """A and B stay at their shared init, every node ends with the server's R, and a message is R (r x r
    per module) and the head: nothing that grows with the layer's width."""
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    exp = build_experiment(
        load_config(None, _overrides(tiny_bert, tiny_data, tmp_path / "a", "algorithm.name=fed_sb"))
    )
    before = {k: v.detach().clone() for k, v in exp.fed.tensors(("A", "B")).items()}
    records = engine.run(exp)
    for k, v in exp.fed.tensors(("A", "B")).items():
        assert torch.equal(v.detach(), before[k]), k
    for k, v in exp.fed.tensors(("R",)).items():
        assert v.abs().sum() > 0 and torch.equal(v[0], v[3]), k
    sent = sum(v[0].numel() * 4 for v in exp.fed.tensors(("R", "head")).values())  # fp32, one node's
    assert records[-1]["bytes_round"] == 2 * 4 * sent  # 4 nodes, up and down
