"""Fed-SB: R between frozen shared B and A. Averaging R is averaging the adapters exactly; the per-row and
grouped products agree; a node's adapter with R folded into B loads in stock PEFT with the same logits."""

from __future__ import annotations

import pytest
import torch

from declora.config import ModelConfig
from declora.model import add_middle_factors, averaged_factors, build_federation, fold_middle, node_slice
from declora.peft_io import export_peft

pytestmark = pytest.mark.unit


def _fed(tiny_bert, n=3):
    fed = build_federation(ModelConfig(name=str(tiny_bert), rank=4, alpha=8), n=n, num_labels=2)
    add_middle_factors(fed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fed.tensors(("R",)).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # (n, r, r): a different R on every node
    return fed


def _batch(n_rows, seq=12):
    ids = torch.randint(1000, 2000, (n_rows, seq), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_middle_factor_starts_at_the_base_with_shared_frozen_factors(tiny_bert):
    fed = build_federation(ModelConfig(name=str(tiny_bert), rank=4), n=3, num_labels=2)
    add_middle_factors(fed)
    for layer in fed.lora.values():
        assert layer.R.shape == (3, 4, 4) and layer.R.abs().sum() == 0
        assert layer.B.abs().sum() > 0 and torch.equal(layer.B[0], layer.B[2])
    assert {fed.kind_of(k) for k in fed.tensors(("R",))} == {"R"}


def test_mean_of_the_adapters_is_the_adapter_of_the_mean_r(tiny_bert):
    fed = _fed(tiny_bert, n=4)
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    mean_r = fold_middle(averaged_factors(stacked))  # B mean(R), A
    for name, layer in fed.lora.items():
        per_node = torch.einsum("nor,nrs,nsi->noi", layer.B.detach(), layer.R.detach(), layer.A.detach())
        ours = mean_r[f"{name}.lora_B"][0] @ mean_r[f"{name}.lora_A"][0]  # (d_out, d_in)
        torch.testing.assert_close(ours, per_node.mean(0), atol=1e-6, rtol=0)


def test_per_row_and_grouped_products_agree_with_r(tiny_bert):
    fed = _fed(tiny_bert)
    ids, mask = _batch(6)
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    results = []
    for product in ("per_row", "grouped"):
        fed.routing.product = product
        for p in fed.tensors().values():
            p.grad = None
        with fed.route(rows):
            out = fed(ids, mask)
        out.square().sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in fed.tensors(("R",)).items()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for k, grad in results[0][1].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, results[1][1][k], atol=1e-5, rtol=1e-4)


def test_node_adapter_with_r_folded_into_b_loads_in_peft(tiny_bert, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    fed = _fed(tiny_bert)
    ids, mask = _batch(4)
    node = 1
    with torch.no_grad(), fed.route(torch.full((4,), node)):
        ours = fed(ids, mask)
    stacked = fold_middle({k: v.detach() for k, v in fed.tensors().items()})
    assert not any(k.endswith(".lora_R") for k in stacked)
    folder = export_peft(fed, node_slice(stacked, node), tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    plain = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2).eval()
    with torch.no_grad():  # R moved the model away from the base: the parity is not vacuous
        assert not torch.allclose(ours, plain(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
