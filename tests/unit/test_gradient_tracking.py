"""dec_gt (K-GT, gradient tracking with local steps): the track's invariants on tensors, drift removal on
quadratics, and on the tiny BERT the zero-sum corrections, identical nodes = Dec-LoRA, and refusals."""

from __future__ import annotations

import pytest
import torch
from unit_helpers import tiny_experiment

from declora import engine
from declora.algorithms.dec_gt import track
from declora.algorithms.scaffold import mean_step
from declora.config import ConfigError, TopologyConfig, load_config
from declora.topology import build_graph, mixing_matrix
from declora.train import NodeStreams

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread", "no_report")]


def ring(n: int) -> torch.Tensor:
    """Metropolis-Hastings weights of a ring of n nodes: symmetric and doubly stochastic."""
    cfg = TopologyConfig()
    return torch.as_tensor(mixing_matrix(build_graph(cfg, n, 0), cfg), dtype=torch.float32)


def test_track_keeps_the_sum_leaves_identical_nodes_and_slices_agree():
    g = torch.Generator().manual_seed(0)
    W = ring(6)
    d = torch.randn(6, 3, 5, generator=g)
    c = torch.randn(6, 3, 5, generator=g)
    c -= c.mean(0)  # sum_i c_i = 0
    new = track(c, d, W, torch.arange(6))
    assert new.sum(0).abs().max() < 1e-6
    assert (new - c).abs().max() > 0.1
    want = (W @ d.view(6, -1) - d.view(6, -1)).view_as(d)  # sum_j W_ij d_j - d_i
    torch.testing.assert_close(new - c, want, atol=1e-6, rtol=0)
    rows = torch.tensor([1, 2, 5])  # a process hosting three of the nodes: the simulator's rows, bit for bit
    assert torch.equal(track(c[rows], d, W, rows), new[rows])
    same = d[:1].expand_as(d).clone()  # identical messages: exactly nothing to track
    assert torch.equal(track(c, same, W, torch.arange(6)), c)
    assert torch.equal(track(c, d, torch.eye(6), torch.arange(6)), c)  # nobody hears anybody


def _consensus_distance(x: torch.Tensor) -> float:
    return float((x - x.mean(0)).pow(2).sum(1).mean())


