"""FSLoRA: sketches (E[S] = I, one index set for B and A), exact sub-adapter training, bytes, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_tensors, crash_after_round, write_tiny_data
from unit_helpers import perturb, round_context, tiny_experiment

from declora import engine
from declora.algorithms.fslora import draw_ratios, sketch_gate, sketch_sizes
from declora.experiment import build_experiment
from declora.lora import NodeRouting, RankMask, StackedLoRALinear

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_data(tmp_path / "tiny.jsonl", rows=32)


def tiny(tiny_bert, tiny_data, tmp_path, *extra):
    return tiny_experiment(
        tiny_bert,
        tiny_data,
        tmp_path,
        "rounds=3",
        "train.local_steps=1",
        "eval.every=1",
        "eval.node_examples=4",
        "checkpoint_every=1",
        "algorithm.name=fslora",
        *extra,
    )


def test_sketch_is_unbiased_per_index():
    sizes, r, rounds = [1, 2, 3, 8], 8, 2000
    gates = torch.stack([sketch_gate(sizes, r, 0, t) for t in range(rounds)]).double()  # (T, n, r)
    assert all(int((gates[t, i] != 0).sum()) == k for t in range(5) for i, k in enumerate(sizes))
    mean, se = gates.mean(0), gates.std(0) / rounds**0.5
    assert ((mean - 1).abs() <= 3 * se + 1e-12).all(), (mean, se)  # E[(r/k) 1[j in I]] = 1


def test_sizes_and_ratio_distributions():
    assert sketch_sizes([1 / 8, 1 / 4, 1 / 2, 1.0], 64) == [8, 16, 32, 64]
    assert sketch_sizes([0.01], 4) == [1]  # at least one component
    with pytest.raises(ValueError, match="sketch_ratios"):
        sketch_sizes([0.0], 4)
    assert set(draw_ratios("uniform", 50, 0)) <= {1 / 8, 1 / 4, 1 / 2}
    assert all(1 / 8 <= x <= 1 / 2 for x in draw_ratios("normal", 50, 0))
    heavy = draw_ratios("heavy_tailed", 50, 0)
    assert min(heavy) == pytest.approx(1 / 8) and max(heavy) == pytest.approx(1 / 2)
    assert sorted(heavy)[25] < 5 / 16  # skewed toward small ratios
    assert draw_ratios("normal", 5, 1) == draw_ratios("normal", 5, 1)


def test_ratios_that_are_not_whole_ranks_are_warned_and_the_sizes_used_are_logged(
    tiny_bert, tiny_data, tmp_path, caplog
):
    with caplog.at_level("WARNING", logger="declora.algorithms.fslora"):
        assert sketch_sizes([0.125, 0.25, 0.3, 0.5], 4) == [1, 1, 1, 2]
    assert "2 of 4 ratios are not a whole number of ranks at model.rank=4" in caplog.text
    assert "node 0: 0.125 x 4 = 0.5 ranks, trains k=1, a ratio of 0.25" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="declora.algorithms.fslora"):
        sketch_sizes([0.25, 0.5], 4)
    assert not caplog.text  # whole ranks: nothing to say
    exp = tiny(tiny_bert, tiny_data, tmp_path, "algorithm.sketch_ratios=[0.125,0.25,0.3,0.5]", "rounds=1")
    engine.run(exp)
    start = json.loads((exp.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["algorithm"] == {"sketch_ranks": [1, 1, 1, 2]}


def test_one_index_set_for_B_and_A_and_a_real_sub_adapter():
    torch.manual_seed(0)
    n, r, d_in, d_out, s = 2, 6, 5, 4, 0.5
    layer = StackedLoRALinear(torch.nn.Linear(d_in, d_out), n, r, s, 0.0, NodeRouting(), torch.randn(r, d_in))
    with torch.no_grad():
        layer.B.normal_()
    layer.rank_mask = RankMask()
    gate = sketch_gate([2, 3], r, seed=0, t=7)
    layer.rank_mask.gate = gate
    x = torch.randn(n, 3, d_in)
    layer.routing.rows = torch.arange(n)
    y = layer(x)
    y.pow(2).sum().backward()
    for i, k in enumerate([2, 3]):
        I = gate[i].nonzero().flatten()
        sub = (r / k) * s * (layer.B[i][:, I] @ layer.A[i][I])  # the rank-k sub-adapter, scale s r / k
        torch.testing.assert_close(y[i], layer.base(x[i]) + x[i] @ sub.T)
        assert set(layer.A.grad[i].abs().sum(1).nonzero().flatten().tolist()) == set(I.tolist())
        assert set(layer.B.grad[i].abs().sum(0).nonzero().flatten().tolist()) == set(I.tolist())


def test_masked_coordinates_never_move_and_bytes_are_exact(tiny_bert, tiny_data, tmp_path):
    ratios = "algorithm.sketch_ratios=[0.25,0.5,0.75,1.0]"
    exp = tiny(tiny_bert, tiny_data, tmp_path, ratios, "model.head=frozen")
    perturb(exp)
    fed, sizes = exp.fed, [1, 2, 3, 4]
    before = {k: v.detach().clone() for k, v in fed.tensors(("A", "B")).items()}
    plan = exp.algorithm.plan(0)
    gate = fed.rank_mask.gate.clone()
    exp.trainer.local_work(plan.active, list(fed.tensors(plan.train)), 2, "steps")
    for k, v in fed.tensors(("A", "B")).items():
        delta = (v.detach() - before[k]).abs()
        per_component = delta.sum(2) if k.endswith("lora_A") else delta.sum(1)  # (n, r)
        assert (per_component[gate == 0] == 0).all(), k  # zero gradient, fresh Adam: never moves
        assert (per_component[gate != 0] > 0).all(), k
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(round_context(exp))
    modules = sum(a.shape[-1] + b.shape[1] for a, b in fed.factors().values())  # sum of (d_in + d_out)
    expected = torch.tensor([4 * k * modules + 4 * k for k in sizes])  # fp32 floats + int32 indices
    assert torch.equal(exp.exchange.ledger.edges.diagonal(), expected)
    assert exp.exchange.ledger.server_sent == int(expected.sum())
    assert fed.rank_mask.gate is None
    server = exp.algorithm.server_tensors(fed)
    for k, v in fed.tensors(("A", "B")).items():
        assert torch.equal(v.detach(), server[k].expand_as(v))  # every node holds the server model


def test_full_ratios_equal_fedavg_with_the_same_server_adamw(tiny_bert, tiny_data, tmp_path):
    ones = "algorithm.sketch_ratios=[1.0,1.0,1.0,1.0]"
    sk = tiny(tiny_bert, tiny_data, tmp_path / "s", ones)
    ref = tiny(tiny_bert, tiny_data, tmp_path / "f", "algorithm.name=fedavg")
    perturb(sk)
    perturb(ref)
    theta0 = {k: v.detach()[0].clone() for k, v in ref.fed.tensors().items()}
    # Reference: FedAvg-LoRA local step, then one torch AdamW step on the averaged delta.
    ref.trainer.local_work(torch.ones(4, dtype=torch.bool), list(ref.fed.tensors()), 1, "steps")
    params = {k: torch.nn.Parameter(theta0[k].clone()) for k in ref.fed.tensors(("A", "B"))}
    opt = torch.optim.AdamW(list(params.values()), lr=0.01, weight_decay=0.0)
    for k, p in params.items():
        p.grad = (theta0[k] - ref.fed.tensors()[k].detach()).mean(0)
    opt.step()
    plan = sk.algorithm.plan(0)
    assert bool(plan.active.all()) and torch.equal(sk.fed.rank_mask.gate, torch.ones(4, 4))
    sk.trainer.local_work(plan.active, list(sk.fed.tensors(plan.train)), 1, "steps")
    for k, v in sk.fed.tensors().items():
        torch.testing.assert_close(v.detach(), ref.fed.tensors()[k].detach(), atol=1e-7, rtol=0)
    sk.algorithm.communicate(round_context(sk))
    for k, v in sk.fed.tensors().items():
        want = params[k].detach() if k in params else ref.fed.tensors()[k].detach().mean(0)  # head: FedAvg
        torch.testing.assert_close(v.detach(), want.expand_as(v), atol=1e-6, rtol=1e-5)


def test_server_state_survives_a_crash_and_resume(tiny_bert, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    extra = ("algorithm.clients_per_round=2", "algorithm.sketch_dist=heavy_tailed")
    full = tiny(tiny_bert, tiny_data, tmp_path / "a", *extra)
    engine.run(full)
    crashed = tiny(tiny_bert, tiny_data, tmp_path / "b", *extra)

    crash_after_round(crashed, 2)  # logged, not yet checkpointed: round 1 is the last checkpoint
    resumed = build_experiment(crashed.cfg, crashed.run_dir)
    engine.run(resumed, resume=True)
    for k, v in full.algorithm.state_dict().items():
        assert torch.equal(v, resumed.algorithm.state_dict()[k]), k
    assert_same_tensors(full, resumed)
    lines = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    accs = [r["acc_server"] for r in lines if r.get("event") == "eval"]
    full_lines = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert accs == [r["acc_server"] for r in full_lines if r.get("event") == "eval"]
    assert all(r["active_nodes"] == 2 for r in lines if r.get("event") == "eval")
    assert full.algorithm.server.opt.steps[next(iter(full.algorithm.server.x))] == 3


def test_topk_error_feedback_resumes_exactly(tiny_bert, tiny_data, tmp_path, monkeypatch):
    # the codec's residuals are checkpointed state: a resume must restore them, bit for bit
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    extra = ("model.head=frozen", "comm.codec=topk", "comm.fraction=0.3", "comm.error_feedback=true")
    full = tiny(tiny_bert, tiny_data, tmp_path / "a", *extra)
    engine.run(full)
    assert any(float(v.abs().max()) > 0 for v in full.exchange.codec.state_dict().values())
    crashed = tiny(tiny_bert, tiny_data, tmp_path / "b", *extra)
    crash_after_round(crashed, 2)
    resumed = build_experiment(crashed.cfg, crashed.run_dir)
    engine.run(resumed, resume=True)
    assert_same_tensors(full, resumed)
    for k, v in full.exchange.codec.state_dict().items():
        assert torch.equal(v, resumed.exchange.codec.state_dict()[k]), k
