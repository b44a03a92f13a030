"""Node-stacked LoRA: PEFT parity, batched == one node at a time, per-node AdamW semantics."""

from __future__ import annotations

import pytest
import torch

from declora.config import ModelConfig
from declora.lora import gather_rows
from declora.model import build_federation, node_slice
from declora.optim import NodeAdamW, clip_per_node
from declora.peft_io import export_peft
from declora.train import LocalTrainer, NodeStreams, label_prior_offsets

pytestmark = pytest.mark.unit


def _randomize(fed, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fed.tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _batch(n_rows: int, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n_rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded row
    return ids, mask


def test_every_node_starts_identical_at_the_base(tiny_bert):
    fed = build_federation(ModelConfig(name=str(tiny_bert), rank=4), n=3, num_labels=2)
    for layer in fed.lora.values():
        assert torch.equal(layer.A[0], layer.A[1]) and torch.equal(layer.A[1], layer.A[2])
        assert layer.B.abs().sum() == 0
    ids, mask = _batch(3)
    ids, mask = ids[1:2].expand(3, -1), mask[1:2].expand(3, -1)  # one review, read by each node
    with torch.no_grad(), fed.route(torch.arange(3)):
        out = fed(ids, mask)
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[1], out[2], atol=1e-6)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_one_node_forward_equals_peft(tiny_bert, tmp_path, rslora):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = ModelConfig(name=str(tiny_bert), rank=4, alpha=8, rslora=rslora)
    fed = build_federation(cfg, n=3, num_labels=2)
    _randomize(fed)
    ids, mask = _batch(4)
    node = 2
    with torch.no_grad(), fed.route(torch.full((4,), node)):
        ours = fed(ids, mask)
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    folder = export_peft(fed, node_slice(stacked, node), tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_gathered_rows_accumulate_the_same_gradient_as_plain_indexing():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(5, 3, 2))
    ref = torch.nn.Parameter(ours.detach().clone())
    for rows in (torch.tensor([4, 0, 4, 2]), torch.tensor([1, 4])):  # two micro-batches, repeated rows
        weights = torch.randn(len(rows), 3, 2)
        (gather_rows(ours, rows) * weights).sum().backward()
        (ref[rows] * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-6, rtol=0)
    assert ours.grad[3].abs().sum() == 0  # a node with no rows gets a zero gradient row


def test_gathered_rows_of_a_frozen_tensor_get_no_gradient():
    frozen = torch.nn.Parameter(torch.randn(3, 2), requires_grad=False)
    x = torch.randn(2, 2, requires_grad=True)
    (gather_rows(frozen, torch.tensor([0, 2])) * x).sum().backward()
    assert frozen.grad is None and x.grad is not None


def test_inactive_node_keeps_parameters_and_moments():
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = NodeAdamW({"x": p}, {"x": 0.1})
    p.grad = torch.ones(3, 4)
    opt.step(torch.tensor([True, False, True]), ["x"])
    assert torch.equal(p.detach()[1], torch.ones(4))
    assert opt.state["exp_avg"]["x"][1].abs().sum() == 0 and opt.steps["x"].tolist() == [1, 0, 1]
    assert not torch.equal(p.detach()[0], torch.ones(4))


def test_clipping_uses_each_nodes_own_norm():
    g1 = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5 (with g2 = 0)
    g2 = torch.zeros(2, 1)
    norms = clip_per_node([g1, g2], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(g1[0].norm(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(g1[1], torch.tensor([0.3, 0.4]))  # under the limit: untouched


def _trainer(tiny_bert, n, parts, token_ids, labels, chunk, start=None, tau=0.0):
    cfg = ModelConfig(name=str(tiny_bert), rank=4, alpha=8)
    fed = build_federation(cfg, n=n, num_labels=2)
    _randomize(fed, seed=3)
    if start is not None:  # every node's starting point, e.g. one node of a batched run
        with torch.no_grad():
            for k, v in fed.tensors().items():
                v.copy_(start[k])
    opt = NodeAdamW(dict(fed.tensors()), {k: 1e-2 for k in fed.tensors()})
    streams = NodeStreams(parts, batch_size=4, seed=0)
    offsets = label_prior_offsets(parts, labels, 2, tau) if tau else None
    return fed, LocalTrainer(
        fed, opt, streams, token_ids, labels, pad_id=0, max_grad_norm=1.0, tokens_per_chunk=chunk,
        logit_offsets=offsets,
    )  # fmt: skip


@pytest.mark.parametrize("tau", [0.0, 1.0])  # 1: each node's loss shifted by its own label prior
def test_batched_training_equals_each_node_alone(tiny_bert, tau):
    import numpy as np

    g = np.random.default_rng(0)
    token_ids = [list(g.integers(1000, 3000, size=int(g.integers(3, 20)))) for _ in range(40)]
    labels = g.integers(0, 2, size=40)
    labels[10:25] = 1  # node 1 saw one label only: its offsets differ most from the others'
    parts = [np.arange(0, 10), np.arange(10, 25), np.arange(25, 40)]
    fed, trainer = _trainer(tiny_bert, 3, parts, token_ids, labels, chunk=64, tau=tau)
    start = {k: v.detach().clone() for k, v in fed.tensors().items()}
    names = list(fed.tensors())
    trainer.local_work(torch.ones(3, dtype=torch.bool), names, amount=3, unit="steps")
    for node in range(3):
        solo_fed, solo = _trainer(
            tiny_bert,
            1,
            [parts[node]],
            token_ids,
            labels,
            chunk=10_000,
            start=node_slice(start, node),
            tau=tau,
        )
        # node `node` of the batched run drew from stream (seed, node); make the solo run do the same
        solo.streams.next_batch = _shifted(solo.streams, node)  # type: ignore[method-assign]
        solo.local_work(torch.ones(1, dtype=torch.bool), list(solo_fed.tensors()), amount=3, unit="steps")
        for k, v in solo_fed.tensors().items():
            torch.testing.assert_close(fed.tensors()[k].detach()[node], v.detach()[0], atol=1e-5, rtol=0)


def _shifted(streams: NodeStreams, node: int):
    ref = NodeStreams([streams.parts[0]] * (node + 1), streams.batch_size, streams.seed)
    return lambda _i: ref.next_batch(node)


def test_epochs_give_nodes_with_more_data_more_steps(tiny_bert):
    import numpy as np

    token_ids = [[1000 + i, 1001 + i] for i in range(30)]
    labels = np.arange(30) % 2
    parts = [np.arange(0, 6), np.arange(6, 30)]  # 2 and 6 batches of 4 per epoch
    fed, trainer = _trainer(tiny_bert, 2, parts, token_ids, labels, chunk=512)
    trainer.local_work(torch.ones(2, dtype=torch.bool), list(fed.tensors()), amount=1, unit="epochs")
    steps = trainer.optimizer.steps[next(iter(fed.tensors()))]
    assert steps.tolist() == [2, 6]


def test_averaged_product_adapter_is_the_exact_mean_of_node_products(tiny_bert):
    from declora.model import averaged_factors, averaged_product

    fed = build_federation(ModelConfig(name=str(tiny_bert), rank=4, alpha=8), n=3, num_labels=2)
    _randomize(fed)
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    ids, mask = _batch(2)
    rows = torch.zeros(2, dtype=torch.long)
    with torch.no_grad(), fed.route(rows), fed.override(averaged_product(stacked)):
        product = fed(ids, mask)
    with torch.no_grad(), fed.route(rows), fed.override(averaged_factors(stacked)):
        factors = fed(ids, mask)
    # Reference: fold s * mean_i B_i A_i densely into a copy of each base weight, B = 0 otherwise.
    dense = {k: v.clone() for k, v in averaged_factors(stacked).items()}
    with torch.no_grad():
        for name, layer in fed.lora.items():
            delta = fed.scale * torch.einsum("nor,nri->oi", layer.B, layer.A) / fed.n
            layer.base.weight += delta
            dense[f"{name}.lora_B"] = torch.zeros_like(dense[f"{name}.lora_B"])
        with fed.route(rows), fed.override(dense):
            reference = fed(ids, mask)
    torch.testing.assert_close(product, reference, atol=1e-5, rtol=0)
    assert (factors - reference).abs().max() > 1e-4  # the cross-term makes them differ
