"""Robust server rules over partial uploads and over products (declora.robust_uploads), on raw tensors:
over full uploads they are the whole-upload rules; a coordinate's rule sees only the nodes that sent it;
nothing to cut is an exact zero correction; an outlier is cut."""

from __future__ import annotations

import pytest
import torch

from declora.config import RobustConfig
from declora.robust import trimmed_cut, trimmed_mean, weighted_median
from declora.robust_uploads import (
    krum_weights,
    masked_median,
    masked_trimmed_mean,
    mean_product,
    product_aggregate,
    slice_mask,
    upload_aggregate,
)

pytestmark = pytest.mark.unit


def _values(k: int = 5, d: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(k, d, generator=g), torch.rand(k, generator=g) + 0.1


def test_over_full_uploads_the_masked_rules_are_the_whole_upload_rules():
    v, w = _values()
    every = torch.ones_like(v, dtype=torch.bool)
    assert torch.equal(masked_median(v, w, every), weighted_median(v, w))
    plain = (w[:, None] * v).sum(0)
    assert torch.equal(masked_trimmed_mean(v, w, every, 0.25, plain), trimmed_mean(v, w, 1))


def test_a_coordinate_s_rule_sees_only_the_nodes_that_sent_it():
    # coordinate 0: nodes 0 and 1 sent 1.0 and 3.0, node 2 did not (its decoded value is 0)
    # coordinate 1: all three sent; node 2 is an outlier
    v = torch.tensor([[1.0, 1.0], [3.0, 2.0], [0.0, 100.0]])
    sent = torch.tensor([[True, True], [True, True], [False, True]])
    w = torch.full((3,), 1 / 3)
    assert masked_median(v, w, sent).tolist() == [1.0, 2.0]
    plain = {
        "x": (w[:, None] * v).sum(0)
    }  # the padded mean the method computes: (1/|S|) sum of what was sent
    median = upload_aggregate(RobustConfig("median"), {"x": v}, w, plain, {"x": sent})["x"]
    assert torch.allclose(median, torch.tensor([2 / 3 * 1.0, 1.0 * 2.0]))  # P_c times the median over U_c
    trimmed = upload_aggregate(RobustConfig("trimmed_mean", trim=0.34), {"x": v}, w, plain, {"x": sent})["x"]
    assert torch.allclose(trimmed, torch.tensor([4 / 3, 2.0]))  # 2 senders: nothing cut; 3: both tails
    assert trimmed[0] == plain["x"][0]  # a coordinate with nothing cut keeps the method's own mean exactly


def test_nothing_to_cut_returns_the_methods_own_aggregate_exactly():
    v, w = _values(6, 9)
    w = w / w.sum()
    keep = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    x = torch.randn(6, 3, 3)  # a rank axis of 3 on dim 1
    masks = {"x": slice_mask(keep, x, 1)}
    x = x * masks["x"]
    plain = {"x": torch.einsum("n,n...->...", w, x)}
    for cfg in (RobustConfig("trimmed_mean", trim=0.0), RobustConfig("clipped", clip_radius=float("inf"))):
        got = upload_aggregate(cfg, {"x": x}, w, plain, masks)["x"]
        assert got.shape == (3, 3) and torch.equal(got, plain["x"])
    A, B = torch.randn(6, 3, 5), torch.randn(6, 4, 3)
    wide = RobustConfig("clipped", clip_radius=float("inf"))
    assert product_aggregate(wide, A, B, keep.float(), w, mean_product(A, B, keep.float(), w)) is None


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "clipped"])
def test_a_huge_or_infinite_upload_adds_no_rounding(rule):
    # five senders of one coordinate: 0, 1, 2, 3 and an attacker; every rule gives 2 (clipped: the
    # median centre 2, each difference clipped to 0.5, and an infinite one, with no direction, dropped)
    cfg = RobustConfig(rule, trim=0.2, clip_radius=0.5)
    w = torch.full((5,), 0.2)
    for bad, want in ((1e9, 2.0), (float("inf"), 2.0 - (0.1 if rule == "clipped" else 0.0))):
        v = torch.tensor([[0.0], [1.0], [2.0], [3.0], [bad]])
        got = upload_aggregate(cfg, {"x": v}, w, {"x": (w[:, None] * v).sum(0)})["x"]
        assert got.item() == pytest.approx(want, abs=1e-6), (bad, got)
    A = torch.tensor([[[0.0]], [[1.0]], [[2.0]], [[3.0]], [[1e9]]])  # products B_i A_i with B_i = 1
    B = torch.ones(5, 1, 1)
    robust = product_aggregate(cfg, A, B, None, w, mean_product(A, B, None, w))
    assert robust is not None and robust.item() == pytest.approx(2.0, abs=1e-6)


