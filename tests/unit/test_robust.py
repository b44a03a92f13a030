"""Robust mixing rules (declora.robust) on tiny tensors: equal to the plain mean without attackers,
the trimmed mean and median by hand, and an outlier neighbour contained."""

from __future__ import annotations

import pytest
import torch

from declora.comm.exchange import LocalExchange
from declora.config import ConfigError, TopologyConfig, load_config
from declora.robust import (
    krum_index,
    robust_gossip,
    server_aggregate,
    trimmed_mean,
    weighted_median,
)
from declora.topology import build_graph, mixing_matrix

pytestmark = pytest.mark.unit


def _ring_state(n: int = 6, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(n, 3, 4, generator=g), "b": torch.randn(n, 5, generator=g)}
    cfg = TopologyConfig(graph="ring")
    W = mixing_matrix(build_graph(cfg, n, seed), cfg)
    return tensors, torch.as_tensor(W, dtype=torch.float32)


def test_without_attackers_every_rule_with_nothing_to_cut_is_the_exchanges_gossip_bit_for_bit():
    tensors, W = _ring_state()
    gossip = LocalExchange(6).gossip(tensors, W, 0)
    nodes = torch.arange(6)
    for rule, kw in (("mean", {}), ("trimmed_mean", {"trim": 0.0}), ("clipped", {"tau": 1e30})):
        mixed = robust_gossip(rule, tensors, tensors, W, nodes, **kw)
        for k in tensors:
            assert torch.equal(mixed[k], gossip[k]), (rule, k)


def test_trimmed_mean_drops_each_coordinates_extremes_and_renormalizes():
    values = torch.tensor([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0], [4.0, 2.0]])  # (k=5, D=2)
    w = torch.full((5,), 0.2)
    # column 0 keeps 2, 3, 4; column 1 keeps 0, 1, 2 (each of equal weight)
    torch.testing.assert_close(trimmed_mean(values, w, 1), torch.tensor([3.0, 1.0]))
    # a dropped value never enters the sum: neither a huge one's rounding nor an infinite one's NaN
    huge = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1e9]])
    assert trimmed_mean(huge, w, 1).item() == 2.0
    assert trimmed_mean(torch.cat([huge[:4], torch.full((1, 1), float("inf"))]), w, 1).item() == 2.0


def test_weighted_median_matches_torch_median_for_equal_weights_and_follows_the_weights():
    values = torch.tensor([[5.0, -1.0], [1.0, 7.0], [3.0, 2.0]])
    assert torch.equal(weighted_median(values, torch.ones(3)), values.median(0).values)
    heavy = weighted_median(values, torch.tensor([0.7, 0.2, 0.1]))  # node 0 holds most of the weight
    assert torch.equal(heavy, values[0])


