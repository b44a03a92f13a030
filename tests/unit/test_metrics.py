"""Gram-based consensus metrics against a dense float64 reference
(docs/algorithms.md: conventions, cross-term)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from declora.metrics import (
    consensus_metrics,
    cross_term_norm,
    factor_disagreement,
    mean_std,
    product_disagreement,
)

pytestmark = pytest.mark.unit

N, R, D_IN, D_OUT = 5, 3, 7, 6


def _factors(seed: int, n: int = N, r: int = R, d_in: int = D_IN, d_out: int = D_OUT):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)
    return A, B


# Dense reference: forms every product, which the library never does.
def _dense_factor(X: torch.Tensor) -> float:
    X = X.double()
    return float((X - X.mean(0)).square().sum()) / X.shape[0]


def _dense_product(A: torch.Tensor, B: torch.Tensor, s: float) -> float:
    P = s * B.double() @ A.double()  # (n, d_out, d_in)
    return float((P - P.mean(0)).square().sum()) / P.shape[0]


def _dense_cross(A: torch.Tensor, B: torch.Tensor, s: float) -> float:
    A, B = A.double(), B.double()
    return float(torch.linalg.norm(s * (B @ A).mean(0) - s * B.mean(0) @ A.mean(0)))


def _close(got: float, want: float, rel: float = 1e-9) -> bool:
    return got == pytest.approx(want, rel=rel, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_matches_dense_reference(seed: int, scale: float) -> None:
    A, B = _factors(seed)
    assert _close(factor_disagreement(A), _dense_factor(A))
    assert _close(factor_disagreement(B), _dense_factor(B))
    assert _close(product_disagreement(A, B, scale), _dense_product(A, B, scale))
    assert _close(cross_term_norm(A, B, scale), _dense_cross(A, B, scale))


def test_float32_inputs_are_accumulated_in_float64() -> None:
    A, B = _factors(5)
    got = product_disagreement(A.float(), B.float(), 2.0)
    assert _close(got, _dense_product(A.float(), B.float(), 2.0), rel=1e-9)


def test_consensus_metrics_sums_layers_and_combines_cross_terms() -> None:
    layers = {"q": _factors(10), "v": _factors(11, d_in=4, d_out=9)}
    s = 0.5
    got = consensus_metrics(layers, s)
    assert set(got) == {"consensus_A", "consensus_B", "consensus_BA", "cross_term"}
    assert _close(got["consensus_A"], sum(_dense_factor(A) for A, _ in layers.values()))
    assert _close(got["consensus_B"], sum(_dense_factor(B) for _, B in layers.values()))
    assert _close(got["consensus_BA"], sum(_dense_product(A, B, s) for A, B in layers.values()))
    cross = sum(_dense_cross(A, B, s) ** 2 for A, B in layers.values()) ** 0.5
    assert _close(got["cross_term"], cross)
    assert all(isinstance(v, float) for v in got.values())


def test_all_equal_factors_give_zero() -> None:
    A, B = _factors(3, n=1)
    A, B = A.expand(N, -1, -1), B.expand(N, -1, -1)
    got = consensus_metrics({"layer": (A, B)}, 1.0)
    # Zero up to the rounding of a float64 mean (the factors are O(1), so O(1e-16) per entry at most).
    assert set(got) == {"consensus_A", "consensus_B", "consensus_BA", "cross_term"}
    assert all(0.0 <= v < 1e-25 for v in got.values()), got


@pytest.mark.parametrize("shared", ["A", "B"])
def test_cross_term_vanishes_when_one_factor_agrees(shared: str) -> None:
    # see cross-term: mean(BA) − mean(B)mean(A) = mean((B−B̄)(A−Ā)) is zero when either factor is common.
    A, B = _factors(4)
    if shared == "A":
        A = A[:1].expand_as(A).clone()
    else:
        B = B[:1].expand_as(B).clone()
    assert cross_term_norm(A, B, 3.0) < 1e-14
    assert _dense_cross(A, B, 3.0) < 1e-12
    assert _close(product_disagreement(A, B, 3.0), _dense_product(A, B, 3.0))


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_equals_unchunked(chunk: int) -> None:
    A, B = _factors(6, n=7)
    layers = {"layer": (A, B)}
    assert consensus_metrics(layers, 0.8, chunk=chunk) == pytest.approx(
        consensus_metrics(layers, 0.8, chunk=100), rel=1e-12
    )
    assert _close(product_disagreement(A, B, 0.8, chunk=chunk), _dense_product(A, B, 0.8))
    assert _close(cross_term_norm(A, B, 0.8, chunk=chunk), _dense_cross(A, B, 0.8))


def test_online_mask_restricts_to_selected_nodes() -> None:
    A, B = _factors(7, n=6)
    online = torch.tensor([True, False, True, True, False, True])
    got = consensus_metrics({"layer": (A, B)}, 1.5, online, chunk=2)
    sub_A, sub_B = A[online], B[online]
    assert _close(got["consensus_A"], _dense_factor(sub_A))
    assert _close(got["consensus_B"], _dense_factor(sub_B))
    assert _close(got["consensus_BA"], _dense_product(sub_A, sub_B, 1.5))
    assert _close(got["cross_term"], _dense_cross(sub_A, sub_B, 1.5))
    assert got != consensus_metrics({"layer": (A, B)}, 1.5)


def test_single_online_node_agrees_with_itself() -> None:
    A, B = _factors(8)
    online = torch.zeros(N, dtype=torch.bool)
    online[2] = True
    assert consensus_metrics({"layer": (A, B)}, 1.0, online) == {
        "consensus_A": 0.0,
        "consensus_B": 0.0,
        "consensus_BA": 0.0,
        "cross_term": 0.0,
    }


def test_bad_inputs_name_the_problem() -> None:
    A, B = _factors(9)
    with pytest.raises(ValueError, match="selects no node"):
        consensus_metrics({"layer": (A, B)}, 1.0, torch.zeros(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        factor_disagreement(A, online=torch.ones(N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="disagree on"):
        product_disagreement(A, B[:, :, :2], 1.0)
    with pytest.raises(ValueError, match="chunk"):
        factor_disagreement(A, chunk=-1)


def test_small_disagreement_is_resolved_without_cancellation() -> None:
    # Near consensus the products are large and their spread tiny; the centred Gram form keeps it accurate.
    A, B = _factors(12)
    dA, dB = _factors(13)
    A, B = A[:1] + 1e-6 * dA, B[:1] + 1e-6 * dB
    assert _close(product_disagreement(A, B, 1.0), _dense_product(A, B, 1.0), rel=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any torch operation returns inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


def test_large_layer_runs_without_dense_products() -> None:
    # d = 4096: a dense product per node would be 64 x 4096 x 4096 float64 = 8.6 GB. No operation may
    # return even one node's d_out x d_in product; the factors themselves are 64 x 8 x 4096.
    A = torch.randn(64, 8, 4096) * 0.01
    B = torch.randn(64, 4096, 8) * 0.01
    with LargestTensor() as seen:
        got = consensus_metrics({"layer": (A, B)}, 2.0)
    assert all(v > 0 for v in got.values())
    assert 0 < seen.numel < 4096 * 4096, seen.numel
    with LargestTensor() as dense:  # the yardstick sees a product when one is formed
        B[0] @ A[0]
    assert dense.numel == 4096 * 4096


def test_mean_std_is_population_std() -> None:
    mean, std = mean_std(torch.tensor([0.5, 0.7, 0.9, 0.9]))
    assert mean == pytest.approx(0.75)
    assert std == pytest.approx(((0.25**2 + 0.05**2 + 0.15**2 * 2) / 4) ** 0.5)
    assert mean_std(torch.tensor([0.8])) == (pytest.approx(0.8), 0.0)
    with pytest.raises(ValueError):
        mean_std(torch.tensor([]))


def test_factors_that_require_grad_are_fine() -> None:
    A, B = (t.requires_grad_() for t in _factors(14))
    got = consensus_metrics({"layer": (A, B)}, 1.0)
    assert _close(got["consensus_BA"], _dense_product(A.detach(), B.detach(), 1.0))


def test_head_disagreement_is_the_spread_of_weight_and_bias() -> None:
    from declora.metrics import head_disagreement

    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(5, 2, 7, generator=g), torch.randn(5, 2, generator=g)
    got = head_disagreement({"classifier.weight": weight, "classifier.bias": bias})
    want = sum(float(((v.double() - v.double().mean(0)) ** 2).sum()) / 5 for v in (weight, bias))
    assert got == pytest.approx(want, rel=1e-9)
    assert head_disagreement({"w": weight[:1].expand(5, 2, 7)}) == 0.0


def test_gated_factors_drop_closed_components_and_fold_the_multiplier_into_b() -> None:
    from declora.metrics import gated

    g = torch.Generator().manual_seed(6)
    A, B = torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 4, generator=g)
    gate = torch.tensor([[1.0, 1, 0, 0], [2.0, 0, 1, 1], [1.0, 1, 1, 1]])
    Ag, Bg = gated(A, B, gate)
    for i in range(3):
        torch.testing.assert_close(Bg[i] @ Ag[i], B[i] @ torch.diag(gate[i]) @ A[i])
    assert Ag[0, 2:].abs().sum() == 0 and Bg[0, :, 2:].abs().sum() == 0
    assert gated(A, B, None) == (A, B)
