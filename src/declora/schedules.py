"""Time-varying mixing matrices W(t): the topology of every round as a pure function of (seed, round).

Baselines are schedules, not code paths: a static ring, a fresh Erdős–Rényi graph each round (TAD-LoRA),
random pairwise encounters (ADF-LoRA), one-peer exponential graphs and periodic full averaging are all one
object with ``matrix(t)`` and ``online(t)``. Every draw comes from ``numpy_rng(seed, purpose, t)``, so each
process of a distributed run derives the same W(t) without talking, and a resumed run sees the same graphs.

One round is built in three steps: the kind gives a graph and a weight rule, the modifiers (node dropout,
then link failure) remove edges, and the rule weighs what survives (Metropolis–Hastings if the rule is not
valid on the surviving graph). ``cfg.lazy`` then turns W into (I + W)/2, on every round but the exact
averages of ``periodic_full`` (a lazy exact average would only half-average).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import networkx as nx
import numpy as np
import torch

from declora.config import TopologyConfig
from declora.seeding import numpy_rng
from declora.topology import build_graph, check_probability, graph_of, mixing_matrix, spectral_gap


@runtime_checkable
class Schedule(Protocol):
    """W(t) for every round t: (n, n) float64, symmetric, doubly stochastic; offline nodes' rows are I's."""

    n: int
    is_static: bool

    def matrix(self, t: int) -> torch.Tensor: ...  # (n, n) float64

    def online(self, t: int) -> torch.Tensor: ...  # (n,) bool


# t -> (graph of round t, weight rule name, whether cfg.lazy applies to it)
RoundGraph = Callable[[int], tuple[nx.Graph, str, bool]]
Late = Callable[[int], np.ndarray] | None  # t -> (n,) bool: nodes offline in round t beyond dropout
KindFn = Callable[[TopologyConfig, int, int], tuple[RoundGraph, bool]]  # (cfg, n, seed) -> (rounds, static?)


# ---------------------------------------------------------------- schedule kinds


def _gnp(n: int, p: float, seed: int, purpose: str, t: int) -> nx.Graph:
    return nx.gnp_random_graph(n, p, seed=int(numpy_rng(seed, purpose, t).integers(2**31 - 1)))


def _static(cfg: TopologyConfig, n: int, seed: int) -> tuple[RoundGraph, bool]:
    g = build_graph(cfg, n, seed)
    return (lambda t: (g, cfg.weights, True)), True


def _dynamic_er(cfg: TopologyConfig, n: int, seed: int) -> tuple[RoundGraph, bool]:
    check_probability("p", cfg.p)
    return (lambda t: (_gnp(n, cfg.p, seed, "dynamic_er", t), "metropolis_hastings", True)), False


def _pairwise(cfg: TopologyConfig, n: int, seed: int) -> tuple[RoundGraph, bool]:
    # Every pair meets independently: an Erdős–Rényi encounter graph; a lone pair gets MH's 1/2-1/2.
    check_probability("encounter_prob", cfg.encounter_prob)
    return (lambda t: (_gnp(n, cfg.encounter_prob, seed, "pairwise", t), "metropolis_hastings", True)), False


def _one_peer_exponential(cfg: TopologyConfig, n: int, seed: int) -> tuple[RoundGraph, bool]:
    # Round t pairs i with i XOR 2^(t mod ceil(log2 n)); a node whose partner is >= n sits out. For n a power
    # of two, log2(n) consecutive rounds multiply to exactly 11^T/n (hypercube averaging).
    cycle = max(1, (n - 1).bit_length())

    def at(t: int) -> tuple[nx.Graph, str, bool]:
        hop = 1 << (t % cycle)
        g = nx.empty_graph(n)
        g.add_edges_from((i, i ^ hop) for i in range(n) if i < (i ^ hop) < n)
        return g, "metropolis_hastings", True

    return at, False


def _periodic_full(cfg: TopologyConfig, n: int, seed: int) -> tuple[RoundGraph, bool]:
    # Rounds period-1, 2*period-1, ... average exactly (uniform on K_n is 1/n, never made lazy); others
    # gossip on the graph.
    if cfg.period < 1:
        raise ValueError(
            f"topology.period={cfg.period} must be a positive integer (rounds between full averages)"
        )
    g, full = build_graph(cfg, n, seed), nx.complete_graph(n)

    def at(t: int) -> tuple[nx.Graph, str, bool]:
        return (full, "uniform", False) if (t + 1) % cfg.period == 0 else (g, cfg.weights, True)

    return at, False


SCHEDULES: dict[str, KindFn] = {
    "static": _static,
    "dynamic_er": _dynamic_er,
    "pairwise": _pairwise,
    "one_peer_exponential": _one_peer_exponential,
    "periodic_full": _periodic_full,
}


# ---------------------------------------------------------------- the schedule object


class GraphSchedule:
    """W(t) = lazy(rule_t(modifiers(G_t))). Rounds are cached (all of them are one round when static)."""

    def __init__(
        self, cfg: TopologyConfig, n: int, seed: int, rounds: RoundGraph, static_kind: bool, late: Late = None
    ) -> None:
        self.n, self.cfg, self.seed, self._rounds, self._late = n, cfg, seed, rounds, late
        self.is_static = static_kind and cfg.link_failure == 0.0 and cfg.node_dropout == 0.0 and late is None
        self._cached = functools.lru_cache(maxsize=8)(self._compute)
        g, rule, _ = rounds(0)
        mixing_matrix(g, cfg, rule)  # a rule that is invalid on the configured graph fails now, not mid-run

    def matrix(self, t: int) -> torch.Tensor:
        return self._cached(0 if self.is_static else int(t))[0].clone()  # clone: callers may write in place

    def online(self, t: int) -> torch.Tensor:
        return self._cached(0 if self.is_static else int(t))[1].clone()

    def _compute(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, rule, lazy = self._rounds(t)
        cfg = self.cfg if lazy else dataclasses.replace(self.cfg, lazy=False)
        up = numpy_rng(self.seed, "node_dropout", t).random(self.n) >= self.cfg.node_dropout  # (n,)
        if self._late is not None:  # a node that misses the round's deadline is offline (declora.stragglers)
            up &= ~self._late(t)
        cut = [(i, j) for i, j in g.edges if not (up[i] and up[j])]
        if self.cfg.link_failure > 0.0:
            u = numpy_rng(self.seed, "link_failure", t).random((self.n, self.n))  # one draw per pair of K_n
            cut += [(i, j) for i, j in g.edges if u[min(i, j), max(i, j)] < self.cfg.link_failure]
        if cut:
            g = g.copy()
            g.remove_edges_from(cut)
            try:
                w = mixing_matrix(g, cfg, rule)  # the configured rule, if valid on what survived
            except ValueError:
                w = mixing_matrix(g, cfg, "metropolis_hastings")
        else:
            w = mixing_matrix(g, cfg, rule)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)), torch.from_numpy(up)


def build_schedule(cfg: TopologyConfig, n: int, seed: int, late: Late = None) -> Schedule:
    """The schedule named by ``cfg.schedule`` with ``cfg.link_failure`` / ``cfg.node_dropout`` on top, and
    offline too the nodes ``late(t)`` names ((n,) bool: stragglers that miss round t's deadline)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(
            f"topology.schedule={cfg.schedule!r} is not known; choose one of {sorted(SCHEDULES)}"
        )
    if n < 1:
        raise ValueError(f"a schedule needs n >= 1 nodes, got n={n}")
    check_probability("link_failure", cfg.link_failure)
    check_probability("node_dropout", cfg.node_dropout)
    rounds, static_kind = SCHEDULES[cfg.schedule](cfg, n, seed)
    return GraphSchedule(cfg, n, seed, rounds, static_kind, late)


