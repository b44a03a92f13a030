"""Privacy, attacks and robust mixing through the real CLI on a tiny 2-layer BERT (6 nodes on a ring).

- node-level DP with zero noise and an infinite clip, mixed by clipped gossip with an infinite radius,
  is the plain run bit for bit (metrics and every exported adapter); so is example-level DP-SGD with
  zero noise and an infinite clip;
- and both are applied: a tiny clip changes every node's adapter from the plain run's (DP-SGD's bounds
  how far a round moves it), noise changes it again, and one seed gives the same run bit for bit;
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
from declora.config import load_config
from declora.engine import MEASURED
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration
ATTACKERS = (1, 4)
HONEST = (0, 2, 3, 5)


def _args(model: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
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


def _run(model: Path, run_dir: Path, *extra: str) -> Path:
    assert main(["run", *_args(model, run_dir, *extra)]) == 0
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


CLIP = 1e-5  # far below any message's change or example's gradient here: the clip always cuts


def _changed(reference: Path, run_dir: Path, node: int) -> bool:
    ref, got = _adapter(reference, node), _adapter(run_dir, node)
    assert ref.keys() == got.keys()
    return any(not torch.equal(ref[k], got[k]) for k in ref)


def _assert_identical(a: Path, b: Path) -> None:
    """Two runs of one seed: the same records (timings aside) and adapters, bit for bit."""
    volatile = set(MEASURED)
    for x, y in zip(_records(a), _records(b), strict=True):
        assert {k: v for k, v in x.items() if k not in volatile} == {
            k: v for k, v in y.items() if k not in volatile
        }
    differing = [node for node in range(6) if _changed(a, b, node)]
    assert not differing, f"one seed, but nodes {differing} differ"


@pytest.mark.parametrize("codec", ["fp32", "topk"])
def test_node_level_dp_with_a_small_clip_or_noise_changes_every_nodes_adapter(
    codec, plain, plain_topk, tiny_bert, tmp_path
):
    """The counterpart of the two plain-run tests above, which a run that never applied DP would pass
    too. Zero noise with a clip of 1e-5 changes what every node holds from the plain run's (each mixes
    its neighbours' clipped messages, or under CHOCO their copies built from clipped changes); noise then
    changes it again; and two noised runs of one seed are the same bit for bit."""
    reference, extra = (plain, []) if codec == "fp32" else (plain_topk, TOPK)
    node = ["privacy.level=node", f"privacy.clip={CLIP}"]
    clipped = _run(tiny_bert, tmp_path / "clipped", *extra, *node, "privacy.noise_multiplier=0")
    noised = _run(tiny_bert, tmp_path / "noised", *extra, *node, "privacy.noise_multiplier=1")
    for i in range(6):
        assert _changed(reference, clipped, i), f"node {i} holds the plain run's adapter: nothing clipped"
        assert _changed(clipped, noised, i), f"node {i} holds the noiseless run's adapter: no noise"
    _assert_identical(
        noised, _run(tiny_bert, tmp_path / "again", *extra, *node, "privacy.noise_multiplier=1")
    )


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


def _start(model: Path, run_dir: Path, *extra: str) -> dict[str, torch.Tensor]:
    """Every node's adapter (n, ...) before the first round, under the exported adapters' names."""
    exp = build_experiment(load_config(None, _args(model, run_dir, *extra)))
    start = {}
    for k, v in exp.fed.tensors().items():
        factor = k.rpartition(".")[2].startswith("lora_")  # PEFT names a factor's tensor <factor>.weight
        start["base_model.model." + (f"{k}.weight" if factor else k)] = v.detach()
    return start


def test_example_level_dp_with_a_small_clip_bounds_each_step_and_noise_changes_it(tiny_bert, tmp_path):
    """The counterpart of the test above, which a run that never applied DP-SGD would pass too. One round
    of 2 plain SGD steps (no momentum) at lr 1 with zero noise and a clip of 1e-5: each step is the mean
    of the batch's clipped gradients (the norm over A, B and the head together), at most the clip, so it
    moves a node at most lr x clip, and the gossip's convex mix keeps every node within 2 lr x clip of
    the common start. The plain run moves far more. Noise then changes every node's adapter, the same
    for one seed."""
    sgd = ["rounds=1", "train.optimizer=sgd", "train.momentum=0", "train.lr=1.0", "train.max_grad_norm=null"]
    dp = ["privacy.level=example", f"privacy.clip={CLIP}"]
    plain = _run(tiny_bert, tmp_path / "plain", *sgd, "train.lora_product=per_row")
    clipped = _run(tiny_bert, tmp_path / "clipped", *sgd, *dp, "privacy.noise_multiplier=0")
    noised = _run(tiny_bert, tmp_path / "noised", *sgd, *dp, "privacy.noise_multiplier=1")
    start = _start(tiny_bert, tmp_path / "start", *sgd)
    bound = 2 * 1.0 * CLIP  # local steps x lr x clip

    def moved(run_dir: Path, node: int) -> float:  # the norm of the node's change, every tensor together
        adapter = _adapter(run_dir, node)
        assert adapter.keys() == start.keys()
        squares = [(v.double() - start[k][node].double()).square().sum() for k, v in adapter.items()]
        return float(sum(squares)) ** 0.5

    for i in range(6):
        # 1 %: the mix's float32 rounding of A (norm about 1 a layer), some 1e-7 in all
        assert moved(clipped, i) <= 1.01 * bound, (i, moved(clipped, i), bound)
        assert moved(plain, i) > 10 * bound, (i, moved(plain, i))  # the clip did cut
        assert _changed(plain, clipped, i), f"node {i} holds the plain run's adapter: nothing clipped"
        assert _changed(clipped, noised, i), f"node {i} holds the noiseless run's adapter: no noise"
    _assert_identical(noised, _run(tiny_bert, tmp_path / "again", *sgd, *dp, "privacy.noise_multiplier=1"))


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
    assert consensus["run"]["privacy"] == "node level, clip 0.5, seeded noise"
    assert consensus["run"]["attack"] == "sign_flip by [0] nodes" and consensus["run"]["robust"] == "median"
    node = json.loads((run_dir / "adapters" / "node_001" / "declora_adapter.json").read_text())
    assert node["metrics"]["privacy_epsilon_this_node"] == last["privacy_epsilon"][1]
    readme = (run_dir / "adapters" / "consensus" / "README.md").read_text()
    assert "privacy node level, clip 0.5, seeded noise" in readme and "privacy_epsilon_max" in readme
    assert "anyone who knows it can recompute the noise and remove it" in readme
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


@pytest.mark.parametrize("level", ["node", "example"])
def test_secure_noise_is_drawn_anew_by_every_run(tiny_bert, tmp_path, level):
    """privacy.secure_noise: two runs of one config differ (seeded noise gives the same messages, so
    anyone with the seed could remove it: tested bit for bit elsewhere); under DP-SGD the batch order is
    secret too, its seed kept in the checkpoint only (a resume goes on with its epochs), never in
    config.yaml or metrics.jsonl."""
    private = [f"privacy.level={level}", "privacy.noise_multiplier=1.0", "privacy.clip=0.5", "rounds=1"]
    secure = [
        _run(tiny_bert, tmp_path / f"secure{k}", *private, "privacy.secure_noise=true", "checkpoint_every=1")
        for k in (0, 1)
    ]
    first, second = (_adapter(run, 0) for run in secure)
    assert not any(torch.equal(first[k], second[k]) for k in first if "lora_B" in k)
    streams = [json.loads(next((r / "state").glob("round_*.json")).read_text())["streams"] for r in secure]
    if level == "example":
        seeds = [s["seed"] for s in streams]
        assert seeds[0] != seeds[1] and 0 not in seeds  # not the run's seed: a secret of this process
        for run, seed in zip(secure, seeds, strict=True):
            assert str(seed) not in (run / "config.yaml").read_text() + (run / "metrics.jsonl").read_text()
    else:
        assert all("seed" not in s for s in streams)  # node level draws its batches as any run


def test_a_server_methods_upload_is_clipped_against_the_server_model_it_fetched(
    tiny_bert, tmp_path, monkeypatch
):
    """DP-FedAvg: a node's upload is the server model it fetched plus its clipped change plus noise; the
    server model is public, so clipping against it costs no privacy, and the clip is spent on what the
    node learned. (Against the node's own previous upload, the change held the noise of that upload,
    which has norm sigma C sqrt(D), so the clip went mostly to undoing it.)"""
    import declora.guard as guard

    calls = []
    real = guard.privatize

    def spy(x, prev, *args, **kwargs):
        out = real(x, prev, *args, **kwargs)
        calls.append(({k: v.clone() for k, v in prev.items()}, {k: v.clone() for k, v in out.items()}))
        return out

    monkeypatch.setattr(guard, "privatize", spy)
    private = ["privacy.level=node", "privacy.noise_multiplier=1.0", "privacy.clip=0.5", "rounds=2"]
    _run(tiny_bert, tmp_path / "run", "algorithm.name=fedavg", *private)
    (first_ref, first_uploads), (second_ref, _) = calls  # one upload of every node per round
    for name, uploads in first_uploads.items():
        server = uploads.mean(0, keepdim=True)  # 6 nodes, equal weights: the model all of them fetch
        torch.testing.assert_close(second_ref[name], server.expand_as(uploads), atol=1e-6, rtol=0)
        assert not torch.allclose(second_ref[name][0], uploads[0])  # not node 0's own last upload
        assert torch.equal(first_ref[name], first_ref[name][:1].expand_as(uploads))  # the common start
