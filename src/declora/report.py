"""Tables from a run folder's metrics.jsonl, and its report (report.md; curves.png: declora.run_plots).

The papers disagree on what they report (docs/algorithms.md: evaluation protocols): Dec-LoRA the *best*
score of the averaged model, ADF/TAD the *final* mean ± std over nodes, FSLoRA the server model. So the
summary keeps best and final for every evaluation mode that was logged, next to the consensus, bytes, time
and memory of the run.

metrics.jsonl holds one JSON object per line. ``"event": "eval"`` lines carry ``round`` and any of the
accuracy, loss, consensus and cost keys; ``"event": "round"`` lines carry the per-round costs; the
``start`` line gives the headline, the round count and the privacy level, and a ``diverged`` line the round
a run stopped at. Every other event is ignored, and a key may be missing or null in any line. Accuracies
are fractions in [0, 1]. Causal language modelling logs perplexities (``ppl_*``, lower is better) in place
of accuracies.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from declora.allowed import TWO_LABEL_METRICS

__all__ = ["format_table", "headline_line", "read_metrics", "summarize", "write_report"]

log = logging.getLogger(__name__)

# Evaluation modes in the order the table shows them; any other ``acc_*`` (``em_*``, ``f1_*``, ``mcc_*``,
# ``ppl_*``) key follows, sorted. ``em_*``: an instruction run's exact match, ``f1_*`` and ``mcc_*``: a
# two-label classification's F1 and Matthews' correlation of label 1, each shown ×100 like an accuracy.
ACCURACY_KEYS = ("acc_node_mean", "acc_avg_factors", "acc_avg_product", "acc_server")
CONSENSUS_KEYS = ("consensus_A", "consensus_B", "consensus_BA", "cross_term")
FINAL_KEYS = ("train_loss", *CONSENSUS_KEYS, "bytes_total", "wall_s")
STD_KEY = "acc_node_std"  # the spread that goes with acc_node_mean (ADF/TAD: mean ± std over nodes)
# Per-node spread statistics: companions of *_node_mean, not evaluation modes with a "best". Under attack
# the honest nodes' minimum (*_honest_min) is a row of its own: the worst honest node is what an attack
# is judged by.
SPREAD_KEYS = frozenset(f"{m}_node_{s}" for m in ("acc", "ppl") for s in ("std", "min", "max"))
PRIVACY_KEY = "privacy_epsilon_max"  # privacy.level node/example: the largest epsilon any node has spent
# with the delta it is spent at and the noise multiplier (solved, for a target epsilon): an epsilon alone
# says little
PRIVACY_KEYS = (PRIVACY_KEY, "privacy_delta", "privacy_noise_multiplier")
LOWER_IS_BETTER = "ppl_"  # perplexity keys (task.kind=causal_lm)
VALIDATION = "val_"  # a metric on the validation rows (data.validation_fraction): val_acc_avg_factors
# The task metrics' key prefixes (an evaluation's other keys are consensus distances, bytes, times).
METRIC_PREFIXES = ("acc_", "em_", *TWO_LABEL_METRICS, LOWER_IS_BETTER)


PEAK_KEYS = ("peak_mem_mb", "peak_gpu_mem_mb")  # resident memory; a GPU run's allocated GPU memory


def lower_is_better(key: str) -> bool:
    """Whether a metric improves as it falls: perplexities (``ppl_*``) do, accuracies rise."""
    return key.removeprefix(VALIDATION).startswith(LOWER_IS_BETTER)


def display_scale(key: str) -> int:
    """The factor a metric is shown with: 100 for an accuracy (in %), 1 for a perplexity."""
    return 1 if lower_is_better(key) else 100


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in order. A line that does not parse (a run killed mid-write) is
    skipped with a warning rather than losing the whole report."""
    records = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            log.warning("%s:%d: skipping unreadable line (%s)", path, lineno, err)
            continue
        problem = record_problem(record)
        if problem:
            log.warning("%s:%d: skipping a record that %s", path, lineno, problem)
            continue
        records.append(record)
    return records


def record_problem(record: Any) -> str | None:
    """What makes a parsed metrics.jsonl line unusable (a hand edit, another program's file), or None:
    every record is an object, and a round number is a whole number."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    value = record.get("round", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"has round {value!r}, not a whole number"
    return None


def number_at(record: dict[str, Any], key: str) -> float | None:
    """The value of ``key`` as a float, or None when it is missing, null or not a number."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def events_of(records: list[dict[str, Any]], *events: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") in events]