def _local_sgd_gossip(seed: int, tracking: bool, rounds: int = 200, steps: int = 5, lr: float = 0.1):
    """n nodes on a ring, f_i(x) = 1/2 a_i ||x - b_i||^2, K plain SGD steps on grad f_i + c_i per round,
    then x <- W z and (tracking) c_i += sum_j W_ij (d_j - d_i). Returns (x (n, dim), the optimum)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = 6, 4
    a = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)  # curvatures
    b = 3 * torch.randn(n, dim, generator=g, dtype=torch.float64)  # minimizers: heterogeneous nodes
    W = ring(n).double()
    x, c = torch.zeros(n, dim, dtype=torch.float64), torch.zeros(n, dim, dtype=torch.float64)
    for _ in range(rounds):
        z = x.clone()
        for _ in range(steps):
            z -= lr * (a * (z - b) + c)
        if tracking:
            c = track(c, mean_step(x, z, torch.full((n,), lr), steps), W, torch.arange(n))
            assert c.sum(0).abs().max() < 1e-9
        x = W @ z
    return x, (a * b).sum(0) / a.sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_tracking_removes_the_drift_of_local_steps_on_quadratics(seed):
    """D-SGD with local steps settles where the nodes disagree and off the optimum; K-GT reaches both."""
    plain, best = _local_sgd_gossip(seed, tracking=False)
    tracked, _ = _local_sgd_gossip(seed, tracking=True)
    assert _consensus_distance(plain) > 0.1
    assert _consensus_distance(tracked) < 1e-6 * _consensus_distance(plain)
    assert (plain.mean(0) - best).norm() > 0.01
    assert (tracked - best).norm() < 1e-5  # W in float32: its rows sum to 1 up to ~1e-8


def _run(tiny_bert, tiny_data, folder, *extra, same_data=False):
    exp = tiny_experiment(tiny_bert, tiny_data, folder, "train.local_steps=2", "eval.every=100", *extra)
    if same_data:  # every node draws node 0's batches, in node 0's order
        copies = [NodeStreams([exp.parts[0]], exp.cfg.train.batch_size, exp.cfg.seed) for _ in range(exp.n)]
        exp.trainer.streams.next_batch = lambda node: copies[node].next_batch(0)
    return exp, engine.run(exp)


@pytest.mark.parametrize("attack", [(), ("attack.kind=sign_flip", "attack.nodes=[1]")], ids=["", "sign_flip"])
def test_corrections_sum_to_zero_every_round_on_a_complete_graph(attack, tiny_bert, tiny_data, tmp_path):
    """Also when node 1 sends sign-flipped messages: each node subtracts its own message as sent."""
    skew = ("partition.kind=dirichlet", "partition.alpha=0.1", "topology.graph=complete")
    extra = ("algorithm.name=dec_gt", *skew, "topology.weights=uniform", "rounds=3", *attack)
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "train.local_steps=2", "eval.every=100", *extra)
    sums, sizes = [], []

    def record(_):
        c = exp.algorithm.c.values()
        sums.append(max(float(v.sum(0).abs().max()) for v in c))
        sizes.append(max(float(v.abs().max()) for v in c))

    engine.run(exp, on_round=record)
    assert len(sums) == 3 and max(sums) < 1e-6, sums
    assert min(sizes) > 1e-3, sizes  # the nodes' data differ: the corrections are not trivially zero


def test_identical_data_keeps_corrections_zero_and_is_dec_lora(tiny_bert, tiny_data, tmp_path):
    gossip, plain = _run(
        tiny_bert, tiny_data, tmp_path / "g", "algorithm.name=dec_lora", "rounds=3", same_data=True
    )
    gt, tracked = _run(
        tiny_bert, tiny_data, tmp_path / "t", "algorithm.name=dec_gt", "rounds=3", same_data=True
    )
    for k, v in gt.fed.tensors().items():
        assert torch.equal(v.detach()[0], v.detach()[3]), k  # the nodes really are identical
        assert torch.equal(v.detach(), gossip.fed.tensors()[k].detach()), k
    assert all(int(torch.count_nonzero(c)) == 0 for c in gt.algorithm.c.values())
    assert [r["train_loss"] for r in tracked] == [r["train_loss"] for r in plain]
    assert [r["bytes_round"] for r in tracked] == [2 * r["bytes_round"] for r in plain]  # z_i and d_i
    other, _ = _run(tiny_bert, tiny_data, tmp_path / "o", "algorithm.name=dec_gt", "rounds=2")
    assert any(int(torch.count_nonzero(c)) > 0 for c in other.algorithm.c.values())  # different data


def _consensus(exp) -> float:
    """Mean squared distance of the nodes' trained tensors to their mean, summed over tensors."""
    return sum(_consensus_distance(v.detach().flatten(1)) for v in exp.fed.tensors().values())


@pytest.mark.parametrize("seed", [0, 1])
def test_tracking_leaves_less_disagreement_than_dec_lora_under_label_skew(
    seed, tiny_bert, tiny_data, tmp_path
):
    """Dirichlet(0.1) label skew on a ring, 6 rounds of 5 local steps: measured final consensus distance
    of dec_gt / dec_lora 0.20 (seed 0) and 0.36 (seed 1); dec_lora's grows every round, dec_gt's falls
    from round 3 on. Asserted with margin: below 0.6."""
    extra = ("partition.kind=dirichlet", "partition.alpha=0.1", "train.local_steps=5", "rounds=6")
    final = {}
    for name in ("dec_lora", "dec_gt"):
        exp = tiny_experiment(
            tiny_bert,
            tiny_data,
            tmp_path / name,
            f"algorithm.name={name}",
            f"seed={seed}",
            "eval.every=100",
            *extra,
        )
        engine.run(exp)
        final[name] = _consensus(exp)
    assert final["dec_gt"] < 0.6 * final["dec_lora"], final


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["train.local_unit=epochs"], "train.local_unit"),
        (["comm.codec=topk"], "comm.codec=topk"),
        (["privacy.level=node", "privacy.noise_multiplier=1"], "privacy.level=node"),
        (["stragglers.asynchronous=true", "stragglers.max_staleness=1"], "asynchronous"),
        (["robust.aggregator=median"], "robust.aggregator"),
    ],
)
def test_incompatible_combinations_are_one_line_errors(extra, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, ["algorithm.name=dec_gt", *extra])
    assert "\n" not in str(err.value) and "dec_gt" in str(err.value)
