"""Communication graphs and the mixing matrices W built on them.

Every topology in declora is a mixing matrix (epfml style): local-only training is W = I, full averaging is
W = 11^T/n, gossip on a ring is the 1/3 tridiagonal. This module holds the static pieces: graph families
(``GRAPHS``), weight rules (``WEIGHTS``), the validity check and the spectral gap. Time-varying W(t) lives
in ``declora.schedules``. Conventions follow docs/algorithms.md: W is symmetric and doubly stochastic,
and w_ij > 0 only on edges of the graph or the diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from declora.config import TopologyConfig
from declora.seeding import numpy_rng

GraphFn = Callable[[TopologyConfig, int, int], nx.Graph]  # (cfg, n, seed) -> graph on nodes 0..n-1
WeightFn = Callable[[nx.Graph, TopologyConfig], np.ndarray]  # (graph, cfg) -> W: (n, n) float64


# ---------------------------------------------------------------- graphs


def _nx_seed(seed: int, name: str) -> int:
    # networkx wants an int (or random.Random); derive it from our (seed, purpose) stream.
    return int(numpy_rng(seed, "graph", name).integers(2**31 - 1))


def _torus(cfg: TopologyConfig, n: int, seed: int) -> nx.Graph:
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)  # most square factorisation
    if rows < 2:
        raise ValueError(
            f"torus needs n = rows*cols with rows, cols >= 2; n={n} has no such factorisation; "
            f"allowed n nearby: {[m for m in range(max(4, n - 4), n + 5) if _squarish(m)]}"
        )
    g = nx.grid_2d_graph(rows, n // rows, periodic=True)
    return nx.convert_node_labels_to_integers(g, ordering="sorted")  # row-major labels


def _squarish(m: int) -> bool:
    return any(m % d == 0 for d in range(2, math.isqrt(m) + 1))


def _regular(cfg: TopologyConfig, n: int, seed: int) -> nx.Graph:
    k = cfg.degree
    if not 0 <= k < n or (n * k) % 2:
        raise ValueError(
            f"regular: degree={k} is not possible with n={n}; need 0 <= degree < n and n*degree even"
        )
    return nx.random_regular_graph(k, n, seed=_nx_seed(seed, "regular"))


def _small_world(cfg: TopologyConfig, n: int, seed: int) -> nx.Graph:
    if not 2 <= cfg.degree < n or cfg.degree % 2:  # each node joins degree/2 neighbours on either side
        raise ValueError(
            f"small_world: degree={cfg.degree} must be even and in [2, n) with n={n} (each node starts "
            "joined to degree/2 neighbours on either side of the ring)"
        )
    return nx.connected_watts_strogatz_graph(n, cfg.degree, cfg.rewire, tries=100, seed=_nx_seed(seed, "sw"))


def _exponential(cfg: TopologyConfig, n: int, seed: int) -> nx.Graph:
    g = nx.empty_graph(n)
    hops = [2**k for k in range(max(n - 1, 1).bit_length()) if 2**k < n]  # 1, 2, 4, ... < n
    g.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops)  # i - h is the same edge seen from j
    return g


def _edge_file(cfg: TopologyConfig, n: int, seed: int) -> nx.Graph:
    if cfg.edge_list is None:
        raise ValueError("graph=file needs topology.edge_list (a file of 'i j' lines)")
    g = nx.empty_graph(n)
    for lineno, line in enumerate(_read(cfg.edge_list, "edge_list").splitlines(), 1):
        text = line.split("#", 1)[0].split()
        if not text:
            continue
        if len(text) != 2 or not all(t.lstrip("-").isdigit() for t in text):
            raise ValueError(
                f"edge_list {cfg.edge_list}:{lineno}: {line.strip()!r} is not 'i j' (two node ids)"
            )
        i, j = int(text[0]), int(text[1])
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(
                f"edge_list {cfg.edge_list}:{lineno}: edge ({i}, {j}) needs distinct ids in [0, {n})"
            )
        g.add_edge(i, j)
    return g


def _read(path: str | Path, key: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"topology.{key}={str(path)!r} is not a readable file")
    return Path(path).read_text()


GRAPHS: dict[str, GraphFn] = {
    "ring": lambda cfg, n, seed: nx.cycle_graph(n),
    "torus": _torus,
    "regular": _regular,
    "erdos_renyi": lambda cfg, n, seed: nx.gnp_random_graph(n, cfg.p, seed=_nx_seed(seed, "erdos_renyi")),
    "star": lambda cfg, n, seed: nx.star_graph(n - 1),  # node 0 is the hub
    "complete": lambda cfg, n, seed: nx.complete_graph(n),
    "bipartite": lambda cfg, n, seed: nx.complete_bipartite_graph(n // 2, n - n // 2),
    "small_world": _small_world,
    "exponential": _exponential,
    "file": _edge_file,
}


def check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"topology.{name}={value} is not a probability; allowed: a number in [0, 1]")


def build_graph(cfg: TopologyConfig, n: int, seed: int) -> nx.Graph:
    """The static graph ``cfg.graph`` on nodes 0..n-1 (seeded), checked connected unless allowed not to be."""
    if cfg.graph not in GRAPHS:
        raise ValueError(f"topology.graph={cfg.graph!r} is not known; choose one of {sorted(GRAPHS)}")
    if n < 1:
        raise ValueError(f"a graph needs n >= 1 nodes, got n={n}")
    if n == 1:  # one node (centralized training pools the nodes' data): nothing to mix, whatever the graph
        return nx.empty_graph(1)
    check_probability("p", cfg.p)
    check_probability("rewire", cfg.rewire)
    g = nx.Graph(GRAPHS[cfg.graph](cfg, n, seed))
    g.remove_edges_from(
        list(nx.selfloop_edges(g))
    )  # cycle_graph(1) has a self-loop; W's diagonal is separate
    if g.number_of_nodes() != n:
        raise ValueError(f"graph {cfg.graph!r} built {g.number_of_nodes()} nodes, expected n={n}")
    if not cfg.allow_disconnected and not nx.is_connected(g):
        parts = nx.number_connected_components(g)
        raise ValueError(
            f"graph {cfg.graph!r} with n={n} is disconnected ({parts} components), so gossip never "
            f"reaches consensus; set topology.allow_disconnected=true to allow it"
        )
    return g


# ---------------------------------------------------------------- weights


def _adjacency(g: nx.Graph) -> np.ndarray:
    return nx.to_numpy_array(g, nodelist=range(g.number_of_nodes()), weight=None)  # (n, n) 0/1


def _fill_diagonal(off: np.ndarray) -> np.ndarray:
    """Given symmetric off-diagonal weights, set w_ii = 1 - sum_j w_ij (rows then sum to one)."""
    np.fill_diagonal(off, 0.0)
    return off + np.diag(1.0 - off.sum(axis=1))


def metropolis_hastings(g: nx.Graph, cfg: TopologyConfig | None = None) -> np.ndarray:
    """w_ij = 1/(1 + max(d_i, d_j)) on edges. Valid on any graph, so it is the fallback for random graphs."""
    a = _adjacency(g)
    deg = a.sum(axis=1)
    return _fill_diagonal(a / (1.0 + np.maximum(deg[:, None], deg[None, :])))


def max_degree(g: nx.Graph, cfg: TopologyConfig | None = None) -> np.ndarray:
    """w_ij = 1/(d_max + 1) on every edge: one global constant, slower mixing than MH on irregular graphs."""
    a = _adjacency(g)
    return _fill_diagonal(a / (a.sum(axis=1).max(initial=0.0) + 1.0))


def laplacian(g: nx.Graph, cfg: TopologyConfig | None = None) -> np.ndarray:
    """Dec-LoRA's W = I - 2L/(3 lambda_max(L)); the diagonal exceeds 1/3 because lambda_max > d_max."""
    a = _adjacency(g)
    lap = np.diag(a.sum(axis=1)) - a  # (n, n)
    lam = float(np.linalg.eigvalsh(lap)[-1]) if len(a) else 0.0
    if lam <= 0.0:  # no edges: nothing to mix
        return np.eye(len(a))
    return np.eye(len(a)) - 2.0 * lap / (3.0 * lam)


