"""FedProx and SCAFFOLD (client-side corrections) and the per-node learning-rate schedule across rounds."""

from __future__ import annotations

import math

import pytest
import torch
from unit_helpers import round_context, tiny_experiment

from declora import engine
from declora.algorithms.fedprox import proximal_pull
from declora.config import ConfigError, load_config
from declora.lr_schedule import multiplier
from declora.optim import NodeAdamW

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread", "no_report")]


def _run(tiny_bert, tiny_data, folder, *extra):
    exp = tiny_experiment(tiny_bert, tiny_data, folder, "train.local_steps=2", "eval.every=100", *extra)
    engine.run(exp)
    return exp


def _tensors(exp):
    return {k: v.detach().clone() for k, v in exp.fed.tensors().items()}


def _hand_round(exp, t, mu=None):
    """Round ``t`` driven here: the algorithm's plan, train.local_steps local steps, then its communication.
    With ``mu``, the gradients get ``proximal_pull`` towards a snapshot of the tensors taken here at the
    round's start, in place of the plan's own correction. Returns the tensors after the local work."""
    plan = exp.algorithm.plan(t)
    start = _tensors(exp)
    exp.trainer.correction = (
        plan.correction if mu is None else lambda params: proximal_pull(params, start, mu)
    )
    active = plan.active if plan.active is not None else torch.ones(exp.n, dtype=torch.bool)
    exp.trainer.local_work(active, list(exp.fed.tensors(plan.train)), exp.cfg.train.local_steps, "steps")
    trained = _tensors(exp)
    exp.algorithm.communicate(round_context(exp, t))
    return trained


def _assert_pull_is_by_hand(tiny_bert, tiny_data, folder, plain, prox):
    """Two rounds of ``prox`` at mu=1 train exactly as ``plain`` (the same seed) whose gradients get
    mu (theta - theta_start) added by hand, theta_start each node's tensors where its round begins: not
    zeros, not the first round's start, not the nodes' mean. The same operations on the same numbers:
    bit for bit."""
    steps = "train.local_steps=2"
    ref = tiny_experiment(tiny_bert, tiny_data, folder / "ref", f"algorithm.name={plain}", steps)
    got = tiny_experiment(
        tiny_bert, tiny_data, folder / "got", f"algorithm.name={prox}", "algorithm.mu=1", steps
    )
    for t in range(2):  # the second round starts where the first one's communication left each node
        want, have = _hand_round(ref, t, mu=1.0), _hand_round(got, t)
        assert all(torch.equal(want[k], have[k]) for k in want), f"round {t}"


def test_proximal_pull_adds_mu_times_the_distance_to_the_anchor():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 2, 4, generator=g))
    anchor = torch.randn(3, 2, 4, generator=g)
    p.grad = torch.ones_like(p)
    proximal_pull({"w": p}, {"w": anchor}, 0.5)
    assert torch.allclose(p.grad, 1 + 0.5 * (p.detach() - anchor))


def test_fedprox_with_mu_zero_is_fedavg(tiny_bert, tiny_data, tmp_path):
    avg = _run(tiny_bert, tiny_data, tmp_path / "a", "algorithm.name=fedavg", "rounds=2")
    prox = _run(tiny_bert, tiny_data, tmp_path / "p", "algorithm.name=fedprox", "algorithm.mu=0", "rounds=2")
    pulled = _run(
        tiny_bert, tiny_data, tmp_path / "q", "algorithm.name=fedprox", "algorithm.mu=1", "rounds=2"
    )
    a, p, q = _tensors(avg), _tensors(prox), _tensors(pulled)
    assert all(torch.equal(a[k], p[k]) for k in a)
    assert not all(torch.equal(a[k], q[k]) for k in a)  # mu > 0 changes local training
    _assert_pull_is_by_hand(tiny_bert, tiny_data, tmp_path / "h", "fedavg", "fedprox")


def test_dec_prox_with_mu_zero_is_dec_lora(tiny_bert, tiny_data, tmp_path):
    gossip = _run(tiny_bert, tiny_data, tmp_path / "g", "algorithm.name=dec_lora", "rounds=2")
    prox, pulled = (
        _run(tiny_bert, tiny_data, tmp_path / mu, "algorithm.name=dec_prox", f"algorithm.mu={mu}", "rounds=2")
        for mu in ("0", "1")
    )
    a, p, q = _tensors(gossip), _tensors(prox), _tensors(pulled)
    assert all(torch.equal(a[k], p[k]) for k in a)
    assert not all(torch.equal(a[k], q[k]) for k in a)
    _assert_pull_is_by_hand(tiny_bert, tiny_data, tmp_path / "h", "dec_lora", "dec_prox")


def test_scaffold_round_zero_is_fedavg(tiny_bert, tiny_data, tmp_path):
    extra = ("rounds=1", "server.fraction=0.5")
    avg = _run(tiny_bert, tiny_data, tmp_path / "a", "algorithm.name=fedavg", *extra)
    sc = _run(tiny_bert, tiny_data, tmp_path / "s", "algorithm.name=scaffold", *extra)
    a, s = _tensors(avg), _tensors(sc)
    assert all(torch.equal(a[k], s[k]) for k in a)  # zero variates: FedAvg's first round exactly