def accuracy_keys(evals: list[dict[str, Any]]) -> list[str]:
    seen = {
        k
        for r in evals
        for k in r
        if k.removeprefix(VALIDATION).startswith(METRIC_PREFIXES)
        and k.removeprefix(VALIDATION) not in SPREAD_KEYS
        and number_at(r, k) is not None
    }
    return [k for k in ACCURACY_KEYS if k in seen] + sorted(seen - set(ACCURACY_KEYS))


def best_final(evals: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Final and best (earliest round on ties, NaN never best) of one metric key over the evaluations:
    the highest accuracy, or the lowest perplexity."""
    points = [(r, v) for r in evals if (v := number_at(r, key)) is not None]
    final_rec, final = points[-1]
    finite = [(r, v) for r, v in points if math.isfinite(v)]
    better = min if lower_is_better(key) else max
    best_rec, best = better(finite, key=lambda p: p[1]) if finite else (final_rec, final)
    entry = {
        "final": final,
        "final_round": final_rec.get("round"),
        "best": best,
        "best_round": best_rec.get("round"),
    }
    if key.endswith("_node_mean"):
        std = key.replace("_mean", "_std")
        entry["final_std"], entry["best_std"] = number_at(final_rec, std), number_at(best_rec, std)
    return entry


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [v for r in records if (v := number_at(r, key)) is not None]
    return values[-1] if values else None


def _config_section(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One section of the config logged in the run's ``start`` line ({} if none)."""
    for r in events_of(records, "start"):
        config = r.get("config")
        section = config.get(name) if isinstance(config, dict) else None
        if isinstance(section, dict):
            return section
    return {}


def config_headline(records: list[dict[str, Any]]) -> str | None:
    """eval.headline of the config logged in the run's ``start`` line, if any."""
    headline = _config_section(records, "eval").get("headline")
    return headline if isinstance(headline, str) else None


def stopped_early(records: list[dict[str, Any]], planned: int | None = None) -> tuple[int, int] | None:
    """(last round logged, rounds asked for) of a run that stopped before its last round (killed, or
    still running); None for a finished run. ``planned``: the run folder's config.yaml ``rounds`` (a resume
    may ask for more and rewrites it), else the config in the ``start`` line."""
    if patience_stopped_at(records) is not None:  # early stopping ended it: a finished run
        return None
    starts = [r for r in events_of(records, "start") if isinstance(r.get("config"), dict)]
    if planned is None and starts:
        planned = starts[-1]["config"].get("rounds")
    done = [v for r in events_of(records, "eval", "round") if (v := number_at(r, "round")) is not None]
    last = int(max(done)) if done else 0
    return (last, planned) if isinstance(planned, int) and last < planned else None


def summarize(
    records: list[dict[str, Any]], headline: str | None = None, planned: int | None = None
) -> dict[str, Any]:
    """Best and final of every accuracy key, final consensus/loss/cost values and peak memory.

    Returns ``{"rounds", "evals", "accuracy": {key: {final, final_round, best, best_round[, final_std,
    best_std]}}, "final": {key: value}, "peak_mem_mb", "headline", "selected", "stopped_early",
    "diverged", "patience", "private"}`` (selected: ``selected_by_validation``; patience: why early
    stopping ended the run; private: the run used differential privacy). Consensus keys come from the
    last evaluation that logged them; bytes_total, wall_s and train_loss from the last eval or round line
    (round lines are the more recent); peak_mem_mb is the maximum over both. ``headline`` is the metric
    the paper reports (config eval.headline): the argument, else the one in the run's ``start`` line,
    else None. Absent values are None.
    """
    evals = events_of(records, "eval")
    progress = events_of(records, "eval", "round")
    rounds = [v for r in progress if (v := number_at(r, "round")) is not None]
    final = {k: _last(evals, k) for k in CONSENSUS_KEYS}
    final |= {k: _last(progress, k) for k in ("train_loss", "bytes_total", "wall_s")}
    seen = {k: [v for r in progress if (v := number_at(r, k)) is not None] for k in PEAK_KEYS}
    peaks = {k: max(values) for k, values in seen.items() if values}
    kept = {k: final[k] for k in FINAL_KEYS}
    headline = headline if headline is not None else config_headline(records)
    for key in PRIVACY_KEYS:  # private runs only
        if (value := _last(progress, key)) is not None:
            kept[key] = value
    return {
        "rounds": int(max(rounds)) if rounds else None,
        "evals": len(evals),
        "accuracy": {k: best_final(evals, k) for k in accuracy_keys(evals)},
        "final": kept,
        "peak_mem_mb": peaks.get("peak_mem_mb"),
        **{k: v for k, v in peaks.items() if k != "peak_mem_mb"},  # a GPU run's peak_gpu_mem_mb
        "headline": headline,
        "selected": selected_by_validation(evals, headline),
        "stopped_early": stopped_early(records, planned),
        "diverged": diverged_at(records),
        "patience": _patience_reason(records),
        "private": _config_section(records, "privacy").get("level", "none") != "none",
    }


def selected_by_validation(evals: list[dict[str, Any]], key: str | None) -> dict[str, Any] | None:
    """The evaluated round whose validation score of ``key`` (``val_<key>``) is best, and ``key``'s test
    value there: the number of the round a run chooses without looking at its test rows. None for a run
    without validation rows (data.validation_fraction)."""
    if not key or not any(number_at(r, VALIDATION + key) is not None for r in evals):
        return None
    chosen = best_final(evals, VALIDATION + key)["best_round"]
    record = next(r for r in evals if r.get("round") == chosen)
    return {"round": chosen, "value": number_at(record, key)}


STOPPED = "stopped"  # the metrics.jsonl event of a run that eval.patience stopped (declora.patience)


def patience_stopped_at(records: list[dict[str, Any]]) -> int | None:
    """The round at which eval.patience stopped the run (its ``stopped`` line, when no round came after
    it: a resume with more patience goes on), None if it did not stop so."""
    progress = events_of(records, STOPPED, "round", "eval")
    if not progress or progress[-1].get("event") != STOPPED:
        return None
    at = number_at(progress[-1], "round")
    return None if at is None else int(at)


def _patience_reason(records: list[dict[str, Any]]) -> str | None:
    """Why early stopping ended the run (its ``stopped`` line), None if it did not."""
    if patience_stopped_at(records) is None:
        return None
    return str(events_of(records, STOPPED)[-1].get("reason", "eval.patience"))


def diverged_at(records: list[dict[str, Any]]) -> int | None:
    """The round at which the run stopped on a NaN or Inf (its ``diverged`` line), None if it did not."""
    rounds = [v for r in events_of(records, "diverged") if (v := number_at(r, "round")) is not None]
    return int(rounds[-1]) if rounds else None


def _pct(value: float | None, std: float | None = None, key: str = "acc_") -> str:
    """An accuracy in % (a perplexity, for ``ppl_*`` keys, as it is)."""
    if value is None:
        return "-"
    k = display_scale(key)
    return f"{k * value:.2f}" + ("" if std is None else f" ± {k * std:.2f}")


def _fmt(key: str, value: float | None) -> str:
    """A final value in the unit its key implies."""
    if value is None:
        return "-"
    if key == "bytes_total":
        return f"{value / 1e6:.2f} MB"
    if key == "wall_s":
        return f"{value:.1f} s"
    if key in PEAK_KEYS:
        return f"{value:.1f} MB"
    if key == "train_loss":
        return f"{value:.4f}"
    if key == PRIVACY_KEY:
        return f"{value:.2f}"
    if key in PRIVACY_KEYS:  # delta 1e-05, sigma 1.276
        return f"{value:.4g}"
    return f"{value:.3e}"


def _round(value: Any) -> str:
    return "-" if value is None else str(value)


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, e in summary["accuracy"].items():
        if key.startswith(VALIDATION) and key != VALIDATION + str(summary.get("headline")):
            continue  # of the validation scores, the table shows the one rounds are chosen by
        best = _pct(e["best"], e.get("best_std"), key)
        rows.append([key, _pct(e["final"], e.get("final_std"), key), best, _round(e["best_round"])])
    for key, value in summary["final"].items():
        if value is not None:
            rows.append([key, _fmt(key, value), "", ""])
    for key in PEAK_KEYS:
        if summary.get(key) is not None:
            rows.append([f"{key} (max)", _fmt(key, summary[key]), "", ""])
    return rows


def headline_line(summary: dict[str, Any], headline: str | None = None) -> str | None:
    """``headline (<key>): final X%, best Y% at round R`` for the headline metric, or None without one."""
    key = headline if headline is not None else summary.get("headline")
    if not key:
        return None
    e = summary["accuracy"].get(key)
    if e is None:
        return f"headline ({key}): not logged by this run"
    final, best = _pct(e["final"], e.get("final_std"), key), _pct(e["best"], e.get("best_std"), key)
    unit = "" if lower_is_better(key) or key.startswith("mcc_") else "%"  # a correlation ×100 is no share
    line = f"headline ({key}): final {final}{unit}, best {best}{unit} at round {_round(e['best_round'])}"
    chosen = summary.get("selected")
    if chosen is not None:  # the honest "best": the round the validation rows chose, scored on the test rows
        value = "-" if chosen["value"] is None else f"{_pct(chosen['value'], key=key)}{unit}"
        line += f"; at round {chosen['round']}, the best on the validation rows: {value}"
    return line


def format_table(summary: dict[str, Any], headline: str | None = None, run_dir: Path | None = None) -> str:
    """A markdown table (metric | final | best | best round), padded so it also reads in a terminal.

    With a headline metric (the argument, else ``summary["headline"]``) a first line states its final and
    best value, and its row is marked with ``*``.
    """
    mark = headline if headline is not None else summary.get("headline")
    header = ["metric", "final", "best", "best round"]
    rows = [[f"{r[0]} *" if r[0] == mark else r[0], *r[1:]] for r in _rows(summary)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    rounds = _round(summary.get("rounds"))
    if summary.get("patience"):
        rounds += f", stopped early: {summary['patience']}"
    if summary.get("stopped_early"):
        from declora.runfolder import resume_command

        resume = resume_command(run_dir) if run_dir else "declora run --resume RUN_DIR"
        last, planned = summary["stopped_early"]
        rounds = (
            f'{last} of {planned}: NOT FINISHED (stopped, or still running), so "final" is round '
            f"{last}'s; `{resume}` continues a stopped run"
        )
        if summary.get("diverged") is not None:  # a resume repeats the same steps into the same NaN
            final = f'so "final" is round {last}\'s' if last else "no round finished"
            fix = "a lower train.lr or a train.max_grad_norm"
            if summary.get("private"):  # differential privacy's noise is the likelier cause
                fix = f"less DP noise (privacy.noise_multiplier, privacy.clip), or {fix}"
            rounds = (
                f"{last} of {planned}: STOPPED, a NaN or Inf at round {summary['diverged']}, {final}; a "
                f"resume would repeat the same steps: start again with {fix}"
            )
    note = (
        f"Rounds: {rounds}, evaluations: {summary.get('evals', 0)}.\n"
        "Accuracies in % (node mean ± population std over nodes), perplexities (ppl_*) as they are;\n"
        "bytes in MB (1 MB = 1e6 bytes); "
        "times in seconds;\nconsensus_* are squared Frobenius distances, cross_term a Frobenius norm."
    )
    first = headline_line(summary, headline)
    if first is not None and mark in summary["accuracy"]:
        first += " (* in the table)"
    top = [] if first is None else [first]
    return "\n".join([*top, note, "", line(header), rule, *(line(r) for r in rows)]) + "\n"


def run_config(run_dir: Path) -> dict[str, Any]:
    """run_dir/config.yaml as a dict; empty when the file is missing or unreadable (warned)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        log.warning("%s: cannot read the run's config (%s)", path, err)
        return {}
    return config if isinstance(config, dict) else {}


def _run_headline(config: dict[str, Any]) -> str | None:
    """eval.headline of a run's config; None when the key is missing."""
    section = config.get("eval")
    value = section.get("headline") if isinstance(section, dict) else None
    return value if isinstance(value, str) else None


def planned_rounds(config: dict[str, Any]) -> int | None:
    value = config.get("rounds")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def write_report(run_dir: str | Path, write: bool = True) -> str:
    """Write run_dir/report.md (the table) and run_dir/curves.png from run_dir/metrics.jsonl.

    Returns the table text (``write=False``: only that, for a run another process is still writing).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    config = run_config(run_dir)
    table = format_table(summarize(records, _run_headline(config), planned_rounds(config)), run_dir=run_dir)
    if not write:
        return table
    from declora.run_plots import plot_run  # it imports this module
    from declora.runfolder import atomic_write, atomic_write_text

    quantized = (config or {}).get("model", {}).get("base_quantization", "none")
    note = "" if quantized == "none" else f"The frozen base was stored quantized ({quantized}).\n\n"
    atomic_write_text(
        run_dir / "report.md", f"# Report: {run_dir.name}\n\n{note}{table}\n![curves](curves.png)\n", "report"
    )
    atomic_write(run_dir / "curves.png", lambda p: plot_run(records, p), "report.plot")
    return table