def uniform(g: nx.Graph, cfg: TopologyConfig | None = None) -> np.ndarray:
    """1/(d+1) for self and each neighbour: ring 1/3, complete 1/n. Doubly stochastic only if d is fixed."""
    a = _adjacency(g)
    degrees = sorted({int(d) for d in a.sum(axis=1)})
    if len(degrees) > 1:
        raise ValueError(
            f"weights=uniform needs a regular graph, this one has degrees {degrees}; "
            f"use one of {sorted(set(WEIGHTS) - {'uniform', 'file'})}"
        )
    return (a + np.eye(len(a))) / (degrees[0] + 1 if degrees else 1)


def load_matrix(path: str | Path) -> np.ndarray:
    """Numbers separated by whitespace or commas, one row per line; '#' starts a comment."""
    rows = []
    for lineno, line in enumerate(_read(path, "weight_file").splitlines(), 1):
        text = line.split("#", 1)[0].replace(",", " ").split()
        if text:
            try:
                rows.append([float(x) for x in text])
            except ValueError as err:
                raise ValueError(
                    f"weight_file {path}:{lineno}: {line.strip()[:60]!r} is not a row of numbers (a weight "
                    "file holds one row of W per line, its numbers separated by spaces or commas)"
                ) from err
    if not rows or any(len(r) != len(rows) for r in rows):
        raise ValueError(
            f"weight_file {path}: need a square matrix, got row lengths {[len(r) for r in rows]}"
        )
    return np.array(rows, dtype=np.float64)


