"""Tables and figures of the fidelity suite (``make fidelity``) into docs/results.md.

For each grid configs/fidelity/C*.yaml that has run, this writes between the markers
``<!-- fidelity:CN:begin -->`` and ``<!-- fidelity:CN:end -->`` of docs/results.md: the grid's wall time
(from runs/fidelity/times.log), a table of final values (mean ± std over seeds) of every evaluation mode,
the product consensus distance and the bytes sent, and a link to the grid's figure, re-drawn small into
docs/figures/fidelity/CN.png. The text outside the markers (the verdicts) is left as it is.

    python benchmarks/fidelity.py [runs/fidelity]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from declora.compare import expand, group_cells, load_grid
from declora.compare_plots import plot_comparison
from declora.compare_table import final_by_seed
from declora.paired import is_exact, paired_difference, seeds_to_decide, verdict
from declora.report import best_final, diverged_at, planned_rounds, read_metrics, run_config, stopped_early

COLUMNS = [  # key in the eval records, header, scale
    ("acc_node_mean", "node mean %", 100),
    ("acc_avg_factors", "avg factors %", 100),
    ("acc_avg_product", "avg product %", 100),
    ("acc_server", "server %", 100),
    ("consensus_BA", "consensus_BA", 1),
    ("bytes_total", "MB sent", 1e-6),
    ("wall_s", "wall s", 1),
]


def _p(p: float, name: str) -> str:
    return f"topology.p={p},algorithm.name={name}"


def _frozen_a_vs_dec_lora(suffix: str, dec_lora: str) -> list[tuple[str, str, str, str, str, float]]:
    """C5's claim: each method that freezes A costs some accuracy against Dec-LoRA, and little (2 points)."""
    return [
        (f"{label}{suffix} − Dec-LoRA", f"algorithm.name={name}", dec_lora, "acc_avg_factors", kind, m)
        for name, label in (("dlora_fa", "DLoRA-FA"), ("ffa_lora", "FFA-LoRA"))
        for kind, m in (("less", 0.0), ("equivalent", 2.0))
    ]


# C3 and C3b judge this one contrast the same way (C3b reruns it on more seeds)
_DECAF_VS_LOCAL = (
    "DeCAF − local",
    "algorithm.name=decaf",
    "algorithm.name=local",
    "acc_node_mean",
    "greater",
    0.0,
)


