"""CHOCO-gossip under a sparsifying codec: identical nodes never move, disagreement decays geometrically,
the node mean is kept, and the config refuses topk where a state (not a change) would be sparsified."""

from __future__ import annotations

import pytest
import torch

from declora.comm.codecs import build_codec
from declora.comm.exchange import LocalExchange
from declora.config import ConfigError, load_config

pytestmark = pytest.mark.unit

CODECS = [
    ("fp32", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("quantize", {"bits": 4, "block_size": 64}),
    ("topk", {"fraction": 0.1}),
    ("topk", {"fraction": 0.01}),
]


def ring(n: int) -> torch.Tensor:
    W = torch.zeros(n, n)
    for i in range(n):
        W[i, i] = W[i, (i + 1) % n] = W[i, (i - 1) % n] = 1 / 3
    return W


def disagreement(x: torch.Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize(("codec", "params"), CODECS, ids=lambda v: str(v))
def test_identical_nodes_do_not_move_over_ten_rounds(codec, params):
    """lr 0 and identical nodes: gossip must leave the state alone. Exactly for fp32 and topk (CHOCO sends
    X - X̂ = 0, and X_i is never rewritten as a sum); fp32 up to float rounding of the weighted sum; the other
    codecs mix decoded states, so they stay within one message's codec error."""
    n, gen = 6, torch.Generator().manual_seed(0)
    start = torch.randn(1, 8, 64, generator=gen).expand(n, 8, 64).clone()  # (n, r, d_in), all equal
    exchange = LocalExchange(n, build_codec(codec, **params), seed=0)
    exchange.start({"A": start})
    x = start.clone()
    for t in range(10):
        x = exchange.gossip({"A": x}, ring(n), t)["A"]
        shared = exchange.share({"A": x}, ring(n), t)["A"]  # DeCAF's path: what the neighbours see
    if codec == "topk":
        assert torch.equal(x, start)
        assert torch.equal(shared, start)
    elif codec == "fp32":
        torch.testing.assert_close(x, start, atol=1e-6, rtol=0)
    else:  # rounding (casts) or unbiased noise (quantize) of one message, never a drift towards zero
        bound = {"fp16": 1e-3, "bf16": 8e-3, "quantize": 0.2}[codec] * float(start.abs().max())
        assert float((x - start).abs().max()) < bound
        assert abs(float(x.norm() / start.norm()) - 1) < 0.05


def test_topk_of_the_whole_state_would_shrink_it_choco_does_not():
    """The bug CHOCO fixes: mixing top-k(X) pulled every node to about half its norm in three rounds."""
    n = 8
    start = torch.randn(1, 4, 256, generator=torch.Generator().manual_seed(1)).expand(n, 4, 256).clone()
    codec = build_codec("topk", fraction=0.1)
    decoded, _ = codec.roundtrip(start)
    naive = ring(n) * ~torch.eye(n, dtype=torch.bool)
    one_round = naive @ decoded.reshape(n, -1) + torch.diagonal(ring(n))[:, None] * start.reshape(n, -1)
    assert float(one_round.norm() / start.norm()) < 0.75  # what the old path did in one round
    exchange = LocalExchange(n, codec)  # public copies start at zero here (no start()): still exact
    x = start.clone()
    for t in range(3):
        x = exchange.gossip({"A": x}, ring(n), t)["A"]
    assert torch.equal(x, start)


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_topk_gossip_reaches_consensus_geometrically_and_keeps_the_mean(fraction):
    n = 8
    x0 = torch.randn(n, 8, 128, generator=torch.Generator().manual_seed(2))
    exchange = LocalExchange(n, build_codec("topk", fraction=fraction), seed=0)  # default step 0.3
    x, errors = x0.clone(), []
    for t in range(120):
        x = exchange.gossip({"A": x}, ring(n), t)["A"]
        errors.append(disagreement(x) / disagreement(x0))
    assert errors[39] < 1e-2
    assert errors[79] < 1e-2 * errors[39]  # keeps shrinking by a constant factor per 40 rounds
    assert errors[119] < 1e-6
    torch.testing.assert_close(x.mean(0), x0.mean(0), atol=1e-5, rtol=0)  # sum_i sum_j W_ij (X̂_j - X̂_i) = 0


def test_bytes_are_the_topk_payload_per_edge():
    n, fraction = 8, 0.1
    exchange = LocalExchange(n, build_codec("topk", fraction=fraction))
    x = torch.randn(n, 8, 128)
    exchange.gossip({"A": x}, ring(n), 0)
    k = 103  # ceil(0.1 * 1024)
    assert exchange.ledger.total == n * 2 * k * (4 + 4)  # 2 neighbours, fp32 value + int32 index


def test_public_copies_round_trip_through_state_dict():
    n = 4
    a = LocalExchange(n, build_codec("topk", fraction=0.25))
    x = torch.randn(n, 3, 16)
    a.gossip({"A": x}, ring(n), 0)
    b = LocalExchange(n, build_codec("topk", fraction=0.25))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.gossip({"A": x}, ring(n), 1)["A"], b.gossip({"A": x}, ring(n), 1)["A"])


@pytest.mark.parametrize("exchange_kind", ["local", "dist"])
@pytest.mark.parametrize("mix", ["gossip", "share"])
def test_a_node_that_sends_nothing_leaves_its_public_copy_as_it_was(exchange_kind, mix):
    """Node 3 has no edge this round: it sends nothing (no bytes booked), so no copy of it may learn
    anything; the others' copies move as they would without it."""
    from declora.comm.dist_exchange import DistExchange
    from declora.dist import Solo

    def build(n: int):
        if exchange_kind == "local":
            return LocalExchange(n, build_codec("topk", fraction=0.25))
        group = Solo()
        group.set_nodes(n)
        return DistExchange(group, n, build_codec("topk", fraction=0.25))  # type: ignore[arg-type]

    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(0))
    W = torch.zeros(4, 4)
    W[:3, :3] = ring(3)
    W[3, 3] = 1.0  # isolated this round
    exchange = build(4)
    exchange.start({"A": torch.zeros_like(x)})
    getattr(exchange, mix)({"A": x}, W, 0)
    copies = exchange.state_dict()
    (key,) = copies
    assert not copies[key][3].any()  # still its start
    assert exchange.ledger.edges[3].sum() == 0
    alone = build(3)  # the three connected nodes without node 3: the same copies
    alone.start({"A": torch.zeros_like(x[:3])})
    getattr(alone, mix)({"A": x[:3]}, ring(3), 0)
    assert torch.equal(copies[key][:3], alone.state_dict()[key])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["algorithm.name=fedavg"], r"comm.codec=topk with algorithm.name=fedavg.*whole factors"),
        (["algorithm.name=flexlora"], r"algorithm.name=flexlora.*whole factors"),
        (["algorithm.name=hetlora"], r"hetlora.*trained head.*model.head=frozen"),
        (["comm.error_feedback=true"], r"comm.error_feedback=true with gossip.*CHOCO"),
        (["topology.schedule=pairwise"], r"topology.schedule='pairwise' with comm.codec=topk.*'static'"),
        (["topology.link_failure=0.1"], r"topology.link_failure=0.1 with comm.codec=topk"),
        (["topology.node_dropout=0.1"], r"topology.node_dropout=0.1 with comm.codec=topk"),
        (
            ["stragglers.speeds=[1,1,1,1]", "stragglers.jitter=0.8", "stragglers.deadline=1.5"],
            r"stragglers.deadline=1.5 with comm.codec=topk: CHOCO-gossip needs every neighbour",
        ),
        (["comm.consensus_step=0"], r"comm.consensus_step=0.0 .*\(0, 1\]"),
    ],
)
def test_config_refuses_unsound_topk(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["comm.codec=topk", *overrides])


def test_config_accepts_topk_where_sound():
    load_config(None, ["comm.codec=topk", "algorithm.name=decaf"])
    fslora = ["algorithm.name=fslora", "model.head=frozen", "comm.error_feedback=true"]
    load_config(None, ["comm.codec=topk", *fslora])


def test_a_top_k_fraction_past_break_even_is_warned_when_the_run_is_built(
    tiny_bert, tiny_data, tmp_path, caplog
):
    from unit_helpers import tiny_experiment

    assert build_codec("topk", fraction=0.1).break_even() == 0.5  # 4-byte value + 4-byte index
    assert build_codec("topk", fraction=0.1, value_dtype="fp16").break_even() == pytest.approx(1 / 3)
    with caplog.at_level("WARNING", logger="declora.experiment"):
        tiny_experiment(tiny_bert, tiny_data, tmp_path / "a", "comm.codec=topk", "comm.fraction=0.2")
        assert "top-k saves bytes" not in caplog.text
        tiny_experiment(tiny_bert, tiny_data, tmp_path / "b", "comm.codec=topk", "comm.fraction=0.6")
    assert (
        "comm.fraction=0.6 with comm.codec=topk sends at least as many bytes as every entry in fp32"
        in caplog.text
    )