def test_scaffold_variates_after_a_round(tiny_bert, tiny_data, tmp_path):
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=scaffold", "server.fraction=0.5")
    algo, lr, steps = exp.algorithm, exp.cfg.train.lr, exp.cfg.train.local_steps
    x0 = _tensors(exp)  # the round's start, taken here and not from the algorithm's own snapshot
    plan = algo.plan(0)
    exp.trainer.correction = plan.correction
    exp.trainer.local_work(plan.active, list(exp.fed.tensors(plan.train)), steps, "steps")
    y = _tensors(exp)
    algo.communicate(round_context(exp, 0))
    sampled = plan.active
    for k, c_i in algo.c_i.items():
        assert c_i[~sampled].abs().sum() == 0  # nodes that sat out keep c_i = 0
        want = (x0[k] - y[k]) / (steps * lr)  # option II with c = c_i = 0
        torch.testing.assert_close(c_i[sampled], want[sampled], atol=1e-5, rtol=1e-4)
        # c <- c + (|S| / N) mean_S Delta c_i = (1 / N) sum_S c_i
        torch.testing.assert_close(algo.c[k][0], c_i.sum(0) / exp.n, atol=1e-6, rtol=1e-5)
    assert max(float(c_i[sampled].abs().max()) for c_i in algo.c_i.values()) > 1e-3  # training moved them
    grads = {k: torch.nn.Parameter(v.clone()) for k, v in y.items()}
    for p in grads.values():
        p.grad = torch.zeros_like(p)
    algo.correct(grads)
    for k, p in grads.items():  # the local correction is c - c_i
        assert torch.equal(p.grad, algo.c[k] - algo.c_i[k])


def test_scaffold_second_round_differs_from_fedavg(tiny_bert, tiny_data, tmp_path):
    avg = _run(tiny_bert, tiny_data, tmp_path / "a", "algorithm.name=fedavg", "rounds=2")
    sc = _run(tiny_bert, tiny_data, tmp_path / "s", "algorithm.name=scaffold", "rounds=2")
    a, s = _tensors(avg), _tensors(sc)
    assert not all(torch.equal(a[k], s[k]) for k in a)  # the variates now steer local training


def test_scaffold_needs_local_steps():
    with pytest.raises(ConfigError, match="train.local_unit"):
        load_config(None, ["algorithm.name=scaffold", "train.local_unit=epochs"])
    with pytest.raises(ConfigError, match="algorithm.mu"):
        load_config(None, ["algorithm.mu=-1"])


# ---------------------------------------------------------------- learning rate across rounds


def test_schedule_shapes():
    k = torch.arange(7)
    assert torch.allclose(multiplier("constant", k, 0, 6), torch.ones(7))
    warm = multiplier("cosine", k, 2, 6)  # warm-up 1/2, 1; then cosine over the 4 remaining rounds
    want = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    assert torch.allclose(warm, torch.tensor(want), atol=1e-6)
    assert torch.allclose(multiplier("linear", k, 2, 6), torch.tensor([0.5, 1, 1, 0.75, 0.5, 0.25, 0]))
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(None, ["train.schedule=step"])
    with pytest.raises(ConfigError, match="train.warmup_rounds"):
        load_config(None, ["rounds=3", "train.warmup_rounds=4"])


def test_per_node_lr_scale_is_a_per_node_learning_rate():
    g = torch.Generator().manual_seed(0)
    x, grads = torch.randn(2, 3, generator=g), [torch.randn(2, 3, generator=g) for _ in range(3)]
    scaled = {"w": torch.nn.Parameter(x.clone())}
    opt = NodeAdamW(scaled, {"w": 0.1}, weight_decay=0.01)
    opt.lr_scale = torch.tensor([1.0, 0.5])
    singles = [{"w": torch.nn.Parameter(x[i : i + 1].clone())} for i in range(2)]
    refs = [NodeAdamW(s, {"w": lr}, weight_decay=0.01) for s, lr in zip(singles, (0.1, 0.05), strict=True)]
    for grad in grads:
        scaled["w"].grad = grad.clone()
        opt.step(torch.ones(2, dtype=torch.bool), ["w"])
        for i, (s, ref) in enumerate(zip(singles, refs, strict=True)):
            s["w"].grad = grad[i : i + 1].clone()
            ref.step(torch.ones(1, dtype=torch.bool), ["w"])
    for i in range(2):
        torch.testing.assert_close(scaled["w"].detach()[i], singles[i]["w"].detach()[0], atol=1e-7, rtol=1e-6)


def test_schedule_counts_each_nodes_rounds(tiny_bert, tiny_data, tmp_path):
    exp = _run(
        tiny_bert,
        tiny_data,
        tmp_path,
        "algorithm.name=fedavg",
        "rounds=3",
        "server.fraction=0.5",
        "train.schedule=cosine",
        "train.warmup_rounds=1",
    )
    assert int(exp.lr_schedule.progress.sum()) == 3 * 2  # two of four nodes train each round
    # each node's count is the rounds in which it trained, and its multiplier the schedule's at that count
    trained = sum(exp.algorithm.plan(t).active.long() for t in range(3))
    assert exp.lr_schedule.progress.tolist() == trained.tolist()
    torch.testing.assert_close(exp.lr_schedule.scale(), multiplier("cosine", trained, 1, 3))
    constant = tiny_experiment(tiny_bert, tiny_data, tmp_path / "c")
    assert constant.lr_schedule.scale() is None  # no schedule: the optimizer is untouched