# What each claim asserts, as paired contrasts A - B over seeds (declora.paired): (label, A, B, metric,
# kind, margin). A method is a grid cell's label; "C1b:..." takes it from another grid. Margins (in the
# metric's display unit) say what "comparable", "close" and "a small cost" mean here: 2 points of
# accuracy, and 1 point for the quantized base, whose paper difference is 0.05.
CONTRASTS: dict[str, list[tuple[str, str, str, str, str, float]]] = {
    # The label-skewed nodes hold 2,860 of the 3,200 reviews (the proportions partition leaves the rest to
    # no node), so their centralized references (C1d, C1e) train on those 2,860; the IID ones (C1b, C1c)
    # on all 3,200, which the IID nodes hold.
    "C1": [
        (
            f"{part}: Dec-LoRA − centralized, same batch ({ref})",
            f"partition.kind={part},algorithm.name=dec_lora",
            f"{ref}:algorithm.name=centralized,train.batch_size=8",
            "acc_avg_factors",
            "equivalent",
            2.0,
        )
        for part, ref in (("iid", "C1c"), ("proportions", "C1e"))
    ]
    + [
        (
            f"{part}: Dec-LoRA − centralized, same steps ({ref})",
            f"partition.kind={part},algorithm.name=dec_lora",
            f"{ref}:algorithm.name=centralized,train.batch_size=80",
            "acc_avg_factors",
            "equivalent",
            2.0,
        )
        for part, ref in (("iid", "C1b"), ("proportions", "C1d"))
    ],
    "C2": [
        (
            f"p = {p}: TAD-LoRA − Dec-LoRA",
            _p(p, "tad_lora"),
            _p(p, "dec_lora"),
            "acc_node_mean",
            "greater",
            0.0,
        )
        for p in (0.5, 0.1, 0.02)
    ]
    + [
        (f"p = {p}: TAD-LoRA − Dec-LoRA", _p(p, "tad_lora"), _p(p, "dec_lora"), "consensus_BA", "less", 0.0)
        for p in (0.5, 0.1, 0.02)
    ],
    "C3": [
        _DECAF_VS_LOCAL,
        ("DLoRA − local", "algorithm.name=dec_lora", "algorithm.name=local", "acc_node_mean", "greater", 0.0),
        (
            "DeCAF − FedAvg",
            "algorithm.name=decaf",
            "algorithm.name=fedavg",
            "acc_node_mean",
            "equivalent",
            2.0,
        ),
        (
            "DLoRA − FedAvg",
            "algorithm.name=dec_lora",
            "algorithm.name=fedavg",
            "acc_node_mean",
            "equivalent",
            2.0,
        ),
        ("DeCAF − DLoRA", "algorithm.name=decaf", "algorithm.name=dec_lora", "consensus_BA", "less", 0.0),
    ],
    # C3b: C3's undecided contrast again, on more seeds
    "C3b": [_DECAF_VS_LOCAL],
    "C4": [
        ("FSLoRA − HetLoRA", "algorithm.name=fslora", "algorithm.name=hetlora", "acc_server", "greater", 0.0),
        (
            "FSLoRA − FlexLoRA",
            "algorithm.name=fslora",
            "algorithm.name=flexlora",
            "acc_server",
            "greater",
            0.0,
        ),
        (  # equal within FSLoRA's int32 sketch indices (8 KB over 40 rounds)
            "FSLoRA − HetLoRA",
            "algorithm.name=fslora",
            "algorithm.name=hetlora",
            "bytes_total",
            "equivalent",
            0.1,
        ),
    ],
    "C5": _frozen_a_vs_dec_lora("", "algorithm.name=dec_lora"),
    # C5b: the frozen-A family at its own learning rate against C5's Dec-LoRA at the shared one
    "C5b": _frozen_a_vs_dec_lora(" (own rate)", "C5:algorithm.name=dec_lora"),
    "C6": [
        (
            f"{q} − fp32 base",
            f"model.base_quantization={q}",
            "model.base_quantization=none",
            "acc_avg_factors",
            "equivalent",
            1.0,
        )
        for q in ("int8", "nf4")
    ],
}
CLAIM_WORDS = {"greater": "A > B", "less": "A < B", "equivalent": "A ≈ B within ±{m:g}"}  # no pipes: a table


def unit(metric: str) -> float:
    return 1e-6 if metric.startswith("bytes") else 1.0 if metric.startswith("consensus") else 100.0


