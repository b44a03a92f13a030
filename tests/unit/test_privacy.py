"""Node-level DP and attacks on raw tensors: the accountant's answer is opacus' own, clipping is exact,
noise and attacks are seeded per (seed, round, tensor, node), and bad settings stop with a clear error."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from declora.attack import attacker_mask, corrupt, flip_labels
from declora.comm.exchange import LocalExchange
from declora.config import AttackConfig, ConfigError, PrivacyConfig, load_config
from declora.dist import Solo
from declora.guard import GuardedExchange
from declora.privacy import PrivacyAccount, clip_change, epsilon, privatize, resolve_sigma
from declora.robust_uploads import slice_mask

pytestmark = pytest.mark.unit
opacus = pytest.importorskip("opacus.accountants")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_per_node_is_the_opacus_accountants_own_answer(accountant):
    sigma, delta = 1.1, 1e-5
    rates = torch.tensor([1.0, 0.25, 0.05], dtype=torch.float64)
    account = PrivacyAccount(PrivacyConfig(level="node", delta=delta, accountant=accountant), sigma, rates)
    for step in range(7):
        account.spend(torch.tensor([True, step % 2 == 0, True]))  # node 1 skips every other round
    got = account.summary(Solo())["privacy_epsilon"]
    for q, steps, eps in zip(rates.tolist(), (7, 4, 7), got, strict=True):
        ref = opacus.RDPAccountant() if accountant == "rdp" else opacus.PRVAccountant()
        for _ in range(steps):
            ref.step(noise_multiplier=sigma, sample_rate=q)  # the library's own bookkeeping
        assert eps == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def test_target_epsilon_gives_a_sigma_that_spends_at_most_the_target():
    cfg = PrivacyConfig(level="node", target_epsilon=8.0, delta=1e-5, clip=1.0)
    sigma = resolve_sigma(cfg, [(1.0, 20)])
    spent = epsilon(sigma, 1.0, 20, 1e-5)
    assert spent <= 8.0 and spent == pytest.approx(8.0, abs=0.05)
    assert epsilon(0.0, 1.0, 3, 1e-5) == math.inf and epsilon(1.0, 1.0, 0, 1e-5) == 0.0


def test_an_unreachable_target_epsilon_names_the_key_and_what_would_reach_it():
    cfg = PrivacyConfig(level="node", target_epsilon=0.001, delta=1e-5, clip=1.0)
    with pytest.raises(
        ValueError,
        match=r"privacy.target_epsilon=0.001 cannot be reached at privacy.delta=1e-05 "
        r"in 2 steps at sample rate 1 .*raise privacy.target_epsilon or privacy.delta",
    ):
        resolve_sigma(cfg, [(1.0, 2)])


def test_the_prv_accountant_at_sample_rate_one_warns_of_nothing():
    import warnings

    epsilon.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert 0 < epsilon(1.0, 1.0, 2, 1e-5, "prv") < 10


def test_clip_change_bounds_the_change_over_all_tensors_and_leaves_small_changes_exact():
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(3, 4, 5, generator=g), "b": torch.randn(3, 7, generator=g)}
    prev = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in x.items()}
    prev["a"][1] += 5.0  # node 1 moved far since its last message
    out = clip_change(x, prev, clip=1.0)
    norms = sum((out[k] - prev[k]).reshape(3, -1).square().sum(1) for k in x).sqrt()
    assert norms[1] == pytest.approx(1.0, rel=1e-5)
    for k in x:  # nodes 0 and 2 moved less than the bound: their message is their state, bit for bit
        assert torch.equal(out[k][[0, 2]], x[k][[0, 2]])
    same = clip_change(x, prev, clip=math.inf)
    assert all(torch.equal(same[k], x[k]) for k in x)


def test_a_masked_upload_is_clipped_and_noised_on_the_entries_it_sends_only():
    """FSLoRA-style: node i sends only the rank components keep[i] of A (n, r, d_in); the server sees a
    change of norm at most C over those entries, noise only there, and zeros elsewhere."""
    g = torch.Generator().manual_seed(1)
    A = 3 * torch.randn(3, 4, 5, generator=g)
    keep = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    mask = slice_mask(keep, A, 1)
    assert mask.shape == A.shape and torch.equal(mask[:, :, 0], keep)
    clipped = clip_change({"a": A}, {"a": torch.zeros_like(A)}, 1.0, {"a": mask})["a"]
    assert torch.equal(clipped[~mask], A[~mask])  # entries not sent are left alone
    norms = (clipped * mask).reshape(3, -1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5)  # each node's sent change, over its entries
    noised = privatize({"a": A}, {"a": torch.zeros_like(A)}, 1.0, 0.5, torch.arange(3), 0, 2, {"a": mask})
    noise = noised["a"] - clipped
    assert torch.equal(noise[~mask], torch.zeros_like(noise[~mask])) and bool((noise[mask] != 0).all())
    cfg = load_config(None, ["privacy.level=node", "privacy.noise_multiplier=0", "privacy.clip=1.0"])
    account = PrivacyAccount(cfg.privacy, 0.0, torch.ones(3, dtype=torch.float64))
    guarded = GuardedExchange(LocalExchange(3), cfg, torch.arange(3), {"a": A}, account)
    senders = torch.tensor([True, False, True])
    table = guarded.upload_masked({"a": (A, 1)}, keep, senders, 0, True)["a"]  # a change: against zero
    assert torch.equal(table[1], torch.zeros_like(A[1])) and torch.equal(
        table[~mask], torch.zeros(int((~mask).sum()))
    )
    assert torch.allclose(table[[0, 2]].reshape(2, -1).norm(dim=1), torch.ones(2), atol=1e-5)
    assert account.steps.tolist() == [1, 0, 1]
    start = {"a": A - 0.01}  # a small change against the round's start: sent as it is
    again = guarded.upload_masked({"a": (A, 1)}, keep, senders, 1, True, start)["a"]
    assert torch.equal(again[mask & senders[:, None, None]], A[mask & senders[:, None, None]])


def test_private_gossip_mixes_each_senders_own_message_and_clips_the_next_against_that_mix():
    """Under node-level DP a sender mixes its message, not its exact state, so what it holds after the
    mix (W times the messages) is public; its next message is that mix plus the clipped change since
    then: a node that learned nothing sends the mix plus fresh noise, and the earlier noise does not pile
    up in its messages (against the previous message the clip went to undoing that message's noise)."""
    n, sigma, clip, seed = 4, 0.5, 0.2, 7
    W = torch.zeros(n, n)
    for i in range(n):
        W[i, i] = W[i, (i + 1) % n] = W[i, (i - 1) % n] = 1 / 3
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(n, 3, 5, generator=g)}
    x = {"a": start["a"] + torch.randn(n, 3, 5, generator=g)}
    keys = ["privacy.level=node", f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}", f"seed={seed}"]
    cfg = load_config(None, [f"nodes={n}", *keys])
    account = PrivacyAccount(cfg.privacy, sigma, torch.ones(n, dtype=torch.float64))
    guarded = GuardedExchange(LocalExchange(n), cfg, torch.arange(n), start, account)
    sent = privatize(x, start, clip, sigma * clip, torch.arange(n), seed, 0)
    mixed = guarded.gossip(x, W, 0)
    assert torch.allclose(mixed["a"], torch.einsum("ij,j...->i...", W, sent["a"]), atol=1e-6)
    still = guarded.gossip(mixed, W, 1)  # no training in between: each node sends its mix and noise only
    zero = {"a": torch.zeros_like(x["a"])}
    noise = privatize(zero, zero, clip, sigma * clip, torch.arange(n), seed, 1)["a"]  # round 1's draws
    assert torch.allclose(still["a"], torch.einsum("ij,j...->i...", W, mixed["a"] + noise), atol=1e-6)
    assert account.steps.tolist() == [2] * n


