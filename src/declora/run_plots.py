"""A run's curves (curves.png): accuracy or perplexity, training loss and consensus distances, each
against the round, from the records of its metrics.jsonl (declora.report reads and summarizes them)."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator

from declora.report import (
    CONSENSUS_KEYS,
    STD_KEY,
    VALIDATION,
    accuracy_keys,
    config_headline,
    display_scale,
    events_of,
    lower_is_better,
    number_at,
)


def _series(evals: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(rounds, values) of one key over the evaluations, skipping gaps."""
    xs, ys = [], []
    for r in evals:
        x, y = number_at(r, "round"), number_at(r, key)
        if x is not None and y is not None and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _shade_std(ax: Any, evals: list[dict[str, Any]], key: str, color: str) -> None:
    """Shade mean ± std over nodes at the evaluations that logged both."""
    xs, lo, hi = [], [], []
    for r in evals:
        x, y, s = number_at(r, "round"), number_at(r, key), number_at(r, STD_KEY)
        if x is not None and y is not None and s is not None:
            xs.append(x)
            lo.append(100 * (y - s))
            hi.append(100 * (y + s))
    if xs:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{key} ± std")


LINE_STYLES = (
    {"linestyle": "-", "marker": "o", "markersize": 4, "linewidth": 2.2},
    {"linestyle": "--", "marker": "x", "markersize": 6, "linewidth": 1.4},
    {"linestyle": ":", "marker": "s", "markersize": 3, "linewidth": 1.6},
    {"linestyle": "-.", "marker": "^", "markersize": 4, "linewidth": 1.2},
)


def _plot_accuracy(ax: Any, evals: list[dict[str, Any]], headline: str | None = None) -> None:
    # of the validation scores, the one a round is chosen by (val_<eval.headline>), beside the test ones
    keys = [k for k in accuracy_keys(evals) if not k.startswith(VALIDATION) or k == f"{VALIDATION}{headline}"]
    perplexities = [k for k in keys if lower_is_better(k)]
    if perplexities:  # a causal LM run: perplexity (an instruction run's em_* are in its table)
        keys = perplexities
    scale = display_scale(keys[0]) if keys else 100
    for j, key in enumerate(keys):
        xs, ys = _series(evals, key)
        # The two consensus models often coincide: distinct dashes and markers keep both lines visible.
        (line,) = ax.plot(xs, [scale * y for y in ys], label=key, **LINE_STYLES[j % len(LINE_STYLES)])
        if key == "acc_node_mean":
            _shade_std(ax, evals, key, line.get_color())
    if perplexities:
        ax.set(title="Perplexity", xlabel="round", ylabel="perplexity")
    else:
        ax.set(title="Accuracy", xlabel="round", ylabel="accuracy (%)")


def _plot_loss(ax: Any, records: list[dict[str, Any]]) -> None:
    xs, ys = _series(events_of(records, "round", "eval"), "train_loss")
    if xs:
        ax.plot(xs, ys, marker=".", label="train_loss (mean over nodes)")
    ax.set(title="Training loss", xlabel="round", ylabel="loss")


def _plot_consensus(ax: Any, evals: list[dict[str, Any]]) -> None:
    for key in CONSENSUS_KEYS[:3]:
        xs, ys = _series(evals, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set(title="Consensus distance", xlabel="round", ylabel="disagreement (squared Frobenius)")
    log_axis_keeping_zeros(ax)


# Consensus distances this far below the largest one in the panel are rounding (an average of equal
# float32 tensors differs from them by ~1e-16), not disagreement: drawn near 0, they do not stretch a log
# axis over ten empty decades.
ROUNDING_DECADES = 8


def log_axis_keeping_zeros(ax: Any) -> None:
    """A log y axis for curves of values >= 0 that spread over decades (consensus distances); where a
    curve touches 0 (exact consensus, a one-node run) or falls to rounding (``ROUNDING_DECADES`` below the
    largest value), symlog, so that 0 is drawn as 0 and not dropped; all zeros stay on a linear axis
    that starts at 0."""
    ys = np.array([y for line in ax.get_lines() for y in line.get_ydata()], dtype=float)
    ys = ys[np.isfinite(ys)]
    positive = ys[ys > 0]
    if not len(positive):
        if len(ys):
            # all exact 0: a line just above the floor and ticks 0 and 1, not an axis from -0.05 to 0.05
            ax.set_ylim(-0.03, 1)
            ax.set_yticks([0.0, 1.0])
        return
    floor = float(positive.max()) * 10.0**-ROUNDING_DECADES
    smallest = float(positive[positive >= floor].min())
    if not (ys < floor).any():
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(numticks=6))  # a few decades labelled, not every one
        return
    ax.set_yscale("symlog", linthresh=smallest)
    lo, hi = int(np.floor(np.log10(smallest))), int(np.ceil(np.log10(float(positive.max()))))
    step = max(1, -(-(hi - lo) // 5))  # at most about six decades labelled, and 0
    ax.set_yticks([0.0, *(10.0**k for k in range(hi, lo - 1, -step))])


def run_figure(records: list[dict[str, Any]]) -> Figure:
    """Accuracy (or perplexity) vs round, training loss vs round, consensus distances vs round (log).

    A bare ``Figure`` (Agg canvas) rather than pyplot: it needs no display and leaves the process-wide
    matplotlib state alone.
    """
    evals = events_of(records, "eval")
    fig = Figure(figsize=(15, 5.0), layout="constrained")
    ax_acc, ax_loss, ax_cons = fig.subplots(1, 3)
    _plot_accuracy(ax_acc, evals, config_headline(records))
    _plot_loss(ax_loss, records)
    _plot_consensus(ax_cons, evals)
    # One round axis for the three panels: a run evaluated once (the default) shows its point at the end
    # of the loss curve's rounds, not alone in the middle of an axis of its own.
    last = max((r["round"] for r in records if r.get("event") in ("round", "eval")), default=0)
    for ax in (ax_acc, ax_loss, ax_cons):
        if last:
            ax.set_xlim(0, last + max(0.5, 0.03 * last))
        if ax.lines:
            # under the panel: inside it, the legend hid the last points or the spread band
            ax.legend(
                fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_run(records: list[dict[str, Any]], path: str | Path) -> None:
    """RUN_DIR/curves.png (``run_figure``)."""
    # an explicit format: the atomic writer's path ends in .tmp
    run_figure(records).savefig(path, dpi=120, format="png")
    # Drawing leaves a garbage cycle (exceptions matplotlib raises and catches, whose tracebacks hold the
    # caller's frames, among them the one that holds the Experiment): freed now, a dropped Experiment's
    # base model goes with its last reference instead of waiting for a full collection.
    gc.collect()
