"""Stragglers' pure parts: speed profiles, publication periods, asynchronous mixing by hand, bad config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.comm.exchange import LocalExchange
from declora.config import ConfigError, load_config
from declora.stragglers import AsyncExchange, Stragglers, multipliers, periods

pytestmark = pytest.mark.unit


def _cfg(*extra):
    return load_config(None, ["nodes=4", "train.local_steps=2", *extra])


def test_lognormal_profile_is_seeded_per_node():
    s = _cfg("stragglers.speeds=lognormal", "stragglers.sigma=1.0").stragglers
    a, b = multipliers(s, 4, seed=3), multipliers(s, 4, seed=3)
    assert np.array_equal(a, b) and np.all(a > 0) and len(set(a.tolist())) == 4
    assert np.array_equal(multipliers(s, 6, seed=3)[:4], a)  # node i's draw does not depend on n
    assert not np.array_equal(multipliers(s, 4, seed=4), a)


def test_periods_are_relative_slowness_capped_by_staleness():
    m = np.array([1.0, 1.4, 2.6, 9.0])
    assert periods(m, 0).tolist() == [1, 1, 1, 1]
    assert periods(m, 2).tolist() == [1, 1, 3, 3]
    assert periods(m, 10).tolist() == [1, 1, 3, 9]


def test_jitter_and_deadline_draw_per_round():
    st = Stragglers(_cfg("stragglers.jitter=0.5", "stragglers.deadline=2.5"), 4)
    assert np.array_equal(
        st.compute_s(5), Stragglers(st_cfg := _cfg("stragglers.jitter=0.5"), 4).compute_s(5)
    )
    assert not np.array_equal(st.compute_s(5), st.compute_s(6))
    assert np.array_equal(st.late(5), st.compute_s(5) > 2.5)
    assert st_cfg.stragglers.deadline is None


def test_asynchronous_mix_uses_held_copies():
    cfg = _cfg("stragglers.speeds=[1,1,2,1]", "stragglers.asynchronous=true", "stragglers.max_staleness=1")
    st = Stragglers(cfg, 4)
    x0 = torch.arange(8.0).view(4, 2)
    ex = AsyncExchange(LocalExchange(4), st, {"A": x0})
    W = torch.full((4, 4), 0.25, dtype=torch.float64)
    st.begin_round(0, torch.ones(4, dtype=torch.bool))  # node 2 (period 2) does not publish in round 0
    x = x0 + 100.0
    out = ex.gossip({"A": x}, W, 0)["A"]
    held = x.clone()
    held[2] = x0[2]  # the others mix node 2's initial copy; node 2 mixes its own current state
    expect = 0.25 * held.sum(0).expand(4, 2).clone()
    expect[2] = 0.25 * (x.sum(0))
    assert torch.allclose(out, expect)
    edges = ex.ledger.edges
    assert int(edges[2].sum()) == 0 and int(edges[0].sum()) > 0  # a non-publisher sends nothing


def test_asynchronous_mix_without_any_fresh_message_keeps_each_nodes_own_weight():
    """Node 0 (the only fast one) is offline and nobody else is due: every copy mixed is held, and each
    node keeps W_ii of its own state (not all of it)."""
    cfg = _cfg("stragglers.speeds=[1,3,3,3]", "stragglers.asynchronous=true", "stragglers.max_staleness=2")
    st = Stragglers(cfg, 4)
    x0 = torch.arange(8.0).view(4, 2)
    ex = AsyncExchange(LocalExchange(4), st, {"A": x0})
    W = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float64)
    W[1:, 1:] /= 3  # node 0 offline: isolated by the schedule
    st.begin_round(0, torch.tensor([False, True, True, True]))
    assert not st.publish.any()
    x = x0 + 100.0
    out = ex.gossip({"A": x}, W, 0)["A"]
    expect = torch.stack([x[0], *[(x[i] + x0[1:].sum(0) - x0[i]) / 3 for i in (1, 2, 3)]])
    assert torch.allclose(out, expect)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stragglers.speeds=gamma"], "stragglers.speeds='gamma' is not known"),
        (["stragglers.speeds=[1,2]"], "stragglers.speeds has 2 entries; nodes=4"),
        (["stragglers.speeds=[1,2,0,1]"], "0.0 is not a positive number"),
        (["stragglers.max_staleness=2"], "needs stragglers.asynchronous=true"),
        (["stragglers.asynchronous=true", "algorithm.name=fedavg"], "asynchrony replaces plain gossip"),
        (["stragglers.asynchronous=true", "comm.codec=fp16"], "use comm.codec=fp32"),
        (["stragglers.deadline=0"], "stragglers.deadline=0"),
        (["stragglers.step_s=-1"], "stragglers.step_s=-1"),
        (["stragglers.deadline=3", "algorithm.name=centralized"], "one node has no one to wait for"),
        (
            ["stragglers.speeds=[1,1,2,4]", "stragglers.asynchronous=true", "stragglers.deadline=3"],
            "stragglers.deadline=3.0 with stragglers.asynchronous=true: a slow node spreads its local work",
        ),
    ],
)
def test_bad_stragglers_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _cfg(*overrides)
