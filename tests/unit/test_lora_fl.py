"""Recent LoRA-FL methods: FedEx-LoRA (exact aggregation folded into the shared base), FedSA-LoRA (A shared,
B local), FLoRA (stacked heterogeneous-rank adapters merged into the base)."""

from __future__ import annotations

import pytest
import torch
from unit_helpers import perturb, round_context, tiny_experiment

from declora.algorithms.fedex_lora import exact_residual
from declora.algorithms.flora import stack_adapters
from declora.config import ConfigError, load_config

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _train_and_snapshot(exp):
    plan = exp.algorithm.plan(0)
    active = torch.ones(exp.n, dtype=torch.bool) if plan.active is None else plan.active
    exp.trainer.local_work(active, list(exp.fed.tensors(plan.train)), 2, "steps")
    return {k: v.detach().clone() for k, v in exp.fed.tensors().items()}


def test_exact_residual_completes_the_product_mean():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, 5, generator=g), torch.randn(3, 4, 2, generator=g)
    p = torch.tensor([0.5, 0.0, 0.5])
    A_mean, B_mean, R = exact_residual(A, B, p)
    want = 0.5 * (B[0] @ A[0] + B[2] @ A[2])
    assert torch.allclose(B_mean @ A_mean + R, want, atol=1e-6)
    assert R.abs().max() > 1e-3  # the mean of the factors alone is not the mean of the products


def test_fedex_round_is_exact(tiny_bert, tiny_data, tmp_path):
    exp = tiny_experiment(
        tiny_bert, tiny_data, tmp_path, "algorithm.name=fedex_lora", "partition.kind=quantity_skew"
    )
    perturb(exp, same=False)
    base0 = {k: v.base.weight.detach().clone() for k, v in exp.fed.lora.items()}
    before = _train_and_snapshot(exp)
    exp.algorithm.communicate(round_context(exp))
    s = exp.fed.scale
    for name, layer in exp.fed.lora.items():
        A, B = before[f"{name}.lora_A"], before[f"{name}.lora_B"]
        target = base0[name] + s * torch.einsum("nor,nri->oi", B, A) / exp.n  # uniform weights
        for i in range(exp.n):  # every node now runs exactly the mean of the nodes' products
            ours = layer.base.weight + s * layer.B[i].detach() @ layer.A[i].detach()
            torch.testing.assert_close(ours, target, atol=1e-6, rtol=0)
    state = exp.algorithm.state_dict()  # the folded base weights are the checkpointed state
    assert all(not torch.equal(state[f"base/{k}"], w) for k, w in base0.items())


def test_fedex_refuses_an_export():
    with pytest.raises(ConfigError, match="export=none"):
        load_config(None, ["algorithm.name=fedex_lora"])
    with pytest.raises(ConfigError, match="server.optimizer=adam"):
        load_config(None, ["algorithm.name=fedex_lora", "export=none", "server.optimizer=adam"])


def test_fedsa_shares_A_and_keeps_B(tiny_bert, tiny_data, tmp_path):
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=fedsa_lora", "export=none")
    perturb(exp, same=False)
    before = _train_and_snapshot(exp)
    exp.algorithm.communicate(round_context(exp))
    for k, v in exp.fed.tensors().items():
        if exp.fed.kind_of(k) == "A":
            torch.testing.assert_close(v.detach(), before[k].mean(0).expand_as(v), atol=1e-6, rtol=0)
        else:  # B and the head stay on their node
            assert torch.equal(v.detach(), before[k]), k
    assert exp.algorithm.server_tensors(exp.fed) is None


def test_flora_stack_is_the_sum_of_the_clients_products():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 4, generator=g)
    gate = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])  # ranks 1, 4, 2
    p = torch.tensor([0.2, 0.5, 0.3])
    A_s, B_s = stack_adapters(A, B, gate, p)
    assert A_s.shape == (7, 6) and B_s.shape == (5, 7)
    want = sum(p[i] * (B[i] * gate[i]) @ A[i] for i in range(3))
    assert torch.allclose(B_s @ A_s, want, atol=1e-6)


def test_flora_round_merges_the_stack_and_restarts_the_adapter(tiny_bert, tiny_data, tmp_path):
    exp = tiny_experiment(
        tiny_bert, tiny_data, tmp_path, "algorithm.name=flora", "export=none", "algorithm.ranks=[1,2,4,3]"
    )
    perturb(exp, same=False)
    exp.algorithm = type(exp.algorithm)(exp.fed, cfg=exp.cfg, schedule=exp.schedule)
    base0 = {k: v.base.weight.detach().clone() for k, v in exp.fed.lora.items()}
    before = _train_and_snapshot(exp)
    gate = exp.fed.rank_mask.gate
    exp.algorithm.communicate(round_context(exp))
    for name, layer in exp.fed.lora.items():
        A, B = before[f"{name}.lora_A"], before[f"{name}.lora_B"] * gate[:, None, :]
        want = base0[name] + exp.fed.scale * torch.einsum("nor,nri->oi", B, A) / exp.n
        torch.testing.assert_close(layer.base.weight, want, atol=1e-6, rtol=0)
        assert layer.B.abs().sum() == 0 and bool((layer.A[0] == layer.A).all())  # fresh, shared
        assert not torch.equal(layer.A[0], before[f"{name}.lora_A"][0])