def test_clipped_gossip_bounds_an_outlier_neighbours_pull_by_its_weight_times_tau():
    tensors, W = _ring_state()
    bad = {k: v.clone() for k, v in tensors.items()}
    for v in bad.values():
        v[1] = 1e6  # node 1 sends garbage to nodes 0 and 2
    tau = 0.5
    mixed = robust_gossip("clipped", tensors, bad, W, torch.arange(6), tau=tau)
    clean = robust_gossip("mean", tensors, tensors, W, torch.arange(6))
    for i in (0, 2):  # each neighbour moves node i by at most W_ij * tau in total norm
        moved = sum((mixed[k][i] - tensors[k][i]).square().sum() for k in tensors).sqrt()
        assert moved <= float(W[i].sum() - W[i, i]) * tau + 1e-5
    for i in (3, 4):  # nodes that do not hear node 1: clipping changes them only where a neighbour is far
        for k in tensors:
            assert mixed[k][i].abs().max() < 10 and clean[k][i].abs().max() < 10
    # every node exactly: x_i + sum_j W_ij min(1, tau / ||x~_j - x_i||) (x~_j - x_i), in float64, the norm
    # over all of a node's tensors together
    W64 = W.double()
    for i in range(6):
        nb = [j for j in range(6) if j != i and W64[i, j] > 0]
        diffs = {j: {k: bad[k][j].double() - tensors[k][i].double() for k in tensors} for j in nb}
        norms = {j: sum(d.square().sum() for d in diffs[j].values()).sqrt() for j in nb}
        for k in tensors:
            want = tensors[k][i].double() + sum(
                W64[i, j] * min(1.0, tau / float(norms[j])) * diffs[j][k] for j in nb
            )
            torch.testing.assert_close(mixed[k][i].double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_coordinate_rules_ignore_one_outlier_among_five(rule):
    n = 5
    W = torch.full((n, n), 1.0 / n)  # complete graph: every node hears all four others
    x = {"a": torch.arange(n, dtype=torch.float32).view(n, 1).repeat(1, 3)}  # node i holds i
    bad = {"a": x["a"].clone()}
    bad["a"][4] = 1e9
    mixed = robust_gossip(rule, x, bad, W, torch.arange(n), trim=0.2)
    # nodes 0-3 mix {0, 1, 2, 3, 1e9}: one value dropped at each end (trim) or the middle one (median)
    assert mixed["a"][:4].tolist() == [[2.0] * 3] * 4  # exactly: the outlier cancels no digits away
    server = server_aggregate(rule, {"a": bad["a"][:, :1]}, torch.ones(n), trim=0.2)
    assert server["a"].tolist() == [2.0]


def test_clipped_server_rule_is_exact_beside_a_huge_upload():
    # the centre is the median 2; each upload moves it by at most tau, with weight 1/5:
    # 2 + (-0.5 - 0.5 + 0 + 0.5 + 0.5) / 5 = 2, and the 1e9 upload adds no rounding
    up = {"a": torch.tensor([[0.0], [1.0], [2.0], [3.0], [1e9]])}
    assert server_aggregate("clipped", up, torch.ones(5), tau=0.5)["a"].tolist() == [2.0]
    up["a"][4] = float("inf")  # no direction to clip to: it adds nothing (not 0 * inf = NaN)
    assert server_aggregate("clipped", up, torch.ones(5), tau=0.5)["a"].item() == pytest.approx(2 - 0.5 / 5)
    W = torch.full((5, 5), 0.2)
    x = {"a": torch.arange(5.0).view(5, 1)}
    mixed = robust_gossip("clipped", x, up, W, torch.arange(5), tau=0.5)["a"]
    assert torch.isfinite(mixed[:4]).all()  # the honest nodes: each far neighbour pulls by 0.2 * 0.5
    assert mixed[0].item() == pytest.approx(0.2 * (0.5 + 0.5 + 0.5))  # 1, 2, 3 clipped; inf adds 0


def test_server_rules_equal_the_mean_without_outliers_and_krum_picks_a_central_upload():
    g = torch.Generator().manual_seed(1)
    up = {"a": torch.randn(6, 4, generator=g)}
    w = torch.ones(6)
    mean = server_aggregate("mean", up, w)
    assert torch.equal(server_aggregate("trimmed_mean", up, w, trim=0.0)["a"], mean["a"])
    assert torch.equal(server_aggregate("clipped", up, w, tau=1e30)["a"], mean["a"])
    up["a"][2] = 1e6
    assert krum_index(up["a"], f=1) != 2
    # six equal weights: the lower middle value, the third smallest of each coordinate
    assert torch.equal(server_aggregate("median", up, w)["a"], up["a"].sort(0).values[2])


def test_a_node_with_no_self_weight_mixes_only_its_neighbours():
    W = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
    x = {"a": torch.tensor([[100.0], [1.0], [3.0]])}
    # node 0 mixes {1, 3} only (its own 100 is not one of its values): the lower middle for the median;
    # two values leave nothing to trim, so their mean
    for rule, want in (("median", 1.0), ("trimmed_mean", 2.0)):
        mixed = robust_gossip(rule, x, x, W, torch.arange(3), trim=0.25)
        assert torch.isfinite(mixed["a"]).all()
        assert float(mixed["a"][0]) == want, rule


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["nodes=10", "attack.kind=sign_flip", "attack.nodes=0.04"],
            r"attack.nodes=0.04 of 10 nodes is round\(0.4\) = 0 attackers",
        ),
        (
            ["nodes=10", "attack.kind=sign_flip", "attack.nodes=0.05"],  # 0.5 rounds to the even 0
            r"attack.nodes=0.05 of 10 nodes is round\(0.5\) = 0 attackers",
        ),
        (
            ["nodes=4", "algorithm.name=fedavg", "robust.aggregator=krum", "robust.krum_f=1"],
            r"robust.krum_f=1 with 4 uploads a round: Krum needs more than 2f \+ 2 = 4 uploads",
        ),
        (
            ["nodes=8", "algorithm.name=fedavg", "server.fraction=0.5", "robust.aggregator=krum"],
            r"robust.krum_f=1 with 4 uploads a round",  # the sampled count, not the nodes
        ),
        (  # a round may keep 2 of the 5 uploads, and Krum then picks the lower id: the attacker's, say
            ["nodes=5", "algorithm.name=fedavg", "robust.aggregator=krum", "topology.node_dropout=0.6"],
            r"robust.aggregator=krum with topology.node_dropout=0.6: offline or late nodes do not upload, "
            r"so a round can have 2f \+ 2 = 4 uploads or fewer",
        ),
        (
            ["nodes=9", "algorithm.name=fedavg", "robust.aggregator=krum", "stragglers.deadline=8"],
            r"robust.aggregator=krum with stragglers.deadline=8: offline or late nodes",
        ),
        (
            ["privacy.level=node", "privacy.clip=.inf", "privacy.noise_multiplier=0.5"],
            r"privacy.clip=inf with privacy.noise_multiplier=0.5: the noise's scale is their product",
        ),
        (
            ["nodes=3", "attack.kind=sign_flip", "attack.nodes=0.9"],
            r"attack.nodes=0.9 makes all 3 nodes attackers: no honest node is left",
        ),
        (
            ["nodes=3", "attack.kind=sign_flip", "attack.nodes=[0,1,2]"],
            r"attack.nodes=\[0, 1, 2\] makes all 3 nodes attackers",
        ),
        (["attack.kind=gaussian", "attack.nodes=[]"], r"attack.nodes=\[\] names no attacker"),
        (
            ["algorithm.name=centralized", "attack.kind=label_flip", "attack.nodes=[0]"],
            r"attack.kind=label_flip with algorithm.name=centralized: its one node trains on all the data",
        ),
        (  # instruction rows carry no class: the flip would leave the attacker's data honest
            ["model.name=smollm2", "model.head=none", "task.kind=instruction", "attack.kind=label_flip"]
            + ["attack.nodes=[0]"],
            r"attack.kind=label_flip needs class labels; task.kind=instruction trains on text",
        ),
        (
            ["algorithm.name=local", "privacy.level=node", "privacy.target_epsilon=1"],
            r"privacy.level=node with algorithm.name=local: node-level DP noises what a node sends, and it "
            r"sends nothing",
        ),
        (
            ["algorithm.name=local", "attack.kind=sign_flip", "attack.nodes=[0]"],
            r"attack.kind=sign_flip corrupts what a node sends; algorithm.name=local sends nothing",
        ),
        (
            ["attack.kind=scaled", "attack.scale=1", "attack.nodes=[0]"],
            r"attack.kind=scaled with attack.scale=1 sends the honest message",
        ),
        (
            ["attack.kind=gaussian", "attack.std=0", "attack.nodes=[0]"],
            r"attack.kind=gaussian with attack.std=0 sends the honest message",
        ),
        (
            ["robust.aggregator=clipped", "robust.clip_radius=.inf"],
            r"robust.aggregator=clipped with robust.clip_radius=inf never clips: it is the plain mean",
        ),
        (
            ["attack.kind=sign_flip", "attack.nodes=1"],
            r"attack.nodes=1 as a fraction must be in \(0, 1\); node ids go in a list, e.g. "
            r"attack.nodes=\[1\]",
        ),
        (["attack.nodes=[0]"], r"attack.nodes=\[0\] needs an attack.kind \(not 'none'\)"),
        (["attack.kind=gaussian", "attack.nodes=[0,0]"], r"attack.nodes=\[0, 0\] names a node twice"),
        (  # a ring: each node mixes 3 values, and floor(0.25 x 3) = 0
            ["robust.aggregator=trimmed_mean", "robust.trim=0.25"],
            r"robust.trim=0.25 drops floor\(0.25 x 3\) = 0 of the 3 values a node mixes at most on "
            r"topology.graph=ring.*plain mean; use robust.trim >= 0.34",
        ),
        (
            ["nodes=6", "algorithm.name=fedavg", "server.fraction=0.5", "robust.aggregator=trimmed_mean"],
            r"robust.trim=0.25 drops floor\(0.25 x 3\) = 0 of the 3 uploads a round at the server",
        ),
    ],
    ids=[
        "fraction_rounds_to_none",
        "half_rounds_to_even_none",
        "krum_too_few",
        "krum_sampled",
        "krum_with_dropout",
        "krum_with_a_deadline",
        "inf_clip",
        "every_node_by_fraction",
        "every_node_by_id",
        "no_attacker_listed",
        "attack_on_centralized",
        "label_flip_on_instructions",
        "node_dp_on_local",
        "message_attack_on_local",
        "scale_one",
        "std_zero",
        "infinite_clip_radius",
        "node_id_as_a_number",
        "attackers_without_an_attack",
        "an_attacker_twice",
        "trim_on_a_ring",
        "trim_at_a_sampling_server",
    ],
)
def test_settings_that_would_silently_do_nothing_or_break_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_settings_next_to_those_limits_load():
    assert load_config(None, ["nodes=10", "attack.kind=sign_flip", "attack.nodes=0.06"]).attack.nodes == 0.06
    load_config(None, ["nodes=5", "algorithm.name=fedavg", "robust.aggregator=krum", "robust.krum_f=1"])
    load_config(None, ["privacy.level=node", "privacy.clip=.inf", "privacy.noise_multiplier=0"])
    load_config(None, ["nodes=3", "attack.kind=sign_flip", "attack.nodes=[0,1]"])  # one honest node
    load_config(None, ["robust.aggregator=trimmed_mean", "robust.trim=0.34"])  # drops 1 of 3 on a ring
    load_config(None, ["robust.aggregator=trimmed_mean", "topology.graph=complete"])  # 2 of 8
    load_config(None, ["robust.aggregator=trimmed_mean", "topology.schedule=dynamic_er"])  # up to 8
    load_config(None, ["robust.aggregator=trimmed_mean", "robust.trim=0", "allow_degenerate=true"])
    load_config(None, ["algorithm.name=local", "attack.kind=label_flip", "attack.nodes=[0]"])  # trains on it
    load_config(
        None, ["algorithm.name=local", "privacy.level=example", "privacy.noise_multiplier=1"]
    )  # DP-SGD
    load_config(None, ["attack.kind=scaled", "attack.scale=1", "attack.nodes=[0]", "allow_degenerate=true"])


