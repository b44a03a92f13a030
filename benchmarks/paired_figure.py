"""Per-seed paired differences A − B of a final metric against several references, in one figure.

    python benchmarks/paired_figure.py OUT.png METRIC MARGIN A_DIRS -- LABEL=B_DIRS [LABEL=B_DIRS ...]

Each *_DIRS is a comma-separated list of folders whose subfolders are runs (their config.yaml gives the
seed; declora.compare_table.final_by_seed reads the finals). For each reference, one column of points
(one per seed both sides finished), its mean with the 95 % t-interval (declora.paired), and the ± MARGIN
band of an equivalence claim. Used for C1's label-skew references in docs/results.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from declora.compare_table import final_by_seed  # noqa: E402
from declora.paired import paired_difference  # noqa: E402


def _runs(spec: str) -> list[Path]:
    folders = [Path(folder) for folder in spec.split(",")]
    return [run for f in folders for run in sorted(f.iterdir()) if (run / "metrics.jsonl").is_file()]


def main(argv: list[str]) -> None:
    if len(argv) < 6 or argv[4] != "--":  # also --help
        raise SystemExit(__doc__)
    out, metric, margin, a_spec, _, *refs = argv
    a = final_by_seed(_runs(a_spec), metric)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(refs), 3.6))
    ax.axhspan(-float(margin), float(margin), color="0.92", zorder=0, label=f"± {margin} (equivalence)")
    ax.axhline(0, color="0.5", lw=0.8)
    for k, ref in enumerate(refs):
        label, _, spec = ref.partition("=")
        b = final_by_seed(_runs(spec), metric)
        seeds = sorted(set(a) & set(b))
        diffs = {s: 100 * (a[s] - b[s]) for s in seeds}
        pd = paired_difference(diffs, {s: 0.0 for s in seeds})
        ax.scatter([k + (i % 5 - 2) * 0.04 for i in range(len(seeds))], list(diffs.values()), s=14, alpha=0.7)
        interval = [[pd.mean - pd.lo], [pd.hi - pd.mean]]
        ax.errorbar(k + 0.3, pd.mean, yerr=interval, fmt="o", color="k", capsize=4)
        ax.text(k + 0.36, pd.mean, f"{pd.mean:+.2f}\n({pd.lo:+.2f} to {pd.hi:+.2f})", va="center", fontsize=7)
        print(f"{label}: {len(seeds)} seeds, {pd.mean:+.2f} ± {pd.se:.2f} ({pd.lo:+.2f} to {pd.hi:+.2f})")
    ax.set_xticks(range(len(refs)), [r.partition("=")[0] for r in refs], fontsize=8)
    ax.set_xlim(-0.5, len(refs) - 0.1)
    ax.set_ylabel(f"{metric}: A − B per seed (points)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
