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
from declora.report import read_metrics

COLUMNS = [  # key in the eval records, header, scale
    ("acc_node_mean", "node mean %", 100),
    ("acc_avg_factors", "avg factors %", 100),
    ("acc_avg_product", "avg product %", 100),
    ("acc_server", "server %", 100),
    ("consensus_BA", "consensus_BA", 1),
    ("bytes_total", "MB sent", 1e-6),
    ("wall_s", "wall s", 1),
]


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


def grid_table(runs: dict[str, list[Path]], metric: str) -> str:
    finals: dict[str, list[dict]] = {}
    for method, dirs in runs.items():
        evals = [[r for r in read_metrics(d / "metrics.jsonl") if r.get("event") == "eval"] for d in dirs]
        finals[method] = [e[-1] for e in evals if e]
    cols = [c for c in COLUMNS if any(f.get(c[0]) is not None for fs in finals.values() for f in fs)]
    head = ["method", "seeds", f"**{metric}** best %"] + [h for _, h, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for method, dirs in runs.items():
        best = [
            max(r[metric] for r in read_metrics(d / "metrics.jsonl") if r.get(metric) is not None)
            for d in dirs
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
    lines.append(f"| **whole suite** | {sum(runs.values())} | **{sum(times.values()) / 60:.1f}** |")
    return "\n".join([*lines, "", *(f"`{m}`  " for m in marks)])


def small_figure(runs: dict[str, list[Path]], metric: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(runs, path, metric)
    img = Image.open(path).convert("RGB")
    img = img.resize((1100, round(img.height * 1100 / img.width)), Image.LANCZOS)
    img.quantize(colors=64).save(path, optimize=True)


def replace_block(text: str, name: str, block: str) -> str:
    begin, end = f"<!-- fidelity:{name}:begin -->", f"<!-- fidelity:{name}:end -->"
    if begin not in text:
        text += f"\n## {name}\n\n{begin}\n{end}\n"
    start, stop = text.index(begin) + len(begin), text.index(end)
    return f"{text[:start]}\n{block}\n{text[stop:]}"


def main(root: Path = Path("runs/fidelity"), doc: Path = Path("docs/results.md")) -> None:
    text = doc.read_text() if doc.is_file() else "# Fidelity suite\n"
    times, marks = grid_times(root / "times.log")
    counts: dict[str, int] = {}
    for grid_file in sorted(Path("configs/fidelity").glob("C*.yaml")):
        claim = grid_file.stem.split("_")[0]  # C1, C1b, C2, ...
        grid = load_grid(grid_file)
        runs = {
            m: [d for d in dirs if (d / "report.md").is_file()]
            for m, dirs in group_cells(expand(grid)).items()
        }
        runs = {m: d for m, d in runs.items() if d}
        if not runs:
            continue
        figure = Path("docs/figures/fidelity") / f"{claim}.png"
        small_figure(runs, grid.metric, figure)
        secs = times.get(grid_file.stem)
        counts[grid_file.stem] = sum(map(len, runs.values()))
        block = "\n".join(
            [
                f"`declora compare {grid_file}`: {sum(map(len, runs.values()))} runs, "
                + (f"{secs / 60:.1f} min wall time." if secs is not None else "wall time not logged."),
                "Final values (last evaluated round), mean ± std over seeds; best = best over rounds.",
                "",
                grid_table(runs, grid.metric),
                "",
                f"![{claim}](figures/fidelity/{claim}.png)",
            ]
        )
        text = replace_block(text, claim, block)
    text = replace_block(text, "summary", summary(times, marks, counts))
    doc.write_text(text)
    print(f"wrote {doc} and docs/figures/fidelity/")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/fidelity"))
