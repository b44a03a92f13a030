"""Static graphs, weight rules, the mixing-matrix check and the spectral gap
(docs/algorithms.md: conventions)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from declora.config import TopologyConfig
from declora.topology import (
    GRAPHS,
    WEIGHTS,
    build_graph,
    check_mixing_matrix,
    graph_of,
    mixing_matrix,
    spectral_gap,
)

pytestmark = pytest.mark.unit

CFG = TopologyConfig()


def _degrees(g: nx.Graph) -> list[int]:
    return [d for _, d in sorted(g.degree())]


# (graph, n, config overrides, expected sorted degree list)
GRAPH_CASES = [
    ("ring", 1, {}, [0]),
    ("ring", 2, {}, [1, 1]),
    ("ring", 3, {}, [2] * 3),
    ("ring", 8, {}, [2] * 8),
    ("torus", 12, {}, [4] * 12),  # 3 x 4
    ("torus", 8, {}, [3] * 8),  # 2 x 4: the size-2 dimension gives one neighbour
    ("regular", 10, {"degree": 3}, [3] * 10),
    ("star", 6, {}, [1] * 5 + [5]),
    ("complete", 1, {}, [0]),
    ("complete", 6, {}, [5] * 6),
    ("bipartite", 6, {}, [3] * 6),
    ("exponential", 8, {}, [5] * 8),  # hops 1, 2, 4 (4 is its own mirror)
    ("exponential", 16, {}, [7] * 16),  # hops 1, 2, 4, 8
]


@pytest.mark.parametrize(("name", "n", "over", "degrees"), GRAPH_CASES)
def test_graph_nodes_degrees_connected(name: str, n: int, over: dict, degrees: list[int]) -> None:
    g = build_graph(replace(CFG, graph=name, **over), n, seed=0)
    assert g.number_of_nodes() == n
    assert sorted(_degrees(g)) == degrees
    assert nx.is_connected(g)


def test_star_hub_is_node_zero() -> None:
    assert _degrees(build_graph(replace(CFG, graph="star"), 7, 0))[0] == 6


def test_random_graphs_are_seeded_and_connected() -> None:
    for name, over in [
        ("erdos_renyi", {"p": 0.5}),
        ("small_world", {"degree": 4, "rewire": 0.3}),
        ("regular", {"degree": 4}),
    ]:
        cfg = replace(CFG, graph=name, **over)
        g1, g2, g3 = build_graph(cfg, 20, 1), build_graph(cfg, 20, 1), build_graph(cfg, 20, 2)
        assert g1.number_of_nodes() == 20 and nx.is_connected(g1)
        assert set(g1.edges) == set(g2.edges)
        assert set(g1.edges) != set(g3.edges)
    sw = build_graph(replace(CFG, graph="small_world", degree=4), 20, 0)
    assert sw.number_of_edges() == 20 * 4 // 2  # rewiring moves edges, never adds or drops them


def test_edge_list_file(tmp_path: Path) -> None:
    f = tmp_path / "edges.txt"
    f.write_text("# a path with a chord\n0 1\n1 2  # inline comment\n\n2 3\n0 2\n")
    g = build_graph(replace(CFG, graph="file", edge_list=str(f)), 4, 0)
    assert sorted(g.edges) == [(0, 1), (0, 2), (1, 2), (2, 3)]


# ---------------------------------------------------------------- weights

WEIGHT_GRAPHS = [
    ("ring", 8, {}),
    ("star", 6, {}),
    ("erdos_renyi", 12, {"p": 0.4}),
    ("torus", 9, {}),
    ("complete", 5, {}),
    ("small_world", 10, {"degree": 4}),
    ("ring", 2, {}),
    ("ring", 1, {}),
]
REGULAR = {"ring", "torus", "complete"}


@pytest.mark.parametrize("rule", sorted(set(WEIGHTS) - {"file"}))
@pytest.mark.parametrize(("name", "n", "over"), WEIGHT_GRAPHS)
@pytest.mark.parametrize("lazy", [False, True])
def test_weight_rules_are_doubly_stochastic_on_graph(
    rule: str, name: str, n: int, over: dict, lazy: bool
) -> None:
    cfg = replace(CFG, graph=name, weights=rule, lazy=lazy, **over)
    g = build_graph(cfg, n, seed=3)
    if rule == "uniform" and name not in REGULAR:
        with pytest.raises(ValueError, match="regular graph"):
            mixing_matrix(g, cfg)
        return
    w = mixing_matrix(g, cfg)  # (n, n)
    check_mixing_matrix(w, support=g)
    off = w[~np.eye(n, dtype=bool)]
    assert (off[_adj(g)[~np.eye(n, dtype=bool)] > 0] > 0).all()  # every edge carries weight


def _adj(g: nx.Graph) -> np.ndarray:
    return nx.to_numpy_array(g, nodelist=range(g.number_of_nodes()))


@pytest.mark.parametrize("rule", ["uniform", "metropolis_hastings", "max_degree"])
def test_ring_third_and_complete_one_over_n(rule: str) -> None:
    n = 7
    ring = mixing_matrix(nx.cycle_graph(n), replace(CFG, weights=rule))
    expected = np.zeros((n, n))
    for i in range(n):
        expected[i, [i, (i - 1) % n, (i + 1) % n]] = 1 / 3
    np.testing.assert_allclose(ring, expected, atol=1e-12)
    np.testing.assert_allclose(
        mixing_matrix(nx.complete_graph(n), replace(CFG, weights=rule)), np.full((n, n), 1 / n), atol=1e-12
    )


def test_tiny_graphs() -> None:
    one = build_graph(CFG, 1, 0)
    np.testing.assert_array_equal(mixing_matrix(one, CFG), [[1.0]])
    np.testing.assert_array_equal(
        mixing_matrix(build_graph(replace(CFG, graph="complete"), 1, 0), CFG), [[1.0]]
    )
    np.testing.assert_allclose(mixing_matrix(build_graph(CFG, 2, 0), CFG), np.full((2, 2), 0.5))
    assert spectral_gap(np.eye(1)) == 1.0
    assert spectral_gap(np.eye(5)) == 0.0  # disconnected: 0, never a rounding error below it


def test_a_disconnected_graph_has_no_negative_gap() -> None:
    split = nx.gnp_random_graph(5, 0.2, seed=62)  # disconnected; its lambda_2 rounds to 1 + 2e-16
    assert not nx.is_connected(split)
    assert spectral_gap(mixing_matrix(split, CFG)) == 0.0


def test_lazy_is_half_identity_plus_w() -> None:
    g = nx.cycle_graph(6)
    np.testing.assert_allclose(
        mixing_matrix(g, replace(CFG, lazy=True)), (np.eye(6) + mixing_matrix(g, CFG)) / 2
    )


def test_laplacian_diagonal_exceeds_a_third() -> None:
    for name, over in [("erdos_renyi", {"p": 0.4}), ("ring", {}), ("star", {}), ("complete", {})]:
        cfg = replace(CFG, graph=name, weights="laplacian", **over)
        w = mixing_matrix(build_graph(cfg, 10, 0), cfg)
        assert np.diag(w).min() > 1 / 3


@pytest.mark.parametrize("n", [4, 5, 8, 10, 16, 33])
def test_ring_spectral_gap_closed_form(n: int) -> None:
    w = mixing_matrix(nx.cycle_graph(n), replace(CFG, weights="uniform"))
    assert spectral_gap(w) == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)), abs=1e-12)


def test_complete_graph_gap_is_one_and_graph_of_recovers_edges() -> None:
    w = mixing_matrix(nx.complete_graph(5), CFG)
    assert spectral_gap(w) == pytest.approx(1.0)
    g = nx.petersen_graph()
    assert set(graph_of(mixing_matrix(g, CFG)).edges) == set(g.edges)


# ---------------------------------------------------------------- check_mixing_matrix


@pytest.mark.parametrize(
    ("w", "support", "message"),
    [
        (np.array([[0.5, 0.5], [0.4, 0.6]]), None, r"symmetric: worst entry \|W\[0, 1\] - W\[1, 0\]\|"),
        (np.array([[1.2, -0.2], [-0.2, 1.2]]), None, r"non-negative: worst entry -W\[0, 1\]"),
        (np.array([[0.5, 0.4], [0.4, 0.5]]), None, r"row-stochastic.*row 0"),
        (
            np.full((3, 3), 1 / 3),
            np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]]),
            r"zero off the graph's edges: worst entry \|W\[0, 2\]\|",
        ),
        (np.ones((2, 3)), None, "square"),
    ],
)
def test_check_mixing_matrix_names_the_failure(
    w: np.ndarray, support: np.ndarray | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_mixing_matrix(w, support=support)


def test_check_accepts_good_matrix_with_graph_support() -> None:
    g = nx.cycle_graph(5)
    check_mixing_matrix(mixing_matrix(g, CFG), support=g)
    check_mixing_matrix(mixing_matrix(g, CFG) + 1e-9)  # within atol


# ---------------------------------------------------------------- weight files


def test_weight_file_csv_and_whitespace(tmp_path: Path) -> None:
    w = mixing_matrix(nx.cycle_graph(4), replace(CFG, weights="metropolis_hastings"))
    csv, txt = tmp_path / "w.csv", tmp_path / "w.txt"
    csv.write_text("# MH ring\n" + "\n".join(",".join(str(float(x)) for x in row) for row in w))
    txt.write_text("\n".join("  ".join(str(float(x)) for x in row) for row in w))
    for f in (csv, txt):
        cfg = replace(CFG, weights="file", weight_file=str(f))
        np.testing.assert_allclose(mixing_matrix(nx.cycle_graph(4), cfg), w)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5 0.5\n0.4 0.6\n", "symmetric"),
        ("0.5 0.5 0\n0.5 0.5\n", "square matrix"),
        ("0.5 x\n0.5 0.5\n", "not a row of numbers"),
        ("[[0.5, 0.5], [0.5, 0.5]]\n", r"w.txt:1: .* one row of W per line, its numbers separated by spaces"),
        ("1 0 0\n0 1 0\n0 0 1\n", r"matrix is \(3, 3\), expected n=2"),
    ],
)
def test_invalid_weight_file(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "w.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        mixing_matrix(nx.cycle_graph(2), replace(CFG, weights="file", weight_file=str(f)))


def test_weight_file_off_graph_support_rejected(tmp_path: Path) -> None:
    f = tmp_path / "w.txt"
    f.write_text("\n".join(" ".join(["0.25"] * 4) for _ in range(4)))  # complete-graph weights on a ring
    with pytest.raises(ValueError, match="zero off the graph's edges"):
        mixing_matrix(nx.cycle_graph(4), replace(CFG, weights="file", weight_file=str(f)))


def test_weight_file_that_cuts_a_node_off_is_refused_unless_allowed(tmp_path: Path) -> None:
    # the path 0-1-2 is connected, but these weights never let node 2 mix with anyone
    f = tmp_path / "w.txt"
    f.write_text("0.5 0.5 0\n0.5 0.5 0\n0 0 1\n")
    cfg = replace(CFG, weights="file", weight_file=str(f))
    with pytest.raises(
        ValueError, match=r"split the nodes into 2 groups that never mix \(\[\[0, 1\], \[2\]\]\)"
    ):
        mixing_matrix(nx.path_graph(3), cfg)
    w = mixing_matrix(nx.path_graph(3), replace(cfg, allow_disconnected=True))
    np.testing.assert_allclose(w[2], [0, 0, 1])


# ---------------------------------------------------------------- bad inputs


def test_unknown_graph_lists_registry() -> None:
    with pytest.raises(ValueError, match="'hypercube'") as err:
        build_graph(replace(CFG, graph="hypercube"), 8, 0)
    assert str(sorted(GRAPHS)) in str(err.value)


def test_unknown_weight_rule_lists_registry() -> None:
    with pytest.raises(ValueError, match="'sinkhorn'") as err:
        mixing_matrix(nx.cycle_graph(4), replace(CFG, weights="sinkhorn"))
    assert str(sorted(WEIGHTS)) in str(err.value)


@pytest.mark.parametrize(("key", "value"), [("p", 1.5), ("p", -0.1), ("rewire", 2.0)])
def test_probability_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"topology.{key}={value} .*\[0, 1\]"):
        build_graph(replace(CFG, graph="erdos_renyi", **{key: value}), 8, 0)


def test_disconnected_graph_rejected_unless_allowed(tmp_path: Path) -> None:
    f = tmp_path / "edges.txt"
    f.write_text("0 1\n2 3\n")
    cfg = replace(CFG, graph="file", edge_list=str(f))
    with pytest.raises(ValueError, match="disconnected .*allow_disconnected"):
        build_graph(cfg, 4, 0)
    g = build_graph(replace(cfg, allow_disconnected=True), 4, 0)
    check_mixing_matrix(mixing_matrix(g, cfg), support=g)
    with pytest.raises(ValueError, match="disconnected"):
        build_graph(replace(CFG, graph="erdos_renyi", p=0.0), 5, 0)


@pytest.mark.parametrize(
    ("over", "n", "message"),
    [
        ({"graph": "torus"}, 7, r"n=7 .*allowed n nearby: \[4, 6, 8, 9, 10\]"),
        ({"graph": "regular", "degree": 3}, 7, "degree=3 is not possible with n=7"),
        ({"graph": "file", "edge_list": None}, 4, "needs topology.edge_list"),
    ],
)
def test_impossible_graphs(over: dict, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_graph(replace(CFG, **over), n, 0)


@pytest.mark.parametrize(("text", "message"), [("0 1 2\n", "is not 'i j'"), ("0 9\n", r"in \[0, 4\)")])
def test_bad_edge_list(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "edges.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        build_graph(replace(CFG, graph="file", edge_list=str(f)), 4, 0)


def test_missing_files_are_value_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="edge_list=.*nope.txt"):
        build_graph(replace(CFG, graph="file", edge_list=missing), 4, 0)
    with pytest.raises(ValueError, match="weight_file=.*nope.txt"):
        mixing_matrix(nx.cycle_graph(4), replace(CFG, weights="file", weight_file=missing))


@pytest.mark.parametrize("graph", ["regular", "ring", "star", "complete", "small_world"])
def test_one_node_is_a_graph_of_one_node_whatever_the_kind(graph):
    """Centralized training runs one node under a config written for many (a 4-regular graph, say)."""
    g = build_graph(TopologyConfig(graph=graph, degree=4), 1, 0)
    assert g.number_of_nodes() == 1 and g.number_of_edges() == 0


@pytest.mark.parametrize("degree", [3, 5])
def test_small_world_refuses_an_odd_degree(degree: int) -> None:
    """Watts-Strogatz joins degree/2 neighbours on either side: an odd degree would silently be degree - 1."""
    with pytest.raises(ValueError, match=f"small_world: degree={degree} must be even"):
        build_graph(replace(CFG, graph="small_world", degree=degree), 10, 0)
    assert {
        d
        for _, d in build_graph(
            replace(CFG, graph="small_world", degree=degree - 1, rewire=0.0), 10, 0
        ).degree()
    } == {degree - 1}
