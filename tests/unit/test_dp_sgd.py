"""Example-level DP-SGD in the batched pass: one node's clipped, noised gradient from the stacked
forward/backward equals a reference computed example by example (noise off: to rounding; noise on: the
same seeded draw)."""

from __future__ import annotations

import pytest
import torch

from declora.config import ModelConfig, PrivacyConfig
from declora.model import build_federation
from declora.privacy import ExampleDP, PrivacyAccount, gaussian_noise
from declora.train import CLASSIFY, Rows, accumulate_gradients

pytestmark = pytest.mark.unit
NODES, CLIP, SEED = 3, 0.05, 4


@pytest.fixture(params=["bert", "albert_shared_layer"])
def fed(request, tiny_bert, one_thread):
    torch.manual_seed(0)
    model = tiny_bert if request.param == "bert" else request.getfixturevalue("tiny_albert")
    f = build_federation(ModelConfig(name=str(model), rank=4, max_length=32), NODES, 2)
    f.routing.product = "per_row"
    with torch.no_grad():  # B = 0 at init would make A's gradient zero: give every factor a value
        for p in f.tensors().values():
            p.add_(0.1 * torch.randn(p.shape))
    return f


def _rows() -> Rows:
    g = torch.Generator().manual_seed(1)
    sizes = (3, 4, 2)  # every node's batch
    ids = [torch.randint(1000, 2000, (5 + k % 7,), generator=g).tolist() for k in range(sum(sizes))]
    nodes = torch.cat([torch.full((b,), i) for i, b in enumerate(sizes)])
    weights = torch.cat([torch.full((b,), 1.0 / b) for b in sizes])
    return Rows(ids, torch.randint(0, 2, (sum(sizes),), generator=g), nodes, weights)


def _dp(sigma: float) -> ExampleDP:
    account = PrivacyAccount(PrivacyConfig(level="example", noise_multiplier=sigma), sigma, torch.ones(NODES))
    return ExampleDP(CLIP, account, torch.arange(NODES), SEED)


def _batched(fed, rows: Rows, sigma: float) -> dict[str, torch.Tensor]:
    params = fed.tensors()
    for p in params.values():
        p.grad = None
        p.requires_grad_(True)
    dp = _dp(sigma)
    accumulate_gradients(fed, rows, 0, tokens_per_chunk=24, task=CLASSIFY, dp=dp)  # several micro-batches
    dp.add_noise(params, list(params), torch.ones(NODES, dtype=torch.bool), torch.bincount(rows.nodes))
    assert dp.account.steps.tolist() == [1] * NODES
    return {k: p.grad.clone() for k, p in params.items()}


def _reference(fed, rows: Rows, node: int, sigma: float) -> dict[str, torch.Tensor]:
    """Node ``node``'s DP-SGD gradient, one example at a time: clip each, sum, add noise, divide by b."""
    params = fed.tensors()
    mine = (rows.nodes == node).nonzero().flatten().tolist()
    total = {k: torch.zeros_like(p[node]) for k, p in params.items()}
    for k in mine:
        for p in params.values():
            p.grad = None
        one = Rows([rows.ids[k]], rows.labels[k : k + 1], rows.nodes[k : k + 1], torch.ones(1))
        accumulate_gradients(fed, one, 0, tokens_per_chunk=10_000)  # plain backward of one example
        g = {name: p.grad[node] for name, p in params.items()}
        norm = torch.sqrt(sum(v.double().square().sum() for v in g.values()))
        coef = min(1.0, CLIP / float(norm))
        for name in total:
            total[name] += coef * g[name]
    std = sigma * CLIP
    out = {}
    for name, t in total.items():
        noise = gaussian_noise(t.shape, std, "privacy", "example", node, 0, name, seed=SEED) if std else 0
        out[name] = (t + noise) / len(mine)
    return out


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_one_nodes_clipped_noised_gradient_equals_the_example_by_example_reference(fed, sigma):
    rows = _rows()
    batched = _batched(fed, rows, sigma)
    for node in range(NODES):
        ref = _reference(fed, rows, node, sigma)
        for name, expected in ref.items():
            torch.testing.assert_close(batched[name][node], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_clipping_binds_on_these_examples(fed):
    """The test above would hold trivially if no example were clipped: here every one is."""
    rows = _rows()
    params = fed.tensors()
    for p in params.values():
        p.grad = None
    one = Rows([rows.ids[0]], rows.labels[:1], rows.nodes[:1], torch.ones(1))
    accumulate_gradients(fed, one, 0, tokens_per_chunk=10_000)
    norm = torch.sqrt(sum(p.grad[0].double().square().sum() for p in params.values()))
    assert norm > 2 * CLIP
