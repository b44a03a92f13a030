"""Node-level DP and message attacks on the masked-upload methods (FSLoRA, HetLoRA, FlexLoRA, FedEx-LoRA,
FLoRA) and on SCAFFOLD's two uploads, through the engine on a tiny 2-layer BERT (4 nodes, 2 rounds).

- zero noise and an infinite clip reproduce the plain run bit for bit (every node's tensors, the
  algorithm's server state or folded base, every metric) for each of the six methods;
- and DP acts on each of their uploads: a tiny clip changes the factors' and the head's aggregate from
  the plain run's and bounds how far one round moves them (where the aggregate is a mean of the
  messages); noise changes them again, the same under the same seed;
- a robust rule with nothing to cut (clipped, infinite radius) aggregates as the plain mean, exactly;
- a scaled attacker's upload moves FSLoRA's server model; the median over each component's senders
  keeps most of it out, and the honest nodes are reported apart;
- Krum picks the trained head of one node, the one a hand-computed Krum picks, not the mean.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors

from declora.algorithms.ranks import average_head
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


def _experiment(model: Path, run_dir: Path, algorithm: str, *extra: str):
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
    return build_experiment(load_config(None, overrides))


def _run(model: Path, run_dir: Path, algorithm: str, *extra: str):
    exp = _experiment(model, run_dir, algorithm, *extra)
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
    ref, got = plain.algorithm.state_dict(), _without_fetched(private.algorithm.state_dict())
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # server, folded base
    assert _records(plain.run_dir) == _records(private.run_dir)
    last = json.loads((private.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["privacy_epsilon"] == [float("inf")] * 4  # no noise: no privacy, and it says so


CLIP = 1e-4  # far below what a round of local training moves: every upload this small clip cuts
CLIP_ONLY = ["privacy.level=node", "privacy.noise_multiplier=0", f"privacy.clip={CLIP}"]
NOISED = ["privacy.level=node", "privacy.noise_multiplier=1", f"privacy.clip={CLIP}"]
# The server moves by the mean upload itself (FSLoRA's and HetLoRA's own AdamW would rescale it).
SGD = ["server.optimizer=sgd", "server.lr=1.0"]
ONE_ROUND = {"fslora": [*SGD, "rounds=1"], "hetlora": [*SGD, "rounds=1"]}
# Groups of tensors sent as one message in round 1: each message is within CLIP of the shared initial
# adapter (a masked upload: of the node's start; the head and SCAFFOLD's factors: of the initial, public
# previous message), so their weighted mean, which every node then holds, is too. FlexLoRA and FLoRA
# aggregate products (refactored by an SVD, folded into the base), which this bound does not cover.
BOUNDED = {
    "fslora": [("head",), ("A", "B")],
    "hetlora": [("head",), ("A", "B")],
    "flexlora": [("head",)],
    "scaffold": [("A", "B", "head")],
    "fedex_lora": [("head",), ("A", "B")],
    "flora": [("head",)],
}


def _without_fetched(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An algorithm's state less the copy of the server model its nodes fetched, which a server method
    keeps under node-level DP only (the reference its uploads are clipped against)."""
    return {k: v for k, v in state.items() if not k.startswith("fetched/")}


def _snapshot(exp) -> dict[str, torch.Tensor]:
    """Every node's trained tensors and the algorithm's state (server model, folded base, SCAFFOLD's
    control variates), copied."""
    return {k: v.detach().clone() for k, v in exp.fed.tensors().items()} | {
        f"state/{k}": v.clone() for k, v in _without_fetched(exp.algorithm.state_dict()).items()
    }


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> bool:
    assert keys and all(k in a and k in b for k in keys)
    return any(not torch.equal(a[k], b[k]) for k in keys)


def _row_changes(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], keys) -> torch.Tensor:
    """(n,) each node's change of the tensors ``keys`` together (L2)."""
    return sum((after[k] - before[k]).double().flatten(1).square().sum(1) for k in keys) ** 0.5


