"""Figures of a comparison: metric vs round, metric vs bytes, consensus distance vs round.

The metric is an accuracy (plotted in %) or, for ``ppl_*`` keys, a perplexity (plotted as it is).

One line per method, the mean over its runs (seeds) at each evaluated round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from declora.report import display_scale, lower_is_better, read_metrics


def _curves(dirs: list[Path], metric: str) -> dict[str, np.ndarray]:
    """Mean over runs of (round, metric, bytes_total, consensus_BA) at the rounds every run evaluated."""
    per_run = []
    for d in dirs:
        evals = [r for r in read_metrics(d / "metrics.jsonl") if r.get("event") == "eval"]
        per_run.append({r["round"]: r for r in evals})
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []

    def mean_of(key: str) -> np.ndarray:
        return np.array([np.nanmean([float(p[t].get(key) or np.nan) for p in per_run]) for t in rounds])

    return {
        "round": np.array(rounds),
        "acc": mean_of(metric),
        "bytes": mean_of("bytes_total"),
        "consensus": mean_of("consensus_BA"),
    }


def plot_comparison(runs: dict[str, list[Path]], path: Path, metric: str) -> None:
    fig = Figure(figsize=(15, 4.5))
    FigureCanvasAgg(fig)
    ax_round, ax_bytes, ax_cons = fig.subplots(1, 3)
    k, label = display_scale(metric), "perplexity" if lower_is_better(metric) else "accuracy (%)"
    for method, dirs in runs.items():
        c = _curves(dirs, metric)
        if not len(c["round"]):
            continue
        ax_round.plot(c["round"], k * c["acc"], marker="o", label=method)
        ax_bytes.plot(c["bytes"] / 1e6, k * c["acc"], marker="o", label=method)
        positive = c["consensus"] > 0
        if positive.any():
            ax_cons.plot(c["round"][positive], c["consensus"][positive], marker="o", label=method)
    ax_round.set(title=f"{metric} vs round", xlabel="round", ylabel=label)
    ax_bytes.set(title=f"{metric} vs bytes sent", xlabel="MB sent (all nodes)", ylabel=label)
    ax_cons.set(title="product consensus distance", xlabel="round", ylabel="consensus_BA", yscale="log")
    for ax in (ax_round, ax_bytes, ax_cons):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