def test_a_trim_that_no_round_of_the_gossip_can_apply_is_refused(tmp_path):
    """The count is read off W(t): one-peer exponential gossip mixes 2 values in every round, and a weight
    file without self-weights gives a node of the complete graph on 4 nodes its 3 neighbours only."""
    trim = ["robust.aggregator=trimmed_mean", "robust.trim=0.49"]
    with pytest.raises(
        ConfigError,
        match=r"floor\(0.49 x 2\) = 0 of the 2 values a node mixes at most on "
        r"topology.schedule=one_peer_exponential",
    ):
        load_config(None, [*trim, "topology.schedule=one_peer_exponential"])
    weights = tmp_path / "w.txt"
    weights.write_text(
        "\n".join(" ".join("0" if i == j else "0.333333333333" for j in range(4)) for i in range(4))
    )
    file = ["nodes=4", "topology.graph=complete", "topology.weights=file", f"topology.weight_file={weights}"]
    with pytest.raises(
        ConfigError,
        match=r"floor\(0.25 x 3\) = 0 of the 3 values a node mixes at most on "
        r"topology.graph=complete",
    ):
        load_config(None, [*file, "robust.aggregator=trimmed_mean", "robust.trim=0.25"])
    load_config(None, [*file, "robust.aggregator=trimmed_mean", "robust.trim=0.34"])  # 1 of 3
    load_config(None, ["robust.aggregator=trimmed_mean", "topology.schedule=periodic_full", "rounds=10"])


