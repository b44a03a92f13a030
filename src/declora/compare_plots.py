"""Figures of a comparison: metric vs round, metric vs bytes, consensus distance vs round.

The metric is an accuracy (plotted in %) or, for ``ppl_*`` keys, a perplexity (plotted as it is).

One line per method, the mean over its runs (seeds) at each evaluated round, in the same colour in
every panel. Zeros are data: the ``local`` baseline sends 0 bytes and a one-node run has consensus 0,
so the consensus panel uses a symmetric log scale that shows 0 as 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from declora.report import display_scale, diverged_at, lower_is_better, read_metrics
from declora.run_plots import log_axis_keeping_zeros

log = logging.getLogger(__name__)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _value(record: dict, key: str) -> float:
    """The record's number for ``key``; NaN only when it is missing or not a number (0 stays 0)."""
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def curves(dirs: list[Path], metric: str) -> dict[str, np.ndarray]:
    """Mean over runs of (round, metric, bytes_total, consensus_BA) at the rounds every run that evaluated
    evaluated (a run stopped before its first evaluation has no point to add, and takes none away; nor
    does a diverged run), and
    ``"cut"``: the rounds some run evaluated that not all did (a stopped seed ends the mean curve early)."""
    per_run = []
    for d in dirs:
        records = read_metrics(d / "metrics.jsonl")
        evals = [r for r in records if r.get("event") == "eval"]
        if evals and diverged_at(records) is None:  # a diverged run is out of the table's numbers too
            per_run.append({r["round"]: r for r in evals})
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    cut = sorted(set.union(*(set(p) for p in per_run)) - set(rounds)) if per_run else []

    def mean_of(key: str) -> np.ndarray:  # over the runs that logged it (NaN where none did)
        if not rounds:  # a run stopped before its first evaluation: no curve
            return np.zeros(0)
        values = np.array([[_value(p[t], key) for p in per_run] for t in rounds]).reshape(len(rounds), -1)
        logged = np.isfinite(values)
        total = np.where(logged, values, 0.0).sum(1)
        return np.where(logged.any(1), total / np.maximum(logged.sum(1), 1), np.nan)

    return {
        "round": np.array(rounds),
        "acc": mean_of(metric),
        "bytes": mean_of("bytes_total"),
        "consensus": mean_of("consensus_BA"),
        "cut": np.array(cut),
    }


def _legend_columns(labels: list[str], width_in: float) -> int:
    """As many legend columns (at most 3) as labels this long fit side by side in ``width_in`` inches
    (fontsize 8: about 0.07 in a character, plus the marker); long grid-cell names get one column."""
    longest = max(len(x) for x in labels)
    return max(1, min(3, len(labels), int(width_in // (0.07 * longest + 0.8))))


def _legend_name(method: str, dirs: list[Path], c: dict[str, np.ndarray]) -> str:
    """The method's legend entry; a curve cut short by a stopped run says so (and the log does)."""
    if not len(c["cut"]):
        return method
    last = int(c["round"][-1]) if len(c["round"]) else 0
    log.warning(
        "%s: the curve ends at round %d, the last evaluation all %d of its runs made (some go on to round "
        "%d: the others stopped early)",
        method,
        last,
        len(dirs),
        int(c["cut"][-1]),
    )
    return f"{method} (to round {last}: not every run evaluated later)"


def comparison_figure(runs: dict[str, list[Path]], metric: str) -> Figure:
    drawn = {}  # method -> (legend name, curves): methods with an evaluation of the metric
    for method, dirs in runs.items():
        c = curves(dirs, metric)
        if np.isfinite(c["acc"]).any():
            drawn[method] = (_legend_name(method, dirs, c), c)
    width = 15.0
    ncol = _legend_columns([name for name, _ in drawn.values()], width) if drawn else 1
    # the legend goes under the panels and the figure grows by its rows, so the panels keep their height
    fig = Figure(figsize=(width, 4.3 + 0.2 * -(-len(drawn) // ncol)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_round, ax_bytes, ax_cons = fig.subplots(1, 3)
    k, label = display_scale(metric), "perplexity" if lower_is_better(metric) else "accuracy (%)"
    for i, method in enumerate(runs):
        if method not in drawn:  # no evaluation of the metric: nothing to draw (its colour stays its own)
            continue
        name, c = drawn[method]
        # one colour and marker per method, the later ones smaller: methods with equal numbers stay visible
        marker, size = MARKERS[i % len(MARKERS)], max(4.0, 9.0 - 1.0 * i)
        style = {"color": f"C{i % 10}", "marker": marker, "markersize": size, "label": name}
        ax_round.plot(c["round"], k * c["acc"], **style)
        ax_bytes.plot(c["bytes"] / 1e6, k * c["acc"], **style)
        finite = np.isfinite(c["consensus"])
        if finite.any():
            ax_cons.plot(c["round"][finite], c["consensus"][finite], **style)
    ax_round.set(title=f"{metric} vs round", xlabel="round", ylabel=label)
    ax_bytes.set(title=f"{metric} vs bytes sent", xlabel="MB sent (all nodes)", ylabel=label)
    ax_cons.set(title="product consensus distance", xlabel="round", ylabel="consensus_BA")
    log_axis_keeping_zeros(ax_cons)
    evaluated = {float(x) for line in ax_round.get_lines() for x in line.get_xdata()}
    for ax in (ax_round, ax_cons):
        if len(evaluated) <= 6:  # few evaluations: a tick at each evaluated round, not 21, 24, ... between
            ax.set_xticks(sorted(evaluated))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax_bytes.xaxis.set_major_locator(MaxNLocator(5))  # methods at near-equal bytes: few, readable ticks
    sent = np.array([x for line in ax_bytes.get_lines() for x in line.get_xdata()], dtype=float)
    sent = sent[np.isfinite(sent)]
    if len(sent) and not (sent != 0).any():  # nothing sent (local, centralized): 0 to 1 MB, not ±0.05
        ax_bytes.set_xlim(-0.03, 1)
        ax_bytes.set_xticks([0.0, 1.0])
    for ax in (ax_round, ax_bytes, ax_cons):
        ax.grid(alpha=0.3)
    handles, labels = ax_round.get_legend_handles_labels()
    if handles:  # one legend under the panels: inside them it hid points (a grid evaluated once has no lines)
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    return fig


def plot_comparison(runs: dict[str, list[Path]], path: Path, metric: str) -> None:
    comparison_figure(runs, metric).savefig(path, dpi=110)
