"""The round loop on a tiny random BERT: mixing invariants, bytes, resume == uninterrupted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_tensors, crash_after_round

from declora.algorithms.base import RoundContext
from declora.comm.exchange import LocalExchange
from declora.config import load_config
from declora.engine import MEASURED, run
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration


def tiny_config(tiny_bert, tmp_path, *extra):
    return load_config(
        None,
        [
            f"model.name={tiny_bert}",
            "model.rank=4",
            "model.max_length=32",
            "nodes=4",
            "rounds=3",
            "data.train_limit=96",
            "data.test_limit=24",
            "train.batch_size=4",
            "train.local_steps=2",
            "eval.every=1",
            "eval.node_examples=12",
            "checkpoint_every=1",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def _context(exp, W):
    n = exp.n
    return RoundContext(
        0, exp.fed, W, torch.ones(n, dtype=torch.bool), exp.exchange, exp.optimizer, torch.ones(n)
    )


def _perturb(exp):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in exp.fed.tensors().values():
            p.add_(torch.randn(p.shape, generator=g))


def test_complete_uniform_mix_gives_every_node_the_exact_mean(tiny_bert, tmp_path):
    exp = build_experiment(tiny_config(tiny_bert, tmp_path, "topology.graph=complete"))
    _perturb(exp)
    before = {k: v.detach().clone() for k, v in exp.fed.tensors().items()}
    exp.algorithm.communicate(_context(exp, exp.schedule.matrix(0)))
    for k, v in exp.fed.tensors().items():
        torch.testing.assert_close(
            v.detach(), before[k].mean(0, keepdim=True).expand_as(v), atol=1e-6, rtol=0
        )


def test_ring_bytes_are_counted_per_edge(tiny_bert, tmp_path):
    exp = build_experiment(tiny_config(tiny_bert, tmp_path))
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(_context(exp, exp.schedule.matrix(0)))
    per_node = sum(v[0].numel() * 4 for v in exp.fed.tensors().values())  # fp32 A, B and head
    summary = exp.exchange.ledger.round_summary()
    assert summary["bytes_round"] == 4 * 2 * per_node  # 4 nodes, 2 neighbours each
    assert exp.exchange.ledger.edges[0, 2] == 0 and exp.exchange.ledger.edges[0, 1] == per_node


def test_local_only_never_touches_other_nodes(tiny_bert, tmp_path):
    exp = build_experiment(tiny_config(tiny_bert, tmp_path, "algorithm.name=local"))
    before = {k: v.detach().clone() for k, v in exp.fed.tensors().items()}
    active = torch.tensor([True, False, False, False])
    exp.trainer.local_work(active, list(exp.fed.tensors()), 2, "steps")
    trained = {k: v.detach().clone() for k, v in exp.fed.tensors().items()}
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(_context(exp, exp.schedule.matrix(0)))  # the run's ring: mixing would move them
    after = exp.fed.tensors()
    assert any(not torch.equal(after[k].detach()[0], before[k][0]) for k in before)
    for k in before:
        assert torch.equal(after[k].detach()[1:], before[k][1:])
        assert torch.equal(after[k].detach(), trained[k])  # node 0 keeps what it trained, unmixed
    assert exp.exchange.ledger.round_summary()["bytes_round"] == 0


def test_fedavg_server_bytes(tiny_bert, tmp_path):
    exp = build_experiment(tiny_config(tiny_bert, tmp_path, "algorithm.name=fedavg"))
    _perturb(exp)
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(_context(exp, exp.schedule.matrix(0)))
    per_node = sum(v[0].numel() * 4 for v in exp.fed.tensors().values())
    summary = exp.exchange.ledger.round_summary()
    assert summary["bytes_server_round"] == 4 * per_node and summary["bytes_round"] == 8 * per_node


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in records]


PRIVATE_ROBUST = (
    "privacy.level=node",
    "privacy.noise_multiplier=0.7",
    "privacy.clip=0.5",
    "attack.kind=gaussian",
)
PRIVATE_ROBUST += ("attack.nodes=[1]", "robust.aggregator=clipped", "robust.clip_radius=0.3")
DP_SGD = ("privacy.level=example", "privacy.noise_multiplier=1.0", "privacy.clip=0.5")


@pytest.mark.parametrize(
    "extra",
    [
        ("model.dropout=0.1",),
        ("comm.codec=topk", "comm.fraction=0.2"),
        PRIVATE_ROBUST,
        DP_SGD,
        ("algorithm.name=flexlora", "algorithm.ranks=[1,2,4,3]", *PRIVATE_ROBUST),  # masked uploads
        ("algorithm.name=fedavg", *PRIVATE_ROBUST[:3]),  # the server model the uploads are clipped against
        ("train.optimizer=sgd", "train.lr=0.1", "train.nesterov=true"),  # the momentum buffers resume
    ],
    ids=["dropout", "choco", "private_robust", "dp_sgd", "flexlora_private_robust", "fedavg_private", "sgd"],
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_bert, tmp_path, extra):
    full = build_experiment(tiny_config(tiny_bert, tmp_path / "a", *extra))
    run(full)

    crashed = build_experiment(tiny_config(tiny_bert, tmp_path / "b", *extra))

    crash_after_round(crashed, 2)  # after round 2 is logged, before its checkpoint: round 1 is the last
    resumed = build_experiment(crashed.cfg, crashed.run_dir)
    run(resumed, resume=True)

    def lines(exp):
        return [json.loads(x) for x in (exp.run_dir / "metrics.jsonl").read_text().splitlines()]

    evals_full = [r for r in lines(full) if r["event"] == "eval"]
    evals_resumed = [r for r in lines(resumed) if r["event"] == "eval"]
    assert [r["round"] for r in evals_resumed] == [1, 2, 3]
    assert _comparable(evals_resumed) == _comparable(evals_full)
    assert_same_tensors(full, resumed)


def test_exchange_complete_graph_mean_on_raw_tensors():
    x = torch.randn(5, 3, 4)
    out = LocalExchange(5).gossip({"x": x}, torch.full((5, 5), 0.2, dtype=torch.float64), 0)["x"]
    torch.testing.assert_close(out, x.mean(0, keepdim=True).expand_as(x), atol=1e-6, rtol=0)


def test_a_max_length_that_cuts_many_texts_is_warned_about_with_the_counts(tiny_bert, tmp_path, caplog):
    with caplog.at_level("INFO", logger="declora.experiment"):
        exp = build_experiment(tiny_config(tiny_bert, tmp_path, "model.max_length=8"))
    cut = [r for r in caplog.records if "model.max_length=8 cuts" in r.getMessage()]
    assert len(cut) == 1 and cut[0].levelname == "WARNING"
    n_train = sum(len(p) for p in exp.parts)
    assert f"of {n_train} training and" in cut[0].getMessage()
    assert all(len(ids) <= 8 for ids in exp.consensus_eval.token_ids)
    caplog.clear()
    with caplog.at_level("INFO", logger="declora.experiment"):
        build_experiment(tiny_config(tiny_bert, tmp_path / "roomy", "model.max_length=128"))
    assert "cuts" not in caplog.text  # every review fits: nothing to say