@pytest.mark.parametrize("algorithm", list(METHODS))
def test_a_small_clip_and_noise_act_on_every_upload(algorithm, tiny_bert, tmp_path, restore_threads):
    """The counterpart of the plain-run test above, which a run that never applied DP would pass too. In
    one round: zero noise with a clip of 1e-4 changes the factors' aggregate (or state) and the head's from
    the plain run's (local training is the same in both: only the messages are clipped) and keeps each
    message group's change within the clip; noise then changes both again, identically for one seed."""
    setup = ONE_ROUND.get(algorithm, ["rounds=1"])
    plain = _snapshot(_run(tiny_bert, tmp_path / "plain", algorithm, *setup))
    exp = _experiment(tiny_bert, tmp_path / "clipped", algorithm, *setup, *CLIP_ONLY)
    start = _snapshot(exp)
    run(exp)
    clipped = _snapshot(exp)
    heads = list(exp.fed.tensors(("head",)))
    variates = [k for k in clipped if k.startswith("state/c/")]  # SCAFFOLD's server control variate
    factors = [k for k in clipped if k not in heads + variates]  # the factors and the algorithm's state
    head_cut, factors_cut = _differ(plain, clipped, heads), _differ(plain, clipped, factors)
    assert head_cut, "the head's upload is the plain run's: not clipped"
    assert factors_cut, "the factors' upload is the plain run's: not clipped"
    for kinds in BOUNDED[algorithm]:
        keys = list(exp.fed.tensors(kinds))
        moved = _row_changes(clipped, start, keys)
        assert moved.max() <= CLIP * (1 + 1e-4), f"{kinds} moved {moved.tolist()} past the clip {CLIP}"
        assert _row_changes(plain, start, keys).min() > 10 * CLIP  # the clip did cut: the plain run moved
    if variates:  # SCAFFOLD's second upload, the control-variate changes, clipped against zero
        variates_cut = _differ(plain, clipped, variates)
        assert variates_cut, "the control-variate upload is the plain run's: not clipped"
        assert sum(float(clipped[k].double().square().sum()) for k in variates) ** 0.5 <= CLIP * (1 + 1e-4)

    noised = _snapshot(_run(tiny_bert, tmp_path / "noised", algorithm, *setup, *NOISED))
    for what, keys in (("head", heads), ("factors", factors), ("control variates", variates)):
        noise_added = not keys or _differ(clipped, noised, keys)
        assert noise_added, f"the {what} upload is the noiseless run's: no noise"
    again = _snapshot(_run(tiny_bert, tmp_path / "again", algorithm, *setup, *NOISED))
    unequal = [k for k in noised if not torch.equal(noised[k], again[k])]
    assert noised.keys() == again.keys() and not unequal, f"one seed, other noise: {unequal}"


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


def _krum_pick(uploads: torch.Tensor, f: int) -> int:
    """Krum (Blanchard et al., 2017) by hand over uploads (m, D): the smallest sum of squared distances to
    its m - f - 2 nearest others."""
    dist = torch.cdist(uploads, uploads).square()
    dist.fill_diagonal_(float("inf"))
    return int(dist.sort(1).values[:, : uploads.shape[0] - f - 2].sum(1).argmin())


@pytest.mark.parametrize("algorithm", ["flexlora", "fedex_lora", "flora"])
def test_krum_takes_every_nodes_head_upload_and_sends_the_same_bytes_as_the_mean(
    algorithm, tiny_bert, tmp_path, caplog, monkeypatch
):
    """The trained head is its own upload: Krum chooses among every sender's head too (the factors' pick
    had narrowed it to one, which warned of a one-upload Krum each round and booked one node's bytes).
    Krum acts on it: after the last round every node holds exactly the head one node uploaded, the one
    Krum picks among the five heads (with the default f = 1), not their mean."""
    setup = ["nodes=5", "algorithm.ranks=null", "server.fraction=1.0"]
    mean = _run(tiny_bert, tmp_path / "mean", algorithm, *setup)
    module = importlib.import_module(f"declora.algorithms.{algorithm}")
    uploaded: list[dict[str, torch.Tensor]] = []  # each round's heads, as the nodes upload them

    def recording(ctx, kinds, weights):
        uploaded.append({k: v.detach().clone() for k, v in ctx.fed.tensors(("head",)).items()})
        return average_head(ctx, kinds, weights)

    monkeypatch.setattr(module, "average_head", recording)
    with caplog.at_level("WARNING", logger="declora.robust"):
        krum = _run(tiny_bert, tmp_path / "krum", algorithm, *setup, "robust.aggregator=krum")
    assert "Krum over" not in caplog.text
    assert len(uploaded) == 2  # one head upload a round
    heads = krum.fed.tensors(("head",))
    flat = torch.cat([uploaded[-1][k].double().flatten(1) for k in heads], 1)  # (5, D): the last uploads
    held = torch.cat([v.detach().double().flatten(1) for v in heads.values()], 1)  # (5, D): every node's
    picked = [j for j in range(5) if all(torch.equal(held[i], flat[j]) for i in range(5))]
    assert picked == [_krum_pick(flat, f=1)], picked  # one node's upload, bit for bit: Krum's choice
    assert not torch.allclose(held[0], flat.mean(0))  # not the mean of the uploads
    bytes_of = {
        name: [r["bytes_total"] for r in _records(exp.run_dir)] for name, exp in (("m", mean), ("k", krum))
    }
    if algorithm != "flora":  # FLoRA broadcasts the stack of the chosen adapters: one under Krum
        assert bytes_of["k"] == bytes_of["m"]