# ---------------------------------------------------------------- diagnostics


def _lambda2(m: np.ndarray) -> float:
    """Largest eigenvalue of m on the subspace orthogonal to 1 (m's eigenvalue on 1 itself is 1)."""
    n = len(m)
    if n < 2:
        return 0.0
    proj = np.eye(n) - 1.0 / n  # (n, n) projector onto 1-perp
    return float(np.linalg.eigvalsh(proj @ m @ proj)[-1])


def expected_contraction(schedule: Schedule, samples: int = 200, batches: int = 10) -> tuple[float, float]:
    """rho = lambda_2(E[W^T W]) and its standard error: the factor by which a round shrinks disagreement
    in expectation (docs/algorithms.md: conventions). Static: (max(|lambda_2|, |lambda_n|)^2, 0.0), exact.

    Random: E is the mean over rounds 0..samples-1. The standard error is by batch means: the rounds are
    cut into ``batches`` contiguous blocks, rho is computed from each block's mean, and the error is the
    standard deviation of those block values over sqrt(batches) (deterministic: no extra randomness)."""
    if schedule.is_static:
        return (1.0 - spectral_gap(schedule.matrix(0).numpy())) ** 2, 0.0
    if samples < 2 or batches < 2:
        raise ValueError(
            f"expected_contraction needs samples >= 2 and batches >= 2, got {samples}, {batches}"
        )
    blocks = np.array_split(np.arange(samples), min(batches, samples))
    sums = []
    for block in blocks:
        total = np.zeros((schedule.n, schedule.n))  # (n, n) running sum of W^T W
        for t in block:
            w = schedule.matrix(int(t)).numpy()
            total += w.T @ w
        sums.append(total)
    expected = sum(sums) / samples  # E[W^T W]
    assert isinstance(expected, np.ndarray)  # sums holds one array per block (>= 2 blocks)
    rho = _lambda2(expected)
    per_block = np.array([_lambda2(s / len(b)) for s, b in zip(sums, blocks, strict=True)])
    return rho, float(per_block.std(ddof=1) / np.sqrt(len(blocks)))


