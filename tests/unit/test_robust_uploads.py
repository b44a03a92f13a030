"""Robust server rules over partial uploads and over products (declora.robust_uploads), on raw tensors:
over full uploads they are the whole-upload rules; a coordinate's rule sees only the nodes that sent it;
nothing to cut is an exact zero correction; an outlier is cut."""

from __future__ import annotations

import pytest
import torch

from declora.config import RobustConfig
from declora.robust import trimmed_mean, weighted_median
from declora.robust_uploads import (
    krum_weights,
    masked_median,
    masked_trimmed_correction,
    product_correction,
    slice_mask,
    upload_correction,
)

pytestmark = pytest.mark.unit


def _values(k: int = 5, d: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(k, d, generator=g), torch.rand(k, generator=g) + 0.1


def test_over_full_uploads_the_masked_rules_are_the_whole_upload_rules():
    v, w = _values()
    every = torch.ones_like(v, dtype=torch.bool)
    assert torch.equal(masked_median(v, w, every), weighted_median(v, w))
    assert torch.allclose(
        masked_trimmed_correction(v, w, every, 0.25),
        trimmed_mean(v, w, 1) - (w[:, None] * v).sum(0),
        atol=1e-6,
    )


def test_a_coordinate_s_rule_sees_only_the_nodes_that_sent_it():
    # coordinate 0: nodes 0 and 1 sent 1.0 and 3.0, node 2 did not (its decoded value is 0)
    # coordinate 1: all three sent; node 2 is an outlier
    v = torch.tensor([[1.0, 1.0], [3.0, 2.0], [0.0, 100.0]])
    sent = torch.tensor([[True, True], [True, True], [False, True]])
    w = torch.full((3,), 1 / 3)
    assert masked_median(v, w, sent).tolist() == [1.0, 2.0]
    plain = (w[:, None] * v).sum(0)  # the padded mean the method computes: (1/|S|) sum of what was sent
    median = plain + upload_correction(RobustConfig("median"), {"x": v}, w, {"x": sent})["x"]
    assert torch.allclose(median, torch.tensor([2 / 3 * 1.0, 1.0 * 2.0]))  # P_c times the median over U_c
    trimmed = (
        plain + upload_correction(RobustConfig("trimmed_mean", trim=0.34), {"x": v}, w, {"x": sent})["x"]
    )
    assert torch.allclose(trimmed, torch.tensor([4 / 3, 2.0]))  # 2 senders: nothing cut; 3: both tails


def test_nothing_to_cut_is_an_exact_zero_correction():
    v, w = _values(6, 9)
    w = w / w.sum()
    keep = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    x = torch.randn(6, 3, 3)  # a rank axis of 3 on dim 1
    masks = {"x": slice_mask(keep, x, 1)}
    x = x * masks["x"]
    for cfg in (RobustConfig("trimmed_mean", trim=0.0), RobustConfig("clipped", clip_radius=float("inf"))):
        fix = upload_correction(cfg, {"x": x}, w, masks)["x"]
        assert fix.shape == (3, 3) and not bool(fix.any())
    A, B = torch.randn(6, 3, 5), torch.randn(6, 4, 3)
    wide = RobustConfig("clipped", clip_radius=float("inf"))
    assert not bool(product_correction(wide, A, B, keep.float(), w).any())


def test_clipping_bounds_an_outlier_and_krum_leaves_it_out():
    v = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)) * 0.1
    v[3] += 50.0  # node 3's upload is far from everyone's
    w = torch.full((5,), 0.2)
    plain = (w[:, None] * v).sum(0)
    clipped = plain + upload_correction(RobustConfig("clipped", clip_radius=0.5), {"x": v}, w)["x"]
    centre = weighted_median(v, w)
    assert float((clipped - centre).norm()) <= 0.5 + 1e-5 and float((plain - centre).norm()) > 10
    chosen = krum_weights({"x": v}, w, 1)
    assert chosen.sum() == 1 and chosen[3] == 0
