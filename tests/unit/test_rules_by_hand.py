"""Update rules against hand-computed values, where a property test alone would pass a wrong rule: the
server optimizers past their first step, the alternating reset, Krum and the clipped server rule, TAD-LoRA's
interval, quantity skew, SCAFFOLD's and K-GT's corrections in a real round, Metropolis-Hastings weights off
regular graphs, a DP noise solved for several plans, the byte ledger's per-node mean, and DeCAF resetting
only the nodes it re-factorized (a codec's error feedback across a resume: test_fslora.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from declora.server_opt import ServerOptimizer

pytestmark = pytest.mark.unit


# the second and later steps of yogi and adam (only step 1 is pinned today)
@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
def test_adaptive_second_moment_over_three_steps(rule):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    ds = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.01, 3.0, -0.5]), torch.tensor([-1.0, 0.2, 0.5])]
    opt = ServerOptimizer(rule, lr=lr, betas=(b1, b2), tau=tau)
    x = {"w": torch.zeros(3)}
    m, v, want = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    for d in ds:
        opt.step(x, {"w": d.clone()})
        m = b1 * m + (1 - b1) * d
        if rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif rule == "yogi":
            v = v - (1 - b2) * d * d * torch.sign(v - d * d)
        else:
            v = v + d * d
        want = want + lr * m / (v.sqrt() + tau)
        torch.testing.assert_close(opt.v["w"], v, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(x["w"], want, atol=1e-6, rtol=1e-6)
    # hand numbers for the second coordinate after step 2 (independent of the loop above)
    if rule == "adam":
        assert float(opt.v["w"][1]) == pytest.approx(0.99 * 0.99 * 0.04 + 0.99 * 0.09 + 0.01 * 0.04, rel=1e-5)
    if rule == "yogi":  # v1 = 0.04 < 9 = d2^2: v grows by (1-b2) d2^2; then v2 = 0.13 > 0.04 = d3^2: shrinks
        assert float(opt.v["w"][1]) == pytest.approx(0.04 + 0.09 - 0.01 * 0.04, rel=1e-5)


# at a phase switch the factor that OPENS the next phase is reset, not the one that just trained
def test_end_of_round_resets_the_factor_of_the_next_phase_only():
    from declora.algorithms.alternating import PhaseClock, end_of_round

    reset = []
    fed = SimpleNamespace(tensors=lambda kinds: {f"l.lora_{k}": None for k in kinds})
    opt = SimpleNamespace(reset=lambda names: reset.append(tuple(names)))
    clock = PhaseClock(2, "B")  # B B A A B B
    for t in range(5):
        end_of_round(SimpleNamespace(round=t, fed=fed, optimizer=opt), clock, "reset")
    assert reset == [("l.lora_A",), ("l.lora_B",)]  # after round 1 (A opens round 2), after round 3


# Krum's choice is the argmin of the score over the m - f - 2 nearest
def test_krum_picks_the_hand_computed_upload():
    from declora.robust import krum_index

    flat = torch.tensor([[0.0], [1.0], [3.0], [6.0], [100.0]])  # m = 5, f = 1: 2 nearest others
    # squared distances' two smallest: 0 -> 1 + 9 = 10; 1 -> 1 + 4 = 5; 2 -> 4 + 9 = 13; 3 -> 9 + 25 = 34
    assert krum_index(flat, f=1) == 1
    # f = 0: 3 nearest: 0 -> 1+9+36 = 46; 1 -> 1+4+25 = 30; 2 -> 4+9+9 = 22; 3 -> 9+25+36 = 70: now node 2
    assert krum_index(flat, f=0) == 2


# the server's clipped rule clips around the coordinate median, not the mean
def test_server_clipped_centres_on_the_weighted_median():
    from declora.robust import server_aggregate

    up = {"a": torch.tensor([[0.0], [1.0], [2.0], [3.0], [1000.0]])}
    w = torch.ones(5)
    out = server_aggregate("clipped", up, w, tau=0.5)["a"]
    # centre = median 2; differences -2, -1, 0, 1, 998 clipped to -0.5, -0.5, 0, 0.5, 0.5 -> mean 0
    torch.testing.assert_close(out, torch.tensor([2.0]), atol=1e-3, rtol=0)  # mean 201.2 without clipping


# TAD-LoRA's T = ceil(c / sqrt(1 - rho)), not round
def test_auto_interval_rounds_up():
    from declora.algorithms.alternating import auto_interval

    assert auto_interval(0.5, 1.0, 20) == 2  # 1.414 -> 2
    assert auto_interval(0.0, 2.2, 20) == 3  # 2.2 -> 3


# quantity_skew's sizes follow Dir(alpha): small alpha skews more than large alpha
def test_quantity_skew_alpha_controls_the_size_spread():
    from declora.config import PartitionConfig
    from declora.partition import partition

    labels = np.arange(2000) % 2

    def spread(alpha):
        cv = []
        for s in range(5):
            sizes = np.array(
                [
                    len(p)
                    for p in partition(
                        labels, 8, PartitionConfig(kind="quantity_skew", alpha=alpha, min_size=1), s
                    )
                ]
            )
            cv.append(sizes.std() / sizes.mean())
        return float(np.mean(cv))

    low, mid, high = spread(0.1), spread(1.0), spread(100.0)
    assert low > 1.5 * mid and mid > 5 * high, (low, mid, high)


# SCAFFOLD's c_i+ = c_i - c + (x - y_i)/(K lr) once c != 0 (round 0 has c = c_i = 0)
def test_scaffold_variates_in_the_second_round(tiny_bert, tiny_data, tmp_path):
    from unit_helpers import round_context, tiny_experiment

    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=scaffold", "train.local_steps=2")
    algo, K = exp.algorithm, exp.cfg.train.local_steps
    for t in range(2):
        plan = algo.plan(t)
        exp.trainer.correction = plan.correction
        active = torch.ones(exp.n, dtype=torch.bool)
        exp.trainer.local_work(active, list(exp.fed.tensors(plan.train)), K, "steps")
        y = {k: v.detach().clone() for k, v in exp.fed.tensors(plan.train).items()}
        c_i, c = {k: v.clone() for k, v in algo.c_i.items()}, {k: v.clone() for k, v in algo.c.items()}
        algo.communicate(round_context(exp, t))
    assert any(float(v.abs().max()) > 0 for v in c.values())  # the second round really has c != 0
    for k in algo.c_i:
        lr = exp.optimizer.node_lrs(k).view(-1, *[1] * (y[k].dim() - 1))
        want = c_i[k] - c[k] + (algo.start[k] - y[k]) / (K * lr)
        torch.testing.assert_close(algo.c_i[k], want, atol=1e-5, rtol=1e-4)


# K-GT's correction after one real round: c_i = sum_j W_ij (d_j - d_i), d = (x - z)/(K lr)
def test_dec_gt_corrections_after_one_round_follow_the_formula(tiny_bert, tiny_data, tmp_path):
    from unit_helpers import round_context, tiny_experiment

    exp = tiny_experiment(
        tiny_bert,
        tiny_data,
        tmp_path,
        "algorithm.name=dec_gt",
        "train.local_steps=3",
        "partition.kind=dirichlet",
        "partition.alpha=0.5",
        "partition.min_size=2",
    )
    algo, K = exp.algorithm, 3
    plan = algo.plan(0)
    exp.trainer.correction = plan.correction
    exp.trainer.local_work(torch.ones(exp.n, dtype=torch.bool), list(exp.fed.tensors(plan.train)), K, "steps")
    z = {k: v.detach().clone() for k, v in exp.fed.tensors(plan.train).items()}
    ctx = round_context(exp, 0)
    algo.communicate(ctx)
    W = ctx.W.double()
    for k, c in algo.c.items():
        lr = exp.optimizer.node_lrs(k).double().view(-1, *[1] * (z[k].dim() - 1))
        d = ((algo.start[k] - z[k]).double() / (K * lr)).flatten(1)  # (n, D)
        want = (W @ d - W.sum(1, keepdim=True) * d).view_as(c)
        torch.testing.assert_close(c.double(), want, atol=1e-4, rtol=1e-4)
        assert float(want.abs().max()) > 1e-3


# Metropolis-Hastings on an irregular graph (on a ring or complete graph it equals max-degree and uniform)
def test_metropolis_hastings_weights_on_an_irregular_graph():
    import networkx as nx

    from declora.topology import max_degree, metropolis_hastings

    g = nx.Graph([(0, 1), (0, 2), (0, 3), (3, 4)])  # degrees 3, 1, 1, 2, 1
    w = metropolis_hastings(g)
    assert w[3, 4] == pytest.approx(1 / 3, abs=1e-12) and w[0, 1] == pytest.approx(1 / 4, abs=1e-12)
    assert w[3, 3] == pytest.approx(1 - 1 / 4 - 1 / 3, abs=1e-12) and w[4, 4] == pytest.approx(
        2 / 3, abs=1e-12
    )
    assert not np.allclose(w, max_degree(g))  # the two rules differ here


# A noise solved from privacy.target_epsilon must hold for the most demanding node
def test_target_epsilon_holds_for_the_most_demanding_of_several_plans():
    from declora.config import PrivacyConfig
    from declora.privacy import epsilon, noise_for, resolve_sigma

    cfg = PrivacyConfig(level="node", target_epsilon=4.0, delta=1e-5)
    plans = [(1.0, 20), (1.0, 60), (0.1, 60)]
    sigma = resolve_sigma(cfg, plans)
    spent = [epsilon(sigma, q, s, cfg.delta) for q, s in plans]
    assert max(spent) <= 4.0 + 1e-6 and max(spent) == pytest.approx(4.0, abs=0.05)
    assert sigma == noise_for(4.0, 1.0, 60, cfg.delta)


# The ledger's per-node numbers: one fp32 gossip of a (5, 3, 4) tensor on a star around node 0
def test_the_ledger_reports_the_mean_and_max_bytes_a_node_sent():
    from declora.comm.exchange import LocalExchange

    n = 5
    W = torch.eye(n) * 0.5
    for j in range(1, n):
        W[0, j] = W[j, 0] = 0.125
    W[0, 0] = 0.5
    ex = LocalExchange(n)
    ex.ledger.start_round()
    ex.gossip({"x": torch.randn(n, 3, 4)}, W, 0)
    summary = ex.ledger.round_summary()
    # the hub sends 48 bytes to each of 4 leaves, each leaf 48 bytes to the hub
    assert summary["bytes_node_max"] == 192 and summary["bytes_node_mean"] == pytest.approx(76.8)
    assert summary["bytes_round"] == summary["bytes_total"] == 384


# DeCAF re-factorizes only the nodes that hear a neighbour: an isolated node keeps factors and moments
def test_decaf_leaves_an_isolated_node_and_its_optimizer_state_alone(tiny_bert, tiny_data, tmp_path):
    from dataclasses import replace

    from unit_helpers import perturb, round_context, tiny_experiment

    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=decaf", "nodes=4")
    perturb(exp, seed=3, same=False)  # each node its own factors, B != 0
    names = list(exp.fed.tensors(("A", "B")))
    for name in names:  # as after a few steps: every node with a count and moments
        exp.optimizer.steps[name].fill_(2)
        for b in exp.optimizer.buffers:
            exp.optimizer.state[b][name].normal_()
    before = {k: v.detach().clone() for k, v in exp.fed.tensors(("A", "B")).items()}
    moments = {(b, k): exp.optimizer.state[b][k].clone() for b in exp.optimizer.buffers for k in names}
    W = torch.full((4, 4), 1 / 3)
    W[3], W[:, 3] = 0.0, 0.0
    W[3, 3] = 1.0  # node 3 hears nobody this round
    exp.algorithm.communicate(replace(round_context(exp, 0), W=W))
    for k in names:
        assert torch.equal(exp.fed.tensors()[k][3], before[k][3])  # its factors as they were
        assert not torch.equal(exp.fed.tensors()[k][0], before[k][0])  # the linked nodes re-factorized
        assert int(exp.optimizer.steps[k][3]) == 2 and (exp.optimizer.steps[k][:3] == 0).all()
        for b in exp.optimizer.buffers:
            assert torch.equal(exp.optimizer.state[b][k][3], moments[(b, k)][3])
            assert (exp.optimizer.state[b][k][:3] == 0).all()


# Under node-level DP a DeCAF node re-factorizes its own released message with its neighbours' (not its
# exact factors), so its new factors are public, and they are the reference of its next message.
def test_private_decaf_refactorizes_each_senders_own_message_and_clips_the_next_against_that(
    tiny_bert, tiny_data, tmp_path
):
    from unit_helpers import perturb, round_context, tiny_experiment

    from declora.algorithms.decaf import product_mix
    from declora.privacy import privatize

    sigma, clip = 0.5, 0.2
    dp = ["privacy.level=node", f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}"]
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=decaf", "model.head=frozen", *dp)
    perturb(exp, seed=3, same=False)  # each node its own factors, far from the initial adapter
    factors = {k: v.detach().clone() for k, v in exp.fed.tensors(("A", "B")).items()}
    initial = {k: exp.exchange.prev[k].clone() for k in factors}
    sent = privatize(factors, initial, clip, sigma * clip, torch.arange(4), exp.cfg.seed, 0)
    ctx = round_context(exp, 0)
    exp.algorithm.communicate(ctx)
    for name in exp.fed.lora:
        a, b = f"{name}.lora_A", f"{name}.lora_B"
        A, B = product_mix(sent[a], sent[b], ctx.W, exp.cfg.algorithm.svd_split)
        got_a, got_b = exp.fed.tensors()[a], exp.fed.tensors()[b]
        torch.testing.assert_close(got_b @ got_a, B @ A, atol=1e-5, rtol=0)
        A0, B0 = product_mix(factors[a], factors[b], ctx.W, exp.cfg.algorithm.svd_split)
        assert not torch.allclose(got_b @ got_a, B0 @ A0, atol=1e-3)  # the exact factors' mix differs
        assert torch.equal(exp.exchange.prev[a], got_a) and torch.equal(exp.exchange.prev[b], got_b)