def describe(schedule: Schedule, samples: int = 200) -> dict[str, Any]:
    """A summary of W(0) and of the mixing speed, for ``declora topology`` and run reports."""
    w = schedule.matrix(0).numpy()  # (n, n)
    g = graph_of(w)
    degrees = [int(d) for _, d in sorted(g.degree())]
    out: dict[str, Any] = {
        "nodes": schedule.n,
        "edges": g.number_of_edges(),
        "degrees": degrees,
        "min_degree": min(degrees),
        "mean_degree": float(np.mean(degrees)),
        "max_degree": max(degrees),
        "is_static": schedule.is_static,
    }
    if schedule.is_static:
        out["spectral_gap"] = spectral_gap(w)
        out["rho"] = expected_contraction(schedule, samples)[0]  # exact for a static W: (1 - gap)^2
    else:
        out["rho"], out["rho_stderr"] = expected_contraction(schedule, samples)
    out["row0"] = w[0].tolist()
    return out


def draw(schedule: Schedule, path: str | Path) -> Path:
    """Save a PNG of W(0)'s graph (edge width ~ weight, offline nodes grey). Uses the Agg canvas directly,
    so no global matplotlib backend is switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, up = schedule.matrix(0).numpy(), schedule.online(0).numpy()
    g = graph_of(w)
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pos = nx.circular_layout(g)
    widths = [1.0 + 6.0 * w[i, j] for i, j in g.edges]
    colors = ["tab:blue" if up[i] else "lightgrey" for i in g.nodes]
    nx.draw_networkx(g, pos=pos, ax=ax, width=widths, node_color=colors, font_color="white", font_size=8)
    ax.set_title(f"W(0): {g.number_of_nodes()} nodes, {g.number_of_edges()} edges")
    ax.set_axis_off()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path
