"""Per-node rank gates (lora.RankMask), their PEFT export, HetLoRA, FlexLoRA and the config checks."""

from __future__ import annotations

import pytest
import torch
from unit_helpers import perturb, round_context, tiny_experiment

from declora.algorithms.flexlora import flex_aggregate
from declora.config import ConfigError, ModelConfig, load_config
from declora.lora import NodeRouting, RankMask, StackedLoRALinear
from declora.model import build_federation, node_adapter
from declora.peft_io import export_peft

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def tiny(tiny_bert, tiny_data, tmp_path, *extra):
    return tiny_experiment(
        tiny_bert,
        tiny_data,
        tmp_path,
        "model.head=frozen",
        "partition.kind=quantity_skew",
        "algorithm.ranks=[1,2,4,3]",
        *extra,
    )


def _effective(fed):
    """Each node's gated factors: B_i diag(gate_i), A_i."""
    gate = fed.rank_mask.gate
    return {n: (A.clone(), B * gate[:, None, :]) for n, (A, B) in fed.factors().items()}


def test_gate_of_ones_is_the_ungated_layer_and_zero_components_get_no_gradient():
    torch.manual_seed(0)
    layer = StackedLoRALinear(torch.nn.Linear(5, 4), 2, 3, 0.7, 0.0, NodeRouting(), torch.randn(3, 5))
    with torch.no_grad():
        layer.B.normal_()
    layer.routing.rows = torch.tensor([1, 0, 1])
    x = torch.randn(3, 2, 5)
    plain = layer(x)
    layer.rank_mask = RankMask()
    layer.rank_mask.gate = torch.ones(2, 3)
    assert torch.equal(layer(x), plain)
    layer.rank_mask.gate = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    layer(x).sum().backward()
    assert layer.A.grad[0, 1].abs().sum() == 0 and layer.B.grad[0, :, 1].abs().sum() == 0
    assert layer.A.grad[1, 2].abs().sum() == 0 and layer.B.grad[1, :, 2].abs().sum() == 0
    assert layer.A.grad[0, 0].abs().sum() > 0 and layer.B.grad[1, :, 1].abs().sum() > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_masked_node_exports_as_a_rank_k_peft_adapter(tiny_bert, tmp_path, rslora):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    fed = build_federation(
        ModelConfig(name=str(tiny_bert), rank=4, alpha=8, rslora=rslora), n=3, num_labels=2
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fed.tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    fed.rank_mask.gate = torch.tensor([[1.0, 1, 1, 1], [2.0, 0, 2, 0], [1.0, 0, 0, 0]])
    ids = torch.randint(1000, 2000, (2, 9), generator=g)
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    for node, rank in ((1, 2), (2, 1)):
        with torch.no_grad(), fed.route(torch.full((2,), node)):
            ours = fed(ids, torch.ones_like(ids))
        single = node_adapter(fed, stacked, node)
        assert all(v.shape[1] == rank for k, v in single.items() if k.endswith("lora_A"))
        folder = export_peft(fed, single, tmp_path / f"node{node}")
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_flexlora_aggregate_is_the_rank_ri_truncation_of_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    n, r, d_in, d_out, ranks = 3, 4, 7, 6, [1, 2, 4]
    A, B = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    gate = (torch.arange(r)[None] < torch.tensor(ranks)[:, None]).float()
    p = torch.tensor([1.0, 2.0, 3.0]) / 6
    M = sum(p[i] * (B[i] * gate[i]) @ A[i] for i in range(n)).double()
    A_new, B_new = flex_aggregate(A, B, gate, p, r)
    U, S, Vh = torch.linalg.svd(M)
    for i, k in enumerate(ranks):
        want = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        torch.testing.assert_close(((B_new * gate[i]) @ A_new).double(), want, atol=1e-5, rtol=1e-5)


def test_flexlora_round_gives_every_node_its_truncation_and_counts_bytes(tiny_bert, tiny_data, tmp_path):
    exp = tiny(tiny_bert, tiny_data, tmp_path, "algorithm.name=flexlora")
    perturb(exp, same=False)
    ctx = round_context(exp)
    p = ctx.data_sizes.double() / ctx.data_sizes.sum()
    means = {
        k: sum(p[i] * B[i].double() @ A[i].double() for i in range(4))
        for k, (A, B) in _effective(exp.fed).items()
    }
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(ctx)
    for k, (A, B) in _effective(exp.fed).items():
        U, S, Vh = torch.linalg.svd(means[k])
        for i, rank in enumerate([1, 2, 4, 3]):
            want = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
            torch.testing.assert_close((B[i] @ A[i]).double(), want, atol=1e-6, rtol=1e-5)
    modules = sum(a.shape[-1] + b.shape[1] for a, b in exp.fed.factors().values())
    assert exp.exchange.ledger.edges.diagonal().tolist() == [4 * k * modules for k in [1, 2, 4, 3]]


def test_hetlora_keeps_components_beyond_ri_zero_and_steps_the_server(tiny_bert, tiny_data, tmp_path):
    exp = tiny(tiny_bert, tiny_data, tmp_path, "algorithm.name=hetlora")
    perturb(exp)
    fed, ranks = exp.fed, [1, 2, 4, 3]
    theta0 = {k: v.detach()[0].clone() for k, v in fed.tensors(("A", "B")).items()}
    plan = exp.algorithm.plan(0)
    exp.trainer.local_work(torch.ones(4, dtype=torch.bool), list(fed.tensors(plan.train)), 2, "steps")
    for _, B in _effective(fed).values():
        for i, k in enumerate(ranks):
            assert B[i, :, k:].abs().sum() == 0  # nothing beyond r_i in node i's effective adapter
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    assert [
        node_adapter(fed, stacked, i)[next(iter(fed.factors())) + ".lora_A"].shape[1] for i in range(4)
    ] == ranks
    keep = (torch.arange(4)[None] < torch.tensor(ranks)[:, None]).float()  # (n, r)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in theta0.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=0.01, weight_decay=0.0)
    for k, v in params.items():  # zero-padded mean of the deltas, divisor |S|
        delta = theta0[k] - fed.tensors()[k].detach()
        v.grad = (delta * (keep[:, :, None] if k.endswith("lora_A") else keep[:, None, :])).mean(0)
    opt.step()
    exp.exchange.ledger.start_round()
    exp.algorithm.communicate(round_context(exp))
    for k, v in fed.tensors(("A", "B")).items():
        torch.testing.assert_close(v.detach(), params[k].detach().expand_as(v), atol=1e-6, rtol=1e-5)
    modules = sum(a.shape[-1] + b.shape[1] for a, b in fed.factors().values())
    assert exp.exchange.ledger.edges.diagonal().tolist() == [4 * k * modules for k in ranks]  # no indices


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.ranks=[1,2,9,3]", "model.rank=4"),
        ("algorithm.ranks=[1,2]", "one each"),
        ("algorithm.sketch_ratios=[0.5,0.0,1.0,1.0]", "(0, 1]"),
        ("algorithm.sketch_ratios=[0.5,1.5,1.0,1.0]", "(0, 1]"),
        ("algorithm.clients_per_round=5", "clients_per_round"),
        ("algorithm.sketch_dist=pareto", "sketch_dist"),
        ("algorithm.server_lr=0", "server_lr"),
    ],
)
def test_config_rejects_bad_heterogeneous_settings(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        load_config(None, ["nodes=4", "model.rank=4", override])


@pytest.mark.parametrize(("ranks", "disagree"), [("[1,2,4,3]", True), ("[4,4,4,4]", False)])
def test_consensus_metrics_read_the_gated_factors_the_nodes_run(
    tiny_bert, tiny_data, tmp_path, ranks, disagree
):
    """Same stored factors on every node (a HetLoRA broadcast): only different ranks make them disagree."""
    from declora.evaluate import evaluate

    exp = tiny_experiment(
        tiny_bert,
        tiny_data,
        tmp_path,
        "model.head=frozen",
        "algorithm.name=hetlora",
        f"algorithm.ranks={ranks}",
        "eval.node_examples=8",
        "data.test_limit=8",
    )
    perturb(exp)  # every node holds the same A and B != 0
    out = evaluate(exp)
    effective = exp.fed.factors() if exp.fed.rank_mask.gate is None else _effective(exp.fed)
    want = (
        sum(
            float(
                sum(((B[i] @ A[i] - sum(B[j] @ A[j] for j in range(4)) / 4) ** 2).sum() for i in range(4)) / 4
            )
            for A, B in effective.values()
        )
        * exp.fed.scale**2
    )
    assert out["consensus_BA"] == pytest.approx(want, rel=1e-4, abs=1e-12)
    assert (out["consensus_BA"] > 1e-6) == disagree and (out["consensus_B"] > 1e-6) == disagree
    assert out["consensus_head"] == 0.0  # a frozen head: every node reads the same one
