"""Time-varying W(t): determinism from (seed, round), modifiers' rates, offline nodes, diagnostics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from declora.config import TopologyConfig
from declora.schedules import SCHEDULES, Schedule, build_schedule, describe, draw, expected_contraction
from declora.topology import check_mixing_matrix, graph_of, spectral_gap

pytestmark = pytest.mark.unit

CFG = TopologyConfig()
KINDS = [
    {"schedule": "static"},
    {"schedule": "dynamic_er", "p": 0.3},
    {"schedule": "pairwise", "encounter_prob": 0.2},
    {"schedule": "one_peer_exponential"},
    {"schedule": "periodic_full", "period": 3},
    {"schedule": "static", "link_failure": 0.3, "node_dropout": 0.2},
    {"schedule": "dynamic_er", "p": 0.5, "link_failure": 0.2, "node_dropout": 0.3},
    {"schedule": "static", "graph": "torus", "weights": "uniform", "link_failure": 0.3},  # falls back to MH
    {"schedule": "periodic_full", "weights": "laplacian", "lazy": True, "node_dropout": 0.3},
]


# every kind on 1, 6 and 9 nodes; a torus only on 9 (it needs a square count)
SIZED = [(over, n) for over in KINDS for n in (1, 6, 9) if over.get("graph") != "torus" or n == 9]


@pytest.mark.parametrize(
    ("over", "n"),
    SIZED,
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v),
)
def test_every_round_is_a_valid_mixing_matrix(over: dict, n: int) -> None:
    cfg = replace(CFG, **over)
    s = build_schedule(cfg, n, seed=0)
    assert isinstance(s, Schedule) and s.n == n
    for t in range(12):
        w, up = s.matrix(t), s.online(t)
        assert w.shape == (n, n) and w.dtype == torch.float64
        assert up.shape == (n,) and up.dtype == torch.bool
        check_mixing_matrix(w.numpy(), atol=1e-12)
        eye = torch.eye(n, dtype=torch.float64)
        assert torch.equal(w[~up], eye[~up]) and torch.equal(w[:, ~up], eye[:, ~up])


def _snapshot(cfg: TopologyConfig, n: int, seed: int, rounds: list[int]) -> list[list[list[float]]]:
    s = build_schedule(cfg, n, seed)
    return [s.matrix(t).tolist() for t in rounds]


def test_same_seed_and_round_same_w_in_another_process() -> None:
    cfg = replace(CFG, schedule="dynamic_er", p=0.4, link_failure=0.1, node_dropout=0.1)
    rounds = [0, 3, 17]
    here = _snapshot(cfg, 10, 7, rounds)
    assert here == _snapshot(cfg, 10, 7, rounds)  # a fresh object, same draws
    code = (
        "import json; from declora.config import TopologyConfig as T;"
        "from declora.schedules import build_schedule;"
        "s = build_schedule(T(schedule='dynamic_er', p=0.4, link_failure=0.1, node_dropout=0.1), 10, 7);"
        f"print(json.dumps([s.matrix(t).tolist() for t in {rounds}]))"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout) == here


@pytest.mark.parametrize(
    "over",
    [
        {"schedule": "dynamic_er"},
        {"schedule": "pairwise", "encounter_prob": 0.3},
        {"schedule": "one_peer_exponential"},
        {"link_failure": 0.3},
    ],
)
def test_rounds_differ_for_dynamic_schedules(over: dict) -> None:
    s = build_schedule(replace(CFG, **over), 8, seed=0)
    assert not s.is_static
    assert not torch.equal(s.matrix(0), s.matrix(1))


def test_seeds_differ_for_random_schedules() -> None:
    cfg = replace(CFG, schedule="dynamic_er")
    assert not torch.equal(build_schedule(cfg, 8, seed=0).matrix(1), build_schedule(cfg, 8, seed=1).matrix(1))


def test_static_schedule_is_cached_and_constant() -> None:
    s = build_schedule(CFG, 8, seed=0)
    assert s.is_static
    assert torch.equal(s.matrix(0), s.matrix(123))
    s.matrix(0).zero_()  # a caller writing in place must not corrupt the cache
    assert s.matrix(0).sum() == pytest.approx(8.0)
    assert bool(s.online(5).all())


def test_link_failure_rate_within_three_standard_errors() -> None:
    n, f, rounds = 10, 0.3, 300
    s = build_schedule(replace(CFG, graph="complete", link_failure=f), n, seed=0)
    pairs = n * (n - 1) // 2
    failed = sum(pairs - graph_of(s.matrix(t).numpy()).number_of_edges() for t in range(rounds))
    trials = pairs * rounds
    assert abs(failed / trials - f) < 3 * math.sqrt(f * (1 - f) / trials)


def test_node_dropout_rate_within_three_standard_errors() -> None:
    n, q, rounds = 12, 0.2, 400
    s = build_schedule(replace(CFG, schedule="dynamic_er", p=0.5, node_dropout=q), n, seed=0)
    offline = sum(int((~s.online(t)).sum()) for t in range(rounds))
    assert abs(offline / (n * rounds) - q) < 3 * math.sqrt(q * (1 - q) / (n * rounds))


def test_offline_nodes_keep_identity_rows() -> None:
    s = build_schedule(replace(CFG, graph="complete", node_dropout=0.5), 8, seed=0)
    seen = 0
    for t in range(20):
        w, up = s.matrix(t), s.online(t)
        for i in torch.nonzero(~up).flatten().tolist():
            expected = torch.zeros(8, dtype=torch.float64)
            expected[i] = 1.0
            assert torch.equal(w[i], expected) and torch.equal(w[:, i], expected)
            seen += 1
    assert seen > 0


def test_pairwise_single_pair_averages_half() -> None:
    w = build_schedule(replace(CFG, schedule="pairwise", encounter_prob=1.0), 2, seed=0).matrix(4)
    assert torch.equal(w, torch.full((2, 2), 0.5, dtype=torch.float64))


def test_dynamic_er_isolated_node_keeps_itself() -> None:
    w = build_schedule(replace(CFG, schedule="dynamic_er", p=0.0), 5, seed=0).matrix(0)
    assert torch.equal(w, torch.eye(5, dtype=torch.float64))


def test_one_peer_exponential_averages_exactly_after_log2_n_rounds() -> None:
    n = 8
    s = build_schedule(replace(CFG, schedule="one_peer_exponential"), n, seed=0)
    prod = torch.eye(n, dtype=torch.float64)
    for t in range(3):
        assert graph_of(s.matrix(t).numpy()).number_of_edges() == n // 2  # one peer each
        prod = s.matrix(t) @ prod
    torch.testing.assert_close(prod, torch.full((n, n), 1 / n, dtype=torch.float64))


def test_periodic_full_averages_every_period() -> None:
    s = build_schedule(replace(CFG, schedule="periodic_full", period=4), 6, seed=0)
    full = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    assert [torch.allclose(s.matrix(t), full) for t in range(8)] == [False, False, False, True] * 2
    torch.testing.assert_close(s.matrix(0), build_schedule(CFG, 6, 0).matrix(0))
    # lazy makes the gossip rounds (I + W)/2 but leaves the full averages exact
    lazy = build_schedule(replace(CFG, schedule="periodic_full", period=4, lazy=True), 6, seed=0)
    torch.testing.assert_close(lazy.matrix(3), full)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(lazy.matrix(0), (eye + s.matrix(0)) / 2)


def test_expected_contraction() -> None:
    ring = build_schedule(CFG, 8, seed=0)
    rho, err = expected_contraction(ring)
    assert err == 0.0 and rho == pytest.approx((1 - spectral_gap(ring.matrix(0).numpy())) ** 2)
    sparse, dense = (
        expected_contraction(build_schedule(replace(CFG, schedule="dynamic_er", p=p), 10, 0), 100)
        for p in (0.2, 0.6)
    )
    assert 0 < dense[0] < sparse[0] < 1
    assert 0 < sparse[1] < 0.1 and 0 < dense[1] < 0.1


def test_describe_and_draw(tmp_path: Path) -> None:
    info = describe(build_schedule(CFG, 6, seed=0))
    assert info["nodes"] == 6 and info["edges"] == 6 and info["degrees"] == [2] * 6 and info["is_static"]
    assert (info["min_degree"], info["mean_degree"], info["max_degree"]) == (2, 2.0, 2)
    assert info["spectral_gap"] == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 6)))
    np.testing.assert_allclose(info["row0"], [1 / 3, 1 / 3, 0, 0, 0, 1 / 3])
    rand = describe(build_schedule(replace(CFG, schedule="pairwise"), 6, seed=0), samples=20)
    assert not rand["is_static"] and {"rho", "rho_stderr"} <= set(rand) and "spectral_gap" not in rand
    path = draw(build_schedule(replace(CFG, node_dropout=0.3), 6, seed=0), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_schedule_inputs() -> None:
    with pytest.raises(ValueError, match="'gossip'") as err:
        build_schedule(replace(CFG, schedule="gossip"), 4, 0)
    assert str(sorted(SCHEDULES)) in str(err.value)
    for over, key in [
        ({"link_failure": 1.2}, "link_failure"),
        ({"node_dropout": -0.5}, "node_dropout"),
        ({"schedule": "pairwise", "encounter_prob": 2.0}, "encounter_prob"),
        ({"schedule": "dynamic_er", "p": -1.0}, "p"),
    ]:
        with pytest.raises(ValueError, match=rf"topology.{key}=.*\[0, 1\]"):
            build_schedule(replace(CFG, **over), 4, 0)
    with pytest.raises(ValueError, match="period=0"):
        build_schedule(replace(CFG, schedule="periodic_full", period=0), 4, 0)
    with pytest.raises(ValueError, match="uniform needs a regular graph"):  # caught at build, not mid-run
        build_schedule(replace(CFG, graph="star", weights="uniform", link_failure=0.2), 5, 0)
