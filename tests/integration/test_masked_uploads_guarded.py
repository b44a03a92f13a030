"""Node-level DP and message attacks on the masked-upload methods (FSLoRA, HetLoRA, FlexLoRA, FedEx-LoRA,
FLoRA) and on SCAFFOLD's two uploads, through the engine on a tiny 2-layer BERT (4 nodes, 2 rounds).

- zero noise and an infinite clip reproduce the plain run bit for bit (every node's tensors, the
  algorithm's server state or folded base, every metric) for each of the six methods;
- a robust rule with nothing to cut (clipped, infinite radius) aggregates as the plain mean, exactly;
- a scaled attacker's upload moves FSLoRA's server model; the median over each component's senders
  keeps most of it out, and the honest nodes are reported apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors

from declora.config import load_config
from declora.engine import MEASURED, run
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration
RANKS = "algorithm.ranks=[1,2,4,3]"
METHODS = {
    "fslora": ["algorithm.clients_per_round=3"],
    "hetlora": [RANKS],
    "flexlora": [RANKS, "server.fraction=0.75"],
    "scaffold": ["server.fraction=0.75"],
    "fedex_lora": ["export=none", "server.weighting=size"],
    "flora": ["export=none", RANKS],
}
NO_NOISE = ["privacy.level=node", "privacy.noise_multiplier=0", "privacy.clip=.inf"]
NO_CUT = [
    "robust.aggregator=clipped",
    "robust.clip_radius=.inf",
    "allow_degenerate=true",
]  # the rule with nothing to clip


def _run(model: Path, run_dir: Path, algorithm: str, *extra: str):
    overrides = [
        f"model.name={model}",
        "model.rank=4",
        "model.max_length=32",
        "model.head=train",
        "nodes=4",
        "partition.kind=iid",
        "rounds=2",
        "threads=1",
        "data.train_limit=64",
        "data.test_limit=16",
        "train.batch_size=4",
        "train.local_steps=2",
        "train.lr=0.01",
        "eval.every=1",
        "eval.node_examples=8",
        "checkpoint_every=100",
        f"algorithm.name={algorithm}",
        f"run_dir={run_dir}",
        *METHODS.get(algorithm, []),
        *extra,
    ]
    exp = build_experiment(load_config(None, overrides))
    run(exp)
    return exp


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r["event"] in ("round", "eval")]
    return [{k: v for k, v in r.items() if k not in MEASURED and not k.startswith("privacy_")} for r in rows]


@pytest.mark.parametrize("algorithm", list(METHODS))
def test_zero_noise_and_infinite_clips_are_the_plain_run(algorithm, tiny_bert, tmp_path, restore_threads):
    """Node-level DP without noise or clipping, aggregated by clipped with an infinite radius."""
    plain = _run(tiny_bert, tmp_path / "plain", algorithm)
    private = _run(tiny_bert, tmp_path / "private", algorithm, *NO_NOISE, *NO_CUT)
    assert_same_tensors(plain, private)
    ref, got = plain.algorithm.state_dict(), private.algorithm.state_dict()  # server model, folded base
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _records(plain.run_dir) == _records(private.run_dir)
    last = json.loads((private.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["privacy_epsilon"] == [float("inf")] * 4  # no noise: no privacy, and it says so


def test_a_scaled_attacker_moves_fslora_s_server_model_and_the_median_keeps_it_out(tiny_bert, tmp_path):
    """6 devices, each training 3 of the 4 components (so each has about 4.5 senders), a plain SGD server;
    node 1 sends 100 times its delta. The attack's effect on the server model: with the plain mean, and
    with the median over each component's senders (each against its own attack-free run)."""
    setup = [
        "nodes=6",
        "algorithm.clients_per_round=null",
        f"algorithm.sketch_ratios=[{','.join(['0.75'] * 6)}]",
    ]
    setup += ["server.optimizer=sgd", "server.lr=1.0"]
    attack = ["attack.kind=scaled", "attack.nodes=[1]", "attack.scale=100"]

    def effect(*rule: str) -> tuple[float, dict]:
        clean = _run(tiny_bert, tmp_path / f"clean{len(rule)}", "fslora", *setup, *rule)
        hit = _run(tiny_bert, tmp_path / f"hit{len(rule)}", "fslora", *setup, *rule, *attack)
        x, ref = hit.algorithm.server.x, clean.algorithm.server.x
        return sum(float((x[k] - ref[k]).square().sum()) for k in ref) ** 0.5, _records(hit.run_dir)[-1]

    plain, _ = effect()
    robust, last = effect("robust.aggregator=median")
    assert plain > 1.0 and robust < plain / 10, (robust, plain)  # measured: 0.09 against 10.1
    assert {"acc_honest_mean", "acc_honest_min", "acc_honest_avg_factors"} <= set(last)


@pytest.mark.parametrize("algorithm", ["hetlora", "flexlora", "flora"])
def test_krum_with_equal_ranks_leaves_a_scaled_upload_out(algorithm, tiny_bert, tmp_path):
    """Equal ranks: every node uploads the same components, so Krum has whole uploads to compare (with
    heterogeneous ranks the config refuses it). Node 1 sends 100 times its upload."""
    setup = ["nodes=5", "algorithm.ranks=null", "server.fraction=1.0"]
    attack = ["attack.kind=scaled", "attack.nodes=[1]", "attack.scale=100"]

    def effect(*rule: str) -> float:
        clean = _run(tiny_bert, tmp_path / f"clean{len(rule)}", algorithm, *setup, *rule)
        hit = _run(tiny_bert, tmp_path / f"hit{len(rule)}", algorithm, *setup, *rule, *attack)
        ref, got = (
            clean.fed.tensors() | clean.algorithm.state_dict(),
            hit.fed.tensors() | hit.algorithm.state_dict(),
        )
        return (
            sum(float((got[k].detach().double() - ref[k].detach().double()).square().sum()) for k in ref)
            ** 0.5
        )

    plain, krum = effect(), effect("robust.aggregator=krum")
    assert krum < plain / 10, (krum, plain)


@pytest.mark.parametrize("algorithm", ["flexlora", "fedex_lora", "flora"])
def test_krum_takes_every_nodes_head_upload_and_sends_the_same_bytes_as_the_mean(
    algorithm, tiny_bert, tmp_path, caplog
):
    """The trained head is its own upload: Krum chooses among every sender's head too (the factors' pick
    had narrowed it to one, which warned of a one-upload Krum each round and booked one node's bytes)."""
    setup = ["nodes=5", "algorithm.ranks=null", "server.fraction=1.0"]
    mean = _run(tiny_bert, tmp_path / "mean", algorithm, *setup)
    with caplog.at_level("WARNING", logger="declora.robust"):
        krum = _run(tiny_bert, tmp_path / "krum", algorithm, *setup, "robust.aggregator=krum")
    assert "Krum over" not in caplog.text
    bytes_of = {
        name: [r["bytes_total"] for r in _records(exp.run_dir)] for name, exp in (("m", mean), ("k", krum))
    }
    if algorithm != "flora":  # FLoRA broadcasts the stack of the chosen adapters: one under Krum
        assert bytes_of["k"] == bytes_of["m"]