def test_noise_is_drawn_per_global_node_so_a_slice_draws_what_the_whole_draws():
    x = {"a": torch.zeros(4, 3)}
    whole = privatize(x, x, 1.0, 0.5, torch.arange(4), seed=3, round=2)["a"]
    part = privatize({"a": x["a"][2:]}, {"a": x["a"][2:]}, 1.0, 0.5, torch.tensor([2, 3]), seed=3, round=2)
    assert torch.equal(whole[2:], part["a"])
    again = privatize(x, x, 1.0, 0.5, torch.arange(4), seed=3, round=3)["a"]
    assert not torch.equal(whole, again)
    many = privatize(
        {"a": torch.zeros(4, 5000)}, {"a": torch.zeros(4, 5000)}, 1.0, 0.5, torch.arange(4), 3, 2
    )
    noise = many["a"]  # 20,000 draws of N(0, (0.5 * 1.0)^2): within 3 standard errors
    assert abs(float(noise.std()) - 0.5) < 3 * 0.5 / (2 * 20_000) ** 0.5
    assert abs(float(noise.mean())) < 3 * 0.5 / 20_000**0.5


def test_attackers_by_id_or_seeded_fraction_and_their_corrupted_messages():
    assert attacker_mask(AttackConfig("sign_flip", (1, 3)), 5, 0).tolist() == [0, 1, 0, 1, 0]
    frac = attacker_mask(AttackConfig("sign_flip", 0.2), 10, 7)
    assert int(frac.sum()) == 2 and torch.equal(frac, attacker_mask(AttackConfig("sign_flip", 0.2), 10, 7))
    x, mask, nodes = torch.ones(4, 2), torch.tensor([False, True, False, True]), torch.arange(4)
    assert corrupt(AttackConfig("sign_flip", (1, 3)), "a", x, mask, nodes, 0, 0)[:, 0].tolist() == [
        1,
        -1,
        1,
        -1,
    ]
    scaled = corrupt(AttackConfig("scaled", (1, 3), scale=3.0), "a", x, mask, nodes, 0, 0)
    assert scaled[:, 0].tolist() == [1, 3, 1, 3]
    noisy = corrupt(AttackConfig("gaussian", (1, 3)), "a", x, mask, nodes, 0, 0)
    assert torch.equal(noisy[[0, 2]], x[[0, 2]]) and not torch.equal(noisy[1], x[1])
    labels = np.array([0, 1, 2, 0, 1, 2])
    flipped = flip_labels(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])], torch.tensor([False, True]), 3)
    assert flipped.tolist() == [0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.level=node"], "exactly one of privacy.noise_multiplier"),
        (["privacy.level=node", "privacy.noise_multiplier=1", "privacy.delta=2"], "privacy.delta=2.0"),
        (
            ["privacy.level=node", "privacy.noise_multiplier=1", "privacy.clip=0"],
            "privacy.clip=0.0 must be positive",
        ),
        (["privacy.level=node", "privacy.noise_multiplier=-1"], "noise_multiplier=-1.0 is out of range"),
        (["privacy.level=node", "privacy.noise_multiplier=1e5"], "allowed: [0, 10000]"),
        (
            ["privacy.level=node", "privacy.noise_multiplier=1", "privacy.clip=.inf"],
            "the noise's scale is their product, so unbounded",
        ),
        (
            ["privacy.level=node", "privacy.target_epsilon=1", "privacy.clip=.inf"],
            "with a finite privacy.clip",
        ),
        (["robust.aggregator=krum"], "robust.aggregator=krum runs at a server"),
        (["robust.aggregator=median", "algorithm.name=decaf"], "algorithm.name=decaf"),
        (["robust.aggregator=krum", "algorithm.name=fslora"], "random sketches"),
        (["robust.aggregator=krum", "algorithm.name=scaffold"], "corrections c - c_i no longer cancel"),
        (
            ["robust.aggregator=krum", "algorithm.name=hetlora", "nodes=3", "algorithm.ranks=[1,2,4]"],
            "ranks=[1, 2, 4]",
        ),
        (["robust.aggregator=foo"], "robust.aggregator='foo' is not allowed"),
        (["attack.kind=sign_flip"], "needs attack.nodes"),
        (["attack.kind=sign_flip", "attack.nodes=[9]", "nodes=4"], "attack.nodes=[9]"),
        (["attack.nodes=[1]"], "needs an attack.kind"),
    ],
)
def test_bad_settings_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_checking_a_private_config_leaves_the_applications_logging_alone():
    """opacus calls logging.basicConfig when first imported: the application's own basicConfig would
    then do nothing. A fresh process, so that opacus is imported here for the first time."""
    pytest.importorskip("opacus")
    code = (
        "import logging\n"
        "from declora.config import load_config\n"
        "load_config(None, {'privacy.level': 'node', 'privacy.noise_multiplier': 1.0})\n"
        "from declora.privacy import epsilon\n"
        "epsilon(1.0, 1.0, 4, 1e-5)\n"
        "print(len(logging.getLogger().handlers), logging.getLogger().level)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", str(logging.WARNING)]


