"""Every registered algorithm on the tiny BERT: invariants of one round, and 3-round runs on three graphs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import write_tiny_data

from declora import engine
from declora.algorithms import ALGORITHMS, FOLDS_INTO_BASE, SERVER_MODEL
from declora.algorithms.base import RoundContext
from declora.config import load_config
from declora.experiment import build_experiment
from declora.model import as_run, averaged_factors, fold_middle
from declora.train import pad

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """48 short labelled texts as a .jsonl file (loading the shipped corpus costs more than a tiny run)."""
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.jsonl", 48)


def tiny(tiny_bert, tiny_data, tmp_path, *extra):
    return build_experiment(
        load_config(
            None,
            [
                f"model.name={tiny_bert}",
                f"data.dataset={tiny_data}",
                "model.rank=2",
                "model.max_length=16",
                "nodes=4",
                "rounds=3",
                "train.batch_size=4",
                "train.local_steps=1",
                "eval.every=3",
                "eval.node_examples=8",
                "checkpoint_every=3",
                "export=consensus",
                "algorithm.switch_interval=1",
                "threads=1",
                f"run_dir={tmp_path / 'run'}",
                *extra,
            ],
        )
    )


def _consensus_logits(exp, input_ids, mask):
    """declora's logits of the consensus model its evaluation scores: the mean of the adapters the nodes
    run (Fed-SB's R folded into B, rank gates into the factors), every row on that one model."""
    fed = exp.fed
    gate = None if fed.rank_mask.gate is None else fed.rank_mask.gate.detach()
    running = as_run(fed, fold_middle({k: v.detach() for k, v in fed.tensors().items()}), gate)
    rows = torch.zeros(len(input_ids), dtype=torch.long)
    with torch.no_grad(), fed.override(averaged_factors(running)), fed.route(rows):
        return fed(input_ids, mask)


def _context(exp, t=0):
    n = exp.n
    ones = torch.ones(n, dtype=torch.bool)
    return RoundContext(t, exp.fed, exp.schedule.matrix(t), ones, exp.exchange, exp.optimizer, torch.ones(n))


def _perturb(exp, kinds=("A", "B", "head")):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in exp.fed.tensors(kinds).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _snapshot(exp, kinds=("A", "B", "head")):
    return {k: v.detach().clone() for k, v in exp.fed.tensors(kinds).items()}


@pytest.mark.parametrize("name", ["adf_lora", "tad_lora"])
def test_alternating_trains_one_factor_everywhere_and_mixes_both(name, tiny_bert, tiny_data, tmp_path):
    exp = tiny(tiny_bert, tiny_data, tmp_path, f"algorithm.name={name}", "topology.graph=complete")
    _perturb(exp, ("A",))  # B = 0 at init would make grad_A zero: give the A phase something to do
    all_nodes = torch.ones(exp.n, dtype=torch.bool)
    for t in range(3):  # T = 1: phases B, A, B
        plan = exp.algorithm.plan(t)
        phase = exp.algorithm.clock.phase(t)
        frozen = {"A": "B", "B": "A"}[phase]
        assert plan.active is None and phase in plan.train and frozen not in plan.train  # one global phase
        before, steps = _snapshot(exp, (frozen,)), {k: v.clone() for k, v in exp.optimizer.steps.items()}
        exp.trainer.local_work(all_nodes, list(exp.fed.tensors(plan.train)), 1, "steps")
        for k, v in exp.fed.tensors((frozen,)).items():
            assert v.grad is None and torch.equal(v.detach(), before[k]), k  # no gradient, no change
            assert torch.equal(exp.optimizer.steps[k], steps[k]), k  # no optimizer step
        for k in exp.fed.tensors((phase,)):
            assert torch.equal(exp.optimizer.steps[k], steps[k] + 1), k
        exp.algorithm.communicate(_context(exp, t))  # complete graph, W = 11^T/n: exact consensus
        for v in exp.fed.tensors(("A", "B")).values():
            torch.testing.assert_close(v.detach(), v.detach()[:1].expand_as(v), atol=1e-6, rtol=0)
        # optimizer_policy=reset: the factor that opens the next phase starts with fresh moments
        assert all(int(exp.optimizer.steps[k].sum()) == 0 for k in exp.fed.tensors((frozen,)))


def test_rolora_dfl_mixes_only_the_active_factor(tiny_bert, tiny_data, tmp_path):
    exp = tiny(tiny_bert, tiny_data, tmp_path, "algorithm.name=rolora_dfl", "topology.graph=complete")
    _perturb(exp, ("A", "B"))
    exp.algorithm.communicate(_context(exp, 0))  # phase B
    for v in exp.fed.tensors(("B",)).values():
        torch.testing.assert_close(v.detach(), v.detach()[:1].expand_as(v), atol=1e-6, rtol=0)
    assert all(not torch.equal(v.detach()[0], v.detach()[1]) for v in exp.fed.tensors(("A",)).values())


@pytest.mark.parametrize("name", ["dlora_fa", "ffa_lora"])
def test_frozen_A_never_changes(name, tiny_bert, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
    exp = tiny(tiny_bert, tiny_data, tmp_path, f"algorithm.name={name}", "rounds=2", "train.local_steps=2")
    before = _snapshot(exp)
    engine.run(exp)
    after = _snapshot(exp)
    assert all(torch.equal(after[k], before[k]) for k in exp.fed.tensors(("A",)))
    assert any(not torch.equal(after[k], before[k]) for k in exp.fed.tensors(("B",)))


def test_ffa_aggregation_of_the_product_is_exact(tiny_bert, tiny_data, tmp_path):
    exp = tiny(tiny_bert, tiny_data, tmp_path, "algorithm.name=ffa_lora")
    _perturb(exp, ("B", "head"))
    mean_products = {name: (B @ A).mean(0) for name, (A, B) in exp.fed.factors().items()}
    exp.algorithm.communicate(_context(exp))
    server = exp.algorithm.server_tensors(exp.fed)
    for name, product in mean_products.items():
        got = server[f"{name}.lora_B"][0] @ server[f"{name}.lora_A"][0]
        torch.testing.assert_close(got, product, atol=1e-6, rtol=1e-5)


def test_decaf_round_matches_tsvd_of_the_mean_product_and_counts_factor_bytes(tiny_bert, tiny_data, tmp_path):
    exp = tiny(tiny_bert, tiny_data, tmp_path, "algorithm.name=decaf", "topology.graph=complete")
    _perturb(exp, ("A", "B"))
    r = exp.fed.cfg.rank
    targets = {}
    for name, (A, B) in exp.fed.factors().items():
        U, S, Vh = torch.linalg.svd((B.double() @ A.double()).mean(0))
        targets[name] = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    exp.optimizer.steps = {k: v + 1 for k, v in exp.optimizer.steps.items()}
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(_context(exp))
    for name, (A, B) in exp.fed.factors().items():
        for i in range(exp.n):
            torch.testing.assert_close((B[i] @ A[i]).double(), targets[name], atol=1e-5, rtol=1e-4)
    per_node = sum(v[0].numel() * 4 for v in exp.fed.tensors().values())  # fp32 A, B and head
    assert exp.exchange.ledger.round_summary()["bytes_round"] == exp.n * (exp.n - 1) * per_node
    assert all(int(exp.optimizer.steps[k].sum()) == 0 for k in exp.fed.tensors(("A", "B")))


@pytest.mark.parametrize("graph", ["ring", "complete", "star"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_and_exports(name, graph, tiny_bert, tiny_data, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)  # the report has its own tests
    no_export = ("export=none",) if name in FOLDS_INTO_BASE else ()  # the base holds the aggregate
    exp = tiny(
        tiny_bert, tiny_data, tmp_path, f"algorithm.name={name}", f"topology.graph={graph}", *no_export
    )
    records = engine.run(exp)
    assert len(records) == 3 and all(math.isfinite(r["train_loss"]) for r in records)
    assert math.isfinite(records[-1]["acc_node_mean"])
    assert ("acc_server" in records[-1]) == (name in SERVER_MODEL)  # the registry config checks against
    silent = name in ("local", "centralized")
    assert (records[-1]["bytes_total"] == 0) if silent else (records[-1]["bytes_total"] > 0)
    if no_export:
        return
    # The exported consensus folder, loaded by stock PEFT, gives declora's consensus logits on the held-out
    # rows and so the accuracy the run reported for it (a folder of wrong, missing or zero tensors would not).
    folder = exp.run_dir / "adapters" / "consensus"
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    input_ids, mask = pad(exp.consensus_eval.token_ids, exp.pad_id)
    with torch.no_grad():
        theirs = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, _consensus_logits(exp, input_ids, mask), atol=1e-5, rtol=0)
    labels = torch.as_tensor(exp.consensus_eval.labels)
    reported = records[-1]["acc_avg_factors"]
    assert float((theirs.argmax(-1) == labels).float().mean()) == pytest.approx(reported, abs=1e-6)
