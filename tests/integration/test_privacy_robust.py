"""Privacy, attacks and robust mixing through the real CLI on a tiny 2-layer BERT (6 nodes on a ring).

- node-level DP with zero noise and an infinite clip, mixed by clipped gossip with an infinite radius,
  is the plain run bit for bit (metrics and every exported adapter); so is example-level DP-SGD with
  zero noise and an infinite clip;
- two sign-flipping nodes move the honest nodes' adapters away from the attack-free run; the honest
  nodes are reported separately, and clipped gossip keeps them closer to the attack-free run than the
  plain mean does;
- the same two statements under CHOCO-gossip (comm.codec=topk), where DP noises the change against the
  public copy, attackers publish corrupted copies and the robust rule mixes the copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from declora.cli import main
from declora.engine import MEASURED

pytestmark = pytest.mark.integration
ATTACKERS = (1, 4)
HONEST = (0, 2, 3, 5)


def _run(model: Path, run_dir: Path, *extra: str) -> Path:
    args = [
        f"model.name={model}",
        "model.rank=4",
        "model.max_length=32",
        "nodes=6",
        "partition.kind=iid",
        "topology.graph=ring",
        "rounds=3",
        "threads=1",
        "data.train_limit=96",
        "data.test_limit=24",
        "train.batch_size=4",
        "train.local_steps=2",
        "train.lr=0.01",
        "eval.every=1",
        "eval.node_examples=12",
        "checkpoint_every=100",
        f"run_dir={run_dir}",
        *extra,
    ]
    assert main(["run", *args]) == 0
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] in ("round", "eval")]


def _adapter(run_dir: Path, node: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapters" / f"node_{node:03d}" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def plain(tiny_bert, tmp_path_factory, restore_threads) -> Path:
    return _run(tiny_bert, tmp_path_factory.mktemp("plain") / "run")


NOTHING_TO_CUT = [
    "privacy.level=node",
    "privacy.noise_multiplier=0",
    "privacy.clip=.inf",
    "robust.aggregator=clipped",
    "robust.clip_radius=.inf",
    "allow_degenerate=true",  # the rule with nothing to clip, on purpose
]
TOPK = ["comm.codec=topk", "comm.fraction=0.25"]


def test_zero_noise_and_infinite_clips_reproduce_the_plain_run_exactly(plain, tiny_bert, tmp_path):
    _assert_same_run(plain, _run(tiny_bert, tmp_path / "run", *NOTHING_TO_CUT))


@pytest.fixture(scope="module")
def plain_topk(tiny_bert, tmp_path_factory, restore_threads) -> Path:
    return _run(tiny_bert, tmp_path_factory.mktemp("plain_topk") / "run", *TOPK)


def test_under_choco_zero_noise_and_infinite_clips_reproduce_the_plain_topk_run_exactly(
    plain_topk, tiny_bert, tmp_path
):
    _assert_same_run(plain_topk, _run(tiny_bert, tmp_path / "run", *TOPK, *NOTHING_TO_CUT))


def _assert_same_run(plain: Path, private: Path) -> None:
    volatile = set(MEASURED)  # timings and memory
    for a, b in zip(_records(plain), _records(private), strict=True):
        assert {k: v for k, v in a.items() if k not in volatile} == {
            k: v for k, v in b.items() if k not in volatile and not k.startswith("privacy_")
        }
        assert b["privacy_epsilon"] == [float("inf")] * 6  # no noise: no privacy, and it says so
    for node in range(6):
        ref, got = _adapter(plain, node), _adapter(private, node)
        assert all(torch.equal(ref[k], got[k]) for k in ref)


def _distance_to(reference: Path, run_dir: Path) -> float:
    total = 0.0
    for node in HONEST:
        ref, got = _adapter(reference, node), _adapter(run_dir, node)
        total += sum(float((ref[k] - got[k]).square().sum()) for k in ref)
    return total**0.5


@pytest.mark.parametrize("codec", ["fp32", "topk"])
def test_sign_flipping_nodes_are_contained_by_clipped_gossip_and_honest_nodes_reported(
    codec, plain, plain_topk, tiny_bert, tmp_path
):
    attack = ["attack.kind=sign_flip", f"attack.nodes=[{','.join(map(str, ATTACKERS))}]"]
    if codec == "topk":
        plain, attack = plain_topk, [*TOPK, *attack]
    mean = _run(tiny_bert, tmp_path / "mean", *attack)
    clipped = _run(
        tiny_bert, tmp_path / "clipped", *attack, "robust.aggregator=clipped", "robust.clip_radius=0.05"
    )
    last = _records(clipped)[-1]
    for key in ("acc_honest_mean", "acc_honest_min", "acc_honest_avg_factors", "consensus_BA_honest"):
        assert key in last
    assert last["acc_honest_min"] <= last["acc_honest_mean"]
    hit, kept = _distance_to(plain, mean), _distance_to(plain, clipped)
    assert hit > 0.1  # the attack changes the honest nodes' adapters
    assert kept < hit / 2, (kept, hit)  # clipped gossip bounds what the attackers can do


def test_example_level_dp_with_zero_noise_and_infinite_clip_is_the_plain_run(tiny_bert, tmp_path):
    """DP-SGD's per-row path (clip each example, then add) with nothing clipped or added trains exactly
    as the plain batched step (per-node clipping off in both)."""
    plain = _run(tiny_bert, tmp_path / "plain", "train.max_grad_norm=null", "train.lora_product=per_row")
    private = _run(
        tiny_bert,
        tmp_path / "private",
        "train.max_grad_norm=null",
        "privacy.level=example",
        "privacy.noise_multiplier=0",
        "privacy.clip=.inf",
    )
    for node in range(6):
        ref, got = _adapter(plain, node), _adapter(private, node)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _records(private)[-1]["privacy_epsilon"] == [float("inf")] * 6
    card = (private / "adapters" / "node_002" / "README.md").read_text()
    assert "Privacy: example-level DP-SGD; everything a node computes" in card and "NOT" not in card


def test_krum_at_the_server_keeps_a_sign_flippers_upload_out(tiny_bert, tmp_path):
    fedavg = ["algorithm.name=fedavg"]
    attack = ["attack.kind=sign_flip", "attack.nodes=[1]"]
    clean = _run(tiny_bert, tmp_path / "clean", *fedavg)
    mean = _run(tiny_bert, tmp_path / "mean", *fedavg, *attack)
    krum = _run(tiny_bert, tmp_path / "krum", *fedavg, *attack, "robust.aggregator=krum")
    hit, kept = _distance_to(clean, mean), _distance_to(clean, krum)
    assert kept < hit / 2, (kept, hit)
    assert "acc_honest_avg_factors" in _records(krum)[-1]


@pytest.mark.parametrize(
    ("algorithm", "head"),
    [
        ("dec_lora", "train"),
        ("fslora", "train"),
        ("fslora", "frozen"),
        ("hetlora", "train"),
        ("flexlora", "train"),
        ("flora", "train"),
        ("fedex_lora", "train"),
        ("scaffold", "train"),
        ("decaf", "train"),
    ],
)
def test_target_epsilon_is_what_the_run_spends_whatever_it_sends_per_round(
    tiny_bert, tmp_path, algorithm, head
):
    # sigma is solved for every message a node releases (a masked upload and its head, SCAFFOLD's two
    # uploads): the epsilon spent at the end is the target, not more (it was 12.2 for 8 on FSLoRA).
    extra = [
        "privacy.level=node",
        "privacy.target_epsilon=8",
        "privacy.clip=1.0",
        f"model.head={head}",
        "export=none",
    ]
    if algorithm == "fslora":
        extra.append("algorithm.sketch_ratios=[0.5,0.5,0.5,0.5,0.5,0.5]")
    run = _run(tiny_bert, tmp_path / "run", f"algorithm.name={algorithm}", *extra)
    spent = [r["privacy_epsilon_max"] for r in _records(run) if "privacy_epsilon_max" in r][-1]
    assert spent == pytest.approx(8.0, rel=0.02)


def test_a_private_attacked_runs_adapters_say_what_was_spent_and_withstood(tiny_bert, tmp_path):
    from declora.report import read_metrics

    private = ["privacy.level=node", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"]
    attacked = ["attack.kind=sign_flip", "attack.nodes=[0]", "robust.aggregator=median"]
    run_dir = _run(tiny_bert, tmp_path / "run", *private, *attacked)
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "eval"][-1]
    consensus = json.loads((run_dir / "adapters" / "consensus" / "declora_adapter.json").read_text())
    assert consensus["metrics"]["privacy_epsilon_max"] == last["privacy_epsilon_max"] > 0
    assert consensus["metrics"]["privacy_delta"] == 1e-5
    assert consensus["metrics"]["privacy_noise_multiplier"] == 1.0
    assert consensus["metrics"]["acc_honest_mean"] == last["acc_honest_mean"]
    assert consensus["run"]["privacy"] == "node level, clip 0.5"
    assert consensus["run"]["attack"] == "sign_flip by [0] nodes" and consensus["run"]["robust"] == "median"
    node = json.loads((run_dir / "adapters" / "node_001" / "declora_adapter.json").read_text())
    assert node["metrics"]["privacy_epsilon_this_node"] == last["privacy_epsilon"][1]
    readme = (run_dir / "adapters" / "consensus" / "README.md").read_text()
    assert "privacy node level, clip 0.5" in readme and "privacy_epsilon_max" in readme
    assert "| privacy_delta | 1e-05 |" in readme  # not 0.0000: a delta of 0 would claim pure DP
    # node-level DP covers the messages; the adapters are exact states, and their card says so
    assert "the (ε, δ) guarantee does NOT cover it" in readme
    assert "does NOT cover it" in (run_dir / "adapters" / "node_001" / "README.md").read_text()
    start = read_metrics(run_dir / "metrics.jsonl")[0]
    assert start["attackers"] == [0] and start["processes"] == {"world": 1, "nodes_per_rank": [6]}


def test_attackers_drawn_from_a_fraction_are_recorded_by_id(tiny_bert, tmp_path):
    from declora.attack import attacker_mask
    from declora.config import load_config
    from declora.report import read_metrics

    run_dir = _run(tiny_bert, tmp_path / "run", "attack.kind=gaussian", "attack.nodes=0.5", "rounds=1")
    drawn = attacker_mask(load_config(run_dir / "config.yaml").attack, 6, 0).nonzero().flatten().tolist()
    assert len(drawn) == 3 and read_metrics(run_dir / "metrics.jsonl")[0]["attackers"] == drawn