def from_file(g: nx.Graph, cfg: TopologyConfig | None = None) -> np.ndarray:
    """A user's W, checked against the graph (use graph=complete to accept any support)."""
    if cfg is None or cfg.weight_file is None:
        raise ValueError("weights=file needs topology.weight_file (a whitespace or CSV matrix)")
    w = load_matrix(cfg.weight_file)
    if w.shape[0] != g.number_of_nodes():
        raise ValueError(
            f"weight_file {cfg.weight_file}: matrix is {w.shape}, expected n={g.number_of_nodes()}"
        )
    check_mixing_matrix(w, support=g)
    mixes = graph_of(w)  # the edges W actually uses
    if not cfg.allow_disconnected and not nx.is_connected(mixes):
        parts = [sorted(c) for c in nx.connected_components(mixes)]
        raise ValueError(
            f"weight_file {cfg.weight_file}: its nonzero weights split the nodes into {len(parts)} groups "
            f"that never mix ({parts}), so gossip never reaches consensus; set "
            "topology.allow_disconnected=true to allow it"
        )
    return w


WEIGHTS: dict[str, WeightFn] = {
    "metropolis_hastings": metropolis_hastings,
    "max_degree": max_degree,
    "laplacian": laplacian,
    "uniform": uniform,
    "file": from_file,
}


def mixing_matrix(g: nx.Graph, cfg: TopologyConfig, rule: str | None = None) -> np.ndarray:
    """W for graph g with ``rule`` (default cfg.weights), made lazy ((I + W)/2) if cfg.lazy."""
    rule = cfg.weights if rule is None else rule
    if rule not in WEIGHTS:
        raise ValueError(f"topology.weights={rule!r} is not known; choose one of {sorted(WEIGHTS)}")
    w = WEIGHTS[rule](g, cfg)  # (n, n)
    return (np.eye(len(w)) + w) / 2.0 if cfg.lazy else w


# ---------------------------------------------------------------- checks and spectra


def _support_mask(support: np.ndarray | nx.Graph, n: int) -> np.ndarray:
    mask = _adjacency(support) if isinstance(support, nx.Graph) else np.asarray(support)
    if mask.shape != (n, n):
        raise ValueError(f"support has shape {mask.shape}, expected ({n}, {n})")
    return (mask != 0) | np.eye(n, dtype=bool)


def check_mixing_matrix(
    w: np.ndarray, support: np.ndarray | nx.Graph | None = None, atol: float = 1e-6
) -> None:
    """Raise ValueError naming the first failed property and its worst entry; gossip with a bad W diverges
    or drifts the average silently, so this is checked wherever a W comes from outside."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(
            f"mixing matrix has non-finite entries at {np.argwhere(~np.isfinite(w))[0].tolist()}"
        )
    n = len(w)
    bad: list[tuple[str, np.ndarray, str]] = [  # (property, error per entry, how to name the entry)
        ("symmetric", np.abs(w - w.T), "|W[{i}, {j}] - W[{j}, {i}]|"),
        ("non-negative", -w, "-W[{i}, {j}]"),
        ("row-stochastic (rows sum to 1)", np.abs(w.sum(axis=1) - 1.0)[:, None], "|sum of row {i} - 1|"),
        (
            "column-stochastic (columns sum to 1)",
            np.abs(w.sum(axis=0) - 1.0)[None, :],
            "|sum of column {j} - 1|",
        ),
    ]
    if support is not None:
        off = np.where(_support_mask(support, n), 0.0, np.abs(w))
        bad.append(("zero off the graph's edges", off, "|W[{i}, {j}]| on a non-edge"))
    for name, err, entry in bad:
        i, j = (int(x) for x in np.unravel_index(int(np.argmax(err)), err.shape))
        if err[i, j] > atol:
            worst = entry.format(i=i, j=j)
            raise ValueError(
                f"mixing matrix is not {name}: worst entry {worst} = {err[i, j]:.3g} > atol={atol}"
            )


def spectral_gap(w: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric W: how much one gossip step shrinks disagreement."""
    lam = np.linalg.eigvalsh(np.asarray(w, dtype=np.float64))  # ascending
    if len(lam) < 2:
        return 1.0  # a single node is always at consensus
    # A disconnected graph has lambda_2 = 1, which rounding may put a hair above: its gap is 0, not -4e-16.
    return max(0.0, float(1.0 - max(abs(lam[-2]), abs(lam[0]))))


def graph_of(w: np.ndarray | torch.Tensor) -> nx.Graph:
    """The communication graph of a mixing matrix: an edge wherever an off-diagonal weight is nonzero."""
    a = np.asarray(w) != 0  # (n, n)
    np.fill_diagonal(a, False)
    return nx.from_numpy_array(a.astype(np.int8))
