"""The table of a grid's runs: per method the best and final value of the ranked metric over seeds, bytes
sent and to a target, and a table of differences paired by seed (``comparison.md``, ``comparison.csv``,
``comparison.png``). ``declora report`` writes the same table for run folders given by hand."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from declora.config import read_yaml
from declora.report import (
    PRIVACY_KEY,
    best_final,
    display_scale,
    diverged_at,
    lower_is_better,
    planned_rounds,
    read_metrics,
    run_config,
    selected_by_validation,
    stopped_early,
)


def reaches(metric: str, value: float, target: float) -> bool:
    """Whether ``value`` of ``metric`` is at the target or better (a perplexity at or below it)."""
    return value <= target if lower_is_better(metric) else value >= target


def run_summary(records: list[dict[str, Any]], metric: str, target: float | None) -> dict[str, float]:
    """Best (highest accuracy, lowest perplexity), final, bytes sent, bytes at the first evaluation that
    reached the target (NaN if none did) and wall time of one run's evaluations of ``metric``."""
    evals = [r for r in records if r.get("event") == "eval" and r.get(metric) is not None]
    if not evals:
        return {}
    hits = [r["bytes_total"] for r in evals if target is not None and reaches(metric, r[metric], target)]
    reached = hits[0] if hits else math.nan
    spent = [r[PRIVACY_KEY] for r in records if isinstance(r.get(PRIVACY_KEY), (int, float))]
    chosen = selected_by_validation(evals, metric)  # data.validation_fraction: the round it chose
    return {
        "best": best_final(evals, metric)["best"],
        "final": evals[-1][metric],
        "bytes_total": evals[-1]["bytes_total"],
        "bytes_to_target": reached,
        "wall_s": evals[-1]["wall_s"],
        "epsilon": spent[-1] if spent else math.nan,  # a private run's largest epsilon spent, at the end
        "chosen": math.nan if chosen is None or chosen["value"] is None else chosen["value"],
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof 0) of the finite values; NaN when there are none."""
    arr = np.asarray(xs, dtype=float)
    arr = arr[np.isfinite(arr)]
    return (float(arr.mean()), float(arr.std())) if len(arr) else (math.nan, math.nan)


SUMMARY_KEYS = ("best", "final", "bytes_total", "bytes_to_target", "wall_s")


def comparison_rows(runs: dict[str, list[Path]], metric: str, target: float | None) -> list[dict[str, Any]]:
    """One row per method: mean and population std over its runs (seeds) of each summary number, over the
    runs that logged ``metric`` (``runs`` of ``of``; a method with none keeps its row, all NaN).
    ``bytes_to_target`` is the mean over the ``reached`` runs that reached the target."""
    rows = []
    for method, dirs in runs.items():
        records = [read_metrics(d / "metrics.jsonl") for d in dirs]
        # a diverged run's last evaluation is from before its NaN: not a final to average with the others
        diverged = [diverged_at(r) is not None for r in records]
        kept = [r for r, bad in zip(records, diverged, strict=True) if not bad]
        # a final of Inf or NaN is left out with its run: best, final and runs then cover the same runs
        summaries = [s for r in kept if (s := run_summary(r, metric, target)) and math.isfinite(s["final"])]
        row: dict[str, Any] = {"method": method, "runs": len(summaries), "of": len(dirs)}
        planned = [planned_rounds(run_config(d)) for d in dirs]
        row["unfinished"] = sum(
            stopped_early(r, n) is not None and not bad
            for r, n, bad in zip(records, planned, diverged, strict=True)
        )
        for key in SUMMARY_KEYS:
            row[key], row[f"{key}_std"] = _mean_std([s[key] for s in summaries])
        row["reached"] = sum(not math.isnan(s["bytes_to_target"]) for s in summaries)
        row["diverged"] = sum(diverged)  # the CSV columns after the first ones: they keep their places
        row["epsilon"], row["epsilon_std"] = _mean_std([s["epsilon"] for s in summaries])  # NaN: not private
        row["chosen"], row["chosen_std"] = _mean_std([s["chosen"] for s in summaries])  # NaN: no validation
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]], metric: str, target: float | None) -> str:
    k = display_scale(metric)  # accuracies in %, perplexities as they are

    def acc(r: dict[str, Any], key: str) -> str:  # one run has no spread to show (not a spread of 0)
        spread = f" ± {k * r[key + '_std']:.2f}" if r["runs"] > 1 else ""
        return f"{k * r[key]:.2f}{spread}"

    def to_target(r: dict[str, Any]) -> str:
        if target is None:
            return "n/a"
        if not r["reached"]:
            return "not reached"
        mb = f"{r['bytes_to_target'] / 1e6:.2f}"
        return mb if r["reached"] == r["runs"] else f"{mb} ({r['reached']} of {r['runs']} runs)"

    if lower_is_better(metric):
        what = f"Perplexity: {metric}, best = lowest"
        target_txt = f"{target:.2f} (first evaluation at or below it)" if target is not None else "n/a"
    else:
        what = f"Accuracy: {metric} in %"
        target_txt = f"{100 * target:.1f}%" if target is not None else "n/a"
    private = any(math.isfinite(r.get("epsilon", math.nan)) for r in rows)  # a privacy/utility comparison
    eps_head, eps_rule, eps_none = (" ε spent |", "---:|", " – |") if private else ("", "", "")
    validated = any(math.isfinite(r.get("chosen", math.nan)) for r in rows)  # runs with validation rows
    val_head, val_rule, val_none = (" chosen |", "---:|", " – |") if validated else ("", "", "")

    def chosen(r: dict[str, Any]) -> str:
        return f" {acc(r, 'chosen')} |" if math.isfinite(r["chosen"]) else " no validation rows |"

    def eps(r: dict[str, Any]) -> str:
        if not math.isfinite(r["epsilon"]):
            return " not private |"
        return (
            f" {r['epsilon']:.2f} |" if r["runs"] == 1 else f" {r['epsilon']:.2f} ± {r['epsilon_std']:.2f} |"
        )

    lines = [
        f"{what} (mean ± population std over runs); MB = 1e6 bytes; target {target_txt}.",
        "",
        "| method | runs | best | final | MB sent | MB to target | wall s |" + val_head + eps_head,
        "|---|---:|---:|---:|---:|---:|---:|" + val_rule + eps_rule,
    ]
    for r in rows:
        runs = str(r["runs"]) if r["runs"] == r["of"] else f"{r['runs']} of {r['of']}"
        if r["unfinished"]:
            runs += f" ({r['unfinished']} not finished)"
        if r["diverged"]:
            runs += f" ({r['diverged']} diverged)"
        if not r["runs"] and r["diverged"] == r["of"]:
            lines.append(
                f"| {r['method']} | {runs} | diverged (NaN or Inf) | – | – | – | – |" + val_none + eps_none
            )
            continue
        if not r["runs"]:
            lines.append(
                f"| {r['method']} | {runs} | no evaluation of {metric} | – | – | – | – |"
                + val_none
                + eps_none
            )
            continue
        lines.append(
            f"| {r['method']} | {runs} | {acc(r, 'best')} | {acc(r, 'final')} | "
            f"{r['bytes_total'] / 1e6:.2f} | {to_target(r)} | {r['wall_s']:.1f} |"
            + (chosen(r) if validated else "")
            + (eps(r) if private else "")
        )
    if validated:
        lines += [
            "",
            f"chosen: {metric} at the round its validation rows chose (val_{metric}), the honest best; "
            "best is the best over rounds on the test rows themselves.",
        ]
    if private:
        lines += ["", "ε spent: the largest epsilon any node spent by the end (privacy_epsilon_max)."]
    if any(r["runs"] + r["diverged"] < r["of"] for r in rows):
        lines += ["", f"Runs without an evaluation of {metric} (not finished, or not measured) are left out."]
    if any(r["diverged"] for r in rows):
        lines += ["", "A diverged run (a NaN or Inf stopped it) is out of its method's numbers and curve."]
    if any(r["unfinished"] for r in rows):
        lines += [
            "",
            "A run not finished (stopped, or still running) enters with its last evaluation as final.",
        ]
    if len(rows) > 1 and all(r["runs"] <= 1 for r in rows):
        lines += ["", "One run per method: no spread, and no paired comparison (it needs two seeds or more)."]
    return "\n".join(lines)


def final_by_seed(dirs: list[Path], metric: str) -> dict[int, float]:
    """Each finished run's last evaluated value of ``metric``, keyed by the run's seed (from its
    config.yaml). A run stopped before its last round is left out: its last value is of another round
    than the other method's, and a pair of two rounds is no paired difference; so is a final that is not
    finite."""
    finals = {}
    for d in dirs:
        records = read_metrics(d / "metrics.jsonl")
        evals = [r[metric] for r in records if r.get(metric) is not None]
        if not evals or not (d / "config.yaml").is_file():
            continue
        config = read_yaml(d / "config.yaml") or {}
        # a final of Inf or NaN (an fp32 perplexity past exp(88.7)) is no number to difference
        if stopped_early(records, planned_rounds(config)) is None and math.isfinite(evals[-1]):
            finals[int(config.get("seed", 0))] = evals[-1]
    return finals


def _seed_of(run_dir: Path) -> int | None:
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    return int(config.get("seed", 0)) if isinstance(config, dict) else None


def format_paired(runs: dict[str, list[Path]], metric: str, groups: dict[str, str] | None = None) -> str:
    """Every method against the first, paired by seed (declora.paired): per-seed differences of the final
    value, mean ± SE and the 95% t-interval. With ``groups`` (method -> its group, ``pair_groups``), every
    method against the first of its own group, one table per group. A method that shares fewer than two
    finished seeds with its reference is named in a note under the table; empty when every method has
    one run (the table says so)."""
    if len(runs) < 2 or all(len(dirs) <= 1 for dirs in runs.values()):  # the table's note says it
        return ""
    if not groups:
        return _paired_table(runs, list(runs), metric)
    labels = list(dict.fromkeys(groups[m] for m in runs))
    tables = [_paired_table(runs, [m for m in runs if groups[m] == g], metric, g) for g in labels]
    return "\n\n".join(t for t in tables if t)


def _paired_table(runs: dict[str, list[Path]], methods: list[str], metric: str, group: str = "") -> str:
    """The paired table of ``methods[1:]`` against ``methods[0]`` (all of one ``group``, if given)."""
    from declora.paired import is_exact, paired_difference

    if len(methods) < 2:
        return ""
    k = display_scale(metric)
    ref = final_by_seed(runs[methods[0]], metric)
    lines, unpaired = [], []
    for method in methods[1:]:
        other = final_by_seed(runs[method], metric)
        shared = len(set(ref) & set(other))
        if shared < 2:
            unpaired.append(f"{method} ({shared} finished seed{'' if shared == 1 else 's'} shared)")
            continue
        d = paired_difference(other, ref, exact=is_exact(metric))
        everyone = {s for p in (*runs[methods[0]], *runs[method]) if (s := _seed_of(p)) is not None}
        left_out = sorted(everyone - set(d.seeds))  # not finished (or not run) by one of the two
        seeds = (
            f"{len(d.seeds)} (seed {', '.join(map(str, left_out))}: not finished by both, or not finite)"
            if left_out
            else str(len(d.seeds))
        )
        per_seed = ", ".join(_signed(k * x) for x in d.diffs)
        decided = "yes" if d.lo > 0 or d.hi < 0 else "no"
        interval = f"{k * d.lo:+.2f} to {k * d.hi:+.2f}"  # signed, so that "-0.00 to" reads as "no"
        if math.isnan(d.lo):  # every seed gave the same difference
            interval, decided = "none (no spread between seeds)", "undecided"
        lines.append(
            f"| {method} | {seeds} | {per_seed} | {_signed(k * d.mean)} ± {k * d.se:.2f} | "
            f"{interval} | {decided} |"
        )
    # said, not dropped: a method missing from the paired table would read as one that was compared
    unpaired_lead, paired_lead = (
        (f"Within {group}, not", f"Within {group}, paired") if group else ("Not", "Paired")
    )
    note = (
        f"{unpaired_lead} paired with **{methods[0]}** (a paired difference needs two seeds both finished): "
        + ", ".join(unpaired)
        + "."
        if unpaired
        else ""
    )
    if not lines:
        return note
    head = [
        f"{paired_lead} by seed against **{methods[0]}** (final {metric}; same seed = same partition, "
        "batches and test set): difference per seed, mean ± standard error, 95% t-interval, and whether "
        "it excludes 0.",
        "",
        "| method | seeds | per seed | mean ± SE | 95% interval | excludes 0 |",
        "|---|---:|---|---:|---|---|",
    ]
    return "\n".join(head + lines + (["", note] if note else []))


def _signed(x: float) -> str:
    """``x`` to two decimals with its sign; a difference that rounds to zero reads 0.00, not -0.00."""
    text = f"{x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_comparison(
    runs: dict[str, list[Path]],
    out: Path,
    metric: str,
    target: float | None,
    groups: dict[str, str] | None = None,
) -> str:
    from declora.compare_plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs, metric, target)
    table = format_comparison(rows, metric, target)
    if note := attacked_note(runs, metric):
        table = f"{table}\n\n{note}"
    paired = format_paired(runs, metric, groups)
    if paired:
        table = f"{table}\n\n{paired}"
    (out / "comparison.md").write_text(table + "\n\n![curves](comparison.png)\n")
    (out / "comparison.csv").write_text(rows_csv(rows))
    plot_comparison(runs, out / "comparison.png", metric)
    return table


# A metric over every node and its counterpart over the honest nodes alone (logged under attack).
HONEST_TWIN = {
    f"{m}_{w}": f"{m}_honest_{h}"
    for m in ("acc", "ppl")
    for w, h in (("avg_factors", "avg_factors"), ("avg_product", "avg_factors"), ("node_mean", "mean"))
}


def attacked_note(runs: dict[str, list[Path]], metric: str) -> str | None:
    """Where some runs had attacking nodes and ``metric`` counts them too (the mean over every node, the
    average of every node's factors), a line saying so and naming the honest nodes' metric. None
    otherwise: the metric is already the honest nodes', a server's model, or no run was attacked."""
    twin = HONEST_TWIN.get(metric)
    if twin is None:
        return None
    attacked = [
        method
        for method, dirs in runs.items()
        if any(
            r.get("attackers")
            for d in dirs
            for r in read_metrics(d / "metrics.jsonl")
            if r.get("event") == "start"
        )
    ]
    if not attacked:
        return None
    shown = ", ".join(attacked[:3]) + (f" and {len(attacked) - 3} more" if len(attacked) > 3 else "")
    return (
        f"Under attack: {shown} ran with attacking nodes, and {metric} counts the attackers' models too; "
        f"rank by {twin} (--metric {twin}, or a grid's metric: {twin}) for what the honest nodes reached."
    )