def test_krum_over_too_few_uploads_is_warned_about(caplog):
    """Allowed with allow_degenerate only: two uploads score alike, so the choice is the lower row."""
    load_config(
        None,
        [
            "nodes=5",
            "algorithm.name=fedavg",
            "robust.aggregator=krum",
            "topology.node_dropout=0.6",
            "allow_degenerate=true",
        ],
    )
    attacker_first = torch.cat([-50 * torch.ones(1, 10), torch.ones(1, 10)])
    with caplog.at_level("WARNING", logger="declora.robust"):
        assert krum_index(attacker_first, 1) == 0
    assert "Krum over 2 uploads with robust.krum_f=1 (it needs more than 2f + 2 = 4)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="declora.robust"):
        krum_index(torch.randn(5, 10), 1)
    assert not caplog.text


def test_the_weighted_median_of_an_even_count_is_the_lower_middle_at_any_weight_scale():
    ten, four = torch.arange(10.0).view(10, 1), torch.arange(4.0).view(4, 1)
    for w in (torch.ones(10), torch.full((10,), 0.1), torch.full((10,), 1 / 3)):
        assert float(weighted_median(ten, w)[0]) == 4.0, w[0]
        assert float(server_aggregate("median", {"t": ten}, w)["t"]) == 4.0, w[0]
    assert float(server_aggregate("median", {"t": four}, torch.ones(4))["t"]) == 1.0
    assert float(weighted_median(four, torch.tensor([1.0, 1.0, 1.0, 3.0]))[0]) == 2.0  # reaches 3 of 6