def test_settings_that_protect_little_are_warned_about(caplog):
    import logging

    import torch

    from declora.config import load_config
    from declora.guard import build_account

    def warnings_of(*overrides: str, sizes=(50, 40, 60, 80)) -> str:
        caplog.clear()
        cfg = load_config(None, ["nodes=4", "rounds=2", *overrides])
        with caplog.at_level(logging.WARNING, logger="declora.guard"):
            build_account(cfg, list(sizes), torch.arange(4))
        return caplog.text

    node = ["privacy.level=node", "privacy.clip=1"]
    assert warnings_of(*node, "privacy.noise_multiplier=1") == ""  # delta 1e-5: nothing to say
    assert "adds no noise: nothing is private" in warnings_of(*node, "privacy.noise_multiplier=0")
    assert "privacy.delta=0.5 is not below 1/4 (4 nodes)" in warnings_of(
        *node, "privacy.noise_multiplier=1", "privacy.delta=0.5"
    )
    example = ["privacy.level=example", "privacy.clip=1", "privacy.noise_multiplier=1"]
    assert "privacy.delta=0.05 is not below 1/40 (40 examples of the smallest node)" in warnings_of(
        *example, "privacy.delta=0.05"
    )
    assert warnings_of(*example, "privacy.delta=0.01") == ""  # below 1/40


