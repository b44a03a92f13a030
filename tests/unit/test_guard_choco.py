"""Private, Byzantine and robust nodes under CHOCO-gossip (topk) and under asynchronous gossip, on tiny
tensors through declora.guard: nothing to cut or add is the plain exchange bit for bit, the DP message is
the top-k of the clipped, noised change against the public copy, an attacker's copy follows its corrupted
state, and asynchronous nodes privatize (and spend) only when they publish."""

from __future__ import annotations

import pytest
import torch

from declora.comm.codecs import build_codec
from declora.comm.exchange import LocalExchange
from declora.config import load_config
from declora.guard import GuardedExchange, build_account
from declora.privacy import clip_change, gaussian_noise
from declora.robust import clip_coefficients, robust_choco
from declora.stragglers import AsyncExchange, Stragglers

pytestmark = pytest.mark.unit
N = 6


def ring(n: int = N) -> torch.Tensor:
    W = torch.zeros(n, n)
    for i in range(n):
        W[i, i] = W[i, (i + 1) % n] = W[i, (i - 1) % n] = 1 / 3
    return W


def _state(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"A": scale * torch.randn(N, 3, 8, generator=g), "B": scale * torch.randn(N, 8, 3, generator=g)}


def _topk(fraction: float = 0.25) -> LocalExchange:
    exchange = LocalExchange(N, build_codec("topk", fraction=fraction), seed=0)
    exchange.start(_state(0))
    return exchange


def _guarded(inner, *overrides: str, initial=None) -> GuardedExchange:
    cfg = load_config(None, [f"nodes={N}", *overrides])
    account = build_account(cfg, [10] * N, torch.arange(N))
    return GuardedExchange(inner, cfg, torch.arange(N), initial or _state(0), account)


def _rounds(exchange, rounds: int = 4) -> list[dict[str, torch.Tensor]]:
    """Gossip a drifting state (each round's training step is a fixed random push)."""
    x, out = _state(0), []
    for t in range(rounds):
        x = {k: v + 0.1 * _state(10 + t)[k] for k, v in x.items()}
        x = exchange.gossip(x, ring(), t)
        out.append(x)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy.level=node", "privacy.noise_multiplier=0", "privacy.clip=.inf"],
        ["robust.aggregator=clipped", "robust.clip_radius=.inf", "allow_degenerate=true"],
        ["robust.aggregator=trimmed_mean", "robust.trim=0", "allow_degenerate=true"],
        [
            "privacy.level=node",
            "privacy.noise_multiplier=0",
            "privacy.clip=.inf",
            "robust.aggregator=clipped",
        ],
    ],
    ids=["dp", "clipped", "trimmed", "dp_clipped"],
)
def test_nothing_to_clip_noise_or_cut_is_plain_choco_bit_for_bit(overrides):
    if "robust.aggregator=clipped" in overrides and "robust.clip_radius=.inf" not in overrides:
        overrides = [*overrides, "robust.clip_radius=1e30"]
    plain, guarded = _rounds(_topk()), _rounds(_guarded(_topk(), *overrides))
    for a, b in zip(plain, guarded, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_decafs_shared_copies_with_zero_noise_and_infinite_clip_are_plain_choco_bit_for_bit():
    dp = ["algorithm.name=decaf", "privacy.level=node", "privacy.noise_multiplier=0", "privacy.clip=.inf"]
    plain, guarded = _topk(), _guarded(_topk(), *dp)
    for t in range(3):
        x = {k: v + 0.1 * t * _state(20 + t)[k] for k, v in _state(0).items()}
        a, b = plain.share(x, ring(), t), guarded.share(x, ring(), t)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_clipped_choco_clips_each_copy_difference_to_tau():
    x, hats = _state(1), _state(2)
    W, tau, step = ring(), 0.5, 0.3
    got = robust_choco("clipped", x, hats, W, torch.arange(N), step, tau=tau)
    for i in range(N):
        pull = {k: torch.zeros_like(v[i]) for k, v in x.items()}
        for j in ((i - 1) % N, (i + 1) % N):
            d = {k: hats[k][j] - hats[k][i] for k in x}
            c = clip_coefficients(torch.tensor(sum(float(v.square().sum()) for v in d.values())), tau)
            for k in x:
                pull[k] += W[i, j] * float(c) * d[k]
        for k in x:
            torch.testing.assert_close(got[k][i], x[k][i] + step * pull[k], atol=1e-6, rtol=0)


def test_the_private_message_is_the_topk_of_the_clipped_noised_change_against_the_public_copy():
    sigma, clip, fraction = 0.5, 0.2, 0.25
    inner = _topk(fraction)
    guard = _guarded(inner, "privacy.level=node", f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}")
    x = {k: v + _state(5)[k] for k, v in _state(0).items()}
    before = {k: inner.copies.table(k, v).clone() for k, v in x.items()}
    guard.gossip(x, ring(), 3)
    clipped = clip_change(x, before, clip)
    codec = build_codec("topk", fraction=fraction)
    for k, v in x.items():
        noise = torch.stack(
            [gaussian_noise(v.shape[1:], sigma * clip, "privacy", 3, k, i, seed=0) for i in range(N)]
        )
        q, _ = codec.roundtrip(clipped[k] - before[k] + noise)
        torch.testing.assert_close(inner.copies.hats[k], before[k] + q, atol=1e-6, rtol=0)
    assert guard.account.steps.tolist() == [1] * N


def test_a_sign_flippers_public_copy_follows_its_flipped_state():
    inner = _topk(fraction=1.0)  # every entry sent: the copy becomes what the node publishes
    guard = _guarded(inner, "attack.kind=sign_flip", "attack.nodes=[2]")
    x = _state(3)
    guard.gossip(x, ring(), 0)
    for k, v in x.items():
        torch.testing.assert_close(inner.copies.hats[k][2], -v[2], atol=1e-6, rtol=0)
        torch.testing.assert_close(inner.copies.hats[k][0], v[0], atol=1e-6, rtol=0)


def test_asynchronous_nodes_privatize_and_spend_only_when_they_publish():
    cfg_keys = [
        "stragglers.speeds=[1,1,3,1,1,1]",
        "stragglers.asynchronous=true",
        "stragglers.max_staleness=2",
    ]
    cfg = load_config(None, [f"nodes={N}", *cfg_keys])
    st = Stragglers(cfg, N)
    start = _state(0)
    inner = AsyncExchange(LocalExchange(N), st, start)
    dp = ["privacy.level=node", "privacy.noise_multiplier=0.5", "privacy.clip=0.2"]
    guard = _guarded(inner, *cfg_keys, *dp, "robust.aggregator=median", initial=start)
    x = _state(4)
    for t in range(3):  # node 2 publishes every 3 rounds: in round 2 only
        st.begin_round(t, torch.ones(N, dtype=torch.bool))
        held = {k: v.clone() for k, v in inner.held.items()}
        out = guard.gossip(x, ring(), t)
        for k in x:
            if t < 2:
                assert torch.equal(inner.held[k][2], held[k][2])  # its neighbours mix its old copy
            else:
                assert not torch.equal(inner.held[k][2], held[k][2])
            # the median of node 1's own message (node-level DP: a sender mixes what it published, not
            # its exact state) and its neighbours' last published copies
            assert not torch.equal(inner.held[k][1], x[k][1])
            values = torch.stack([inner.held[k][1], inner.held[k][0], inner.held[k][2]])
            assert torch.equal(out[k][1], values.median(0).values)
    assert guard.account.steps.tolist() == [3, 3, 1, 3, 3, 3]
    assert int(inner.ledger.edges[2].sum()) > 0