def contrast_table(claim: str, all_runs: dict[str, dict[str, list[Path]]]) -> str:
    """The claim's paired contrasts: per-seed differences, mean ± SE, the 95% t-interval, the verdict, the
    verdict when the claim's m contrasts are corrected together (Bonferroni: each interval at 1 − 0.05/m)
    and the seeds that would decide it at the measured spread."""
    contrasts = []
    for label, a, b, metric, kind, margin in CONTRASTS.get(claim, []):
        dirs = []
        for spec in (a, b):
            grid, _, method = spec.rpartition(":")
            dirs.append(all_runs.get(grid or claim, {}).get(method, []))
        finals = [final_by_seed(d, metric) for d in dirs]
        if len(set(finals[0]) & set(finals[1])) >= 2:
            contrasts.append((label, metric, kind, margin, finals))
    m = sum(not is_exact(metric) for _, metric, *_ in contrasts)  # bytes are exact: no chance to correct
    lines = [
        "| contrast (A − B) | metric | claim | per seed | mean ± SE | 95% interval | verdict "
        f"| verdict, {m} corrected together | seeds to decide |",
        "|---|---|---|---|---:|---|---|---|---:|",
    ]
    for label, metric, kind, margin, finals in contrasts:
        d = paired_difference(*finals, exact=is_exact(metric))
        together = paired_difference(*finals, exact=is_exact(metric), family=max(m, 1))
        k = unit(metric)
        spec = "+.3g" if metric.startswith("consensus") else "+.2f"
        se_spec = ".2g" if metric.startswith("consensus") else ".2f"  # accuracy: two decimals, like the mean

        def fmt_(x: float, k: float = k, spec: str = spec) -> str:
            return f"{k * x:{spec}}"

        need = seeds_to_decide(d, kind, margin / k)
        per_seed = ", ".join(map(fmt_, d.diffs))
        interval = "none (no spread)" if np.isnan(d.lo) else f"{fmt_(d.lo)} to {fmt_(d.hi)}"
        lines.append(
            f"| {label} | {metric} | {CLAIM_WORDS[kind].format(m=margin)} | {per_seed} | "
            f"{fmt_(d.mean)} ± {abs(k * d.se):{se_spec}} | {interval} | "
            f"**{verdict(d, kind, margin / k)}** | {verdict(together, kind, margin / k)} | "
            f"{need if need is not None else '–'} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def short(method: str) -> str:
    """``topology.p=0.1,algorithm.name=tad_lora`` -> ``p=0.1, tad_lora``."""
    parts = []
    for part in method.split(","):
        key, _, value = part.partition("=")
        parts.append(value if key == "algorithm.name" else f"{key.split('.')[-1]}={value}")
    return ", ".join(parts)


def fmt(values: list[float], scale: float) -> str:
    arr = np.asarray([v for v in values if v is not None], dtype=float) * scale
    if not len(arr):
        return "–"
    digits = 2 if scale != 1 or np.abs(arr).max() < 100 else 0
    if np.abs(arr).max() < 0.01 and arr.any():
        return f"{arr.mean():.2e} ± {arr.std():.1e}"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}" if len(arr) > 1 else f"{arr[0]:.{digits}f}"