def test_opacus_loose_bound_warning_becomes_one_log_line(caplog, recwarn):
    import logging

    from declora.privacy import _loose_rdp_bound, epsilon

    _loose_rdp_bound.cache_clear()
    with caplog.at_level(logging.WARNING, logger="declora.privacy"):
        first = epsilon(5.0, 0.01, 1, 1e-5)  # much noise, one step: opacus' best order is its largest
        assert epsilon(5.0, 0.01, 10, 1e-5) > first > 0
    assert not [w for w in recwarn if "Optimal order" in str(w.message)]  # nothing of opacus' leaks
    said = [r.getMessage() for r in caplog.records if "upper bound" in r.getMessage()]
    assert len(said) == 1 and "privacy.accountant=prv" in said[0]


def test_secure_noise_is_fresh_at_every_draw_and_seeded_noise_is_not():
    x = {"a": torch.zeros(2, 64, 64)}
    seeded = [privatize(x, x, 1.0, 0.5, torch.arange(2), seed=3, round=1)["a"] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])  # anyone with the seed draws this noise again
    secure = [privatize(x, x, 1.0, 0.5, torch.arange(2), seed=None, round=1)["a"] for _ in range(2)]
    assert not torch.equal(secure[0], secure[1]) and not torch.equal(secure[0], seeded[0])
    assert float(secure[0].std()) == pytest.approx(0.5, rel=0.03)  # sigma C, as the seeded draw


def test_a_secret_batch_seed_is_kept_in_the_streams_state_for_a_resume():
    import json

    import numpy as np

    from declora.train import NodeStreams

    parts = [np.arange(10), np.arange(10, 17)]
    run = NodeStreams(parts, 4, seed=123456789, secret=True)
    for _ in range(3):
        run.next_batch(0)
    resumed = NodeStreams(parts, 4, seed=42, secret=True)  # a fresh secret, as a resumed process draws
    resumed.load_state(json.loads(json.dumps(run.state())))
    assert all(np.array_equal(run.next_batch(i), resumed.next_batch(i)) for i in (0, 1, 0, 0, 1))
    assert "seed" not in NodeStreams(parts, 4, seed=0).state()  # the run's seed is in config.yaml