def test_clipping_bounds_an_outlier_and_krum_leaves_it_out():
    v = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)) * 0.1
    v[3] += 50.0  # node 3's upload is far from everyone's
    w = torch.full((5,), 0.2)
    plain = (w[:, None] * v).sum(0)
    clipped = upload_aggregate(RobustConfig("clipped", clip_radius=0.5), {"x": v}, w, {"x": plain})["x"]
    centre = weighted_median(v, w)
    assert float((clipped - centre).norm()) <= 0.5 + 1e-5 and float((plain - centre).norm()) > 10
    d = v - centre  # the rule exactly: centre + sum_i w_i min(1, tau / ||d_i||) d_i
    want = centre + (w[:, None] * (0.5 / d.norm(dim=1)).clamp(max=1)[:, None] * d).sum(0)
    torch.testing.assert_close(clipped, want, atol=1e-5, rtol=0)
    chosen = krum_weights({"x": v}, w, 1)
    assert chosen.sum() == 1 and chosen[3] == 0


@pytest.mark.parametrize("k", [2, 8, 10, 20, 30, 50])
def test_the_masked_median_of_full_uploads_is_the_server_rules_median(k):
    """With every entry sent, the median over each coordinate's senders is the server rule's weighted
    median, the lower middle value for an even count, whatever the weights' rounding (equal weights
    1/k summed in float32 reached half one sender early or late, depending on k)."""
    g = torch.Generator().manual_seed(k)
    values = torch.randn(k, 7, generator=g)
    full = torch.ones(k, 7, dtype=torch.bool)
    for w in (torch.full((k,), 1.0 / k), torch.rand(k, generator=g)):
        assert torch.equal(masked_median(values, w, full), weighted_median(values, w)), w
    ranks = torch.arange(k, dtype=torch.float32)[:, None].expand(k, 7)
    assert masked_median(ranks, torch.full((k,), 1.0 / k), full).tolist() == [float((k - 1) // 2)] * 7


@pytest.mark.parametrize("trim", [0.1, 0.145, 0.2, 0.29, 0.3, 0.45])
def test_the_masked_trimmed_mean_cuts_what_the_server_rule_cuts(trim):
    """floor(trim x senders) values of each tail, the server rule's count, for every count of senders up
    to 300 (0.145 of 200 and 0.29 of 100 once cut 29 here and 28 there: float32 against float64)."""
    assert (trimmed_cut(200, 0.145), trimmed_cut(100, 0.29)) == (29, 29)  # exact, not 28.99999...
    for k in range(1, 301):
        values = torch.arange(k, dtype=torch.float64)[:, None] ** 2  # skewed: each cut has its own mean
        w, full = torch.full((k,), 1.0 / k), torch.ones(k, 1, dtype=torch.bool)  # weights sum to 1
        got = masked_trimmed_mean(values, w, full, trim, values.mean(0))
        b = trimmed_cut(k, trim)
        torch.testing.assert_close(got, values[b : k - b].mean(0), rtol=1e-6, atol=0, msg=f"k={k}")