def finished_evals(run_dir: Path) -> list[dict]:
    """A run's evaluations, if it ran all its rounds without diverging (else none: a diverged or stopped
    run's last evaluation is of another round than the others', no final to average with them)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    stopped = stopped_early(records, planned_rounds(run_config(run_dir)))
    if diverged_at(records) is not None or stopped is not None:
        return []
    return [r for r in records if r.get("event") == "eval"]


def grid_table(runs: dict[str, list[Path]], metric: str) -> str:
    """Mean ± std over each method's finished runs (the seeds column counts them) of its best and final
    numbers; a diverged or unfinished run is left out, as in declora compare's table."""
    evals = {method: [e for d in dirs if (e := finished_evals(d))] for method, dirs in runs.items()}
    finals = {method: [e[-1] for e in es] for method, es in evals.items()}
    cols = [c for c in COLUMNS if any(f.get(c[0]) is not None for fs in finals.values() for f in fs)]
    head = ["method", "seeds", f"**{metric}** best %"] + [h for _, h, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for method in runs:
        best = [
            best_final([r for r in e if r.get(metric) is not None], metric)["best"] for e in evals[method]
        ]
        cells = [fmt([f.get(k) for f in finals[method]], s) for k, _, s in cols]
        lines.append(
            f"| {short(method)} | {len(finals[method])} | {fmt(best, 100)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def grid_times(log: Path) -> tuple[dict[str, int], list[str]]:
    """Seconds per grid, summed over every `make fidelity` logged (a rerun skips finished cells), and
    the first start and the last end line (date, uptime)."""
    times: dict[str, int] = {}
    starts: list[str] = []
    ends: list[str] = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line.startswith("start"):
            starts.append(line)
        elif line.startswith("end"):
            ends.append(line)
        elif line.startswith("grid "):
            _, name, secs = line.split()
            times[name] = times.get(name, 0) + int(secs)
    return times, starts[:1] + ends[-1:]


def summary(times: dict[str, int], marks: list[str], runs: dict[str, int]) -> str:
    lines = ["| grid | runs | wall time (min) |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {runs.get(name, 0)} | {secs / 60:.1f} |" for name, secs in sorted(times.items())]
    total = sum(runs.get(name, 0) for name in times)
    lines.append(f"| **whole suite** | {total} | **{sum(times.values()) / 60:.1f}** |")
    return "\n".join([*lines, "", *(f"`{m}`  " for m in marks)])


def small_figure(runs: dict[str, list[Path]], metric: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(runs, path, metric)
    img = Image.open(path).convert("RGB")
    img = img.resize((1100, round(img.height * 1100 / img.width)), Image.LANCZOS)
    # octree, not the default median cut: on a mostly white figure the median cut spent its colours on
    # greys and merged six methods' lines into three colours; octree keeps every line's colour
    img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def replace_block(text: str, name: str, block: str) -> str:
    begin, end = f"<!-- fidelity:{name}:begin -->", f"<!-- fidelity:{name}:end -->"
    if begin not in text:
        text += f"\n## {name}\n\n{begin}\n{end}\n"
    start, stop = text.index(begin) + len(begin), text.index(end)
    return f"{text[:start]}\n{block}\n{text[stop:]}"


def main(root: Path = Path("runs/fidelity"), doc: Path = Path("docs/results.md")) -> None:
    text = doc.read_text() if doc.is_file() else "# Fidelity suite\n"
    times, marks = grid_times(root / "times.log")
    grids = {
        f.stem.split("_")[0]: (f, load_grid(f)) for f in sorted(Path("configs/fidelity").glob("C*.yaml"))
    }
    # runs per grid as the grid defines them, so the summary holds for grids whose folders are elsewhere
    counts = {f.stem: len(expand(grid)) for f, grid in grids.values()}
    all_runs = {}  # claim (C1, C1b, C2, ...) -> method -> finished run folders
    for claim, (_, grid) in grids.items():
        cells = group_cells(expand(grid))
        all_runs[claim] = {m: [d for d in dirs if (d / "report.md").is_file()] for m, dirs in cells.items()}
        all_runs[claim] = {m: d for m, d in all_runs[claim].items() if d}
    if not any(all_runs.values()):  # a clone without the runs: the doc's tables stay as they are
        raise SystemExit(f"no finished run of configs/fidelity/C*.yaml (make fidelity): {doc} left as it is")
    for claim, (grid_file, grid) in grids.items():
        runs = all_runs[claim]
        if not runs:
            continue
        figure = Path("docs/figures/fidelity") / f"{claim}.png"
        small_figure(runs, grid.metric, figure)
        secs = times.get(grid_file.stem)
        contrasts = contrast_table(claim, all_runs)
        # a reference grid (C1b, C1c) has no contrasts of its own: the claim's block holds them
        contrast_lines = [
            "Paired contrasts over seeds (same seed = same partition, batches and test set; 95% "
            "t-interval; a verdict only where it excludes the other answer):",
            "",
            contrasts,
            "",
        ]
        block = "\n".join(
            [
                f"`declora compare {grid_file}`: {sum(map(len, runs.values()))} runs, "
                + (f"{secs / 60:.1f} min wall time." if secs is not None else "wall time not logged."),
                "Final values (last evaluated round), mean ± std over seeds; best = best over rounds.",
                "",
                grid_table(runs, grid.metric),
                "",
                *(contrast_lines if contrasts else []),
                f"![{claim}](figures/fidelity/{claim}.png)",
            ]
        )
        text = replace_block(text, claim, block)
    if times:
        text = replace_block(text, "summary", summary(times, marks, counts))
    else:
        print(f"no {root / 'times.log'}: the table of wall times is left as it is")
    doc.write_text(text)
    print(f"wrote {doc} and docs/figures/fidelity/")


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/fidelity"))
