"""Summary, table and plot of a small hand-written metrics.jsonl."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import matplotlib.image
import pytest

from declora.report import format_table, read_metrics, summarize, write_report
from declora.run_plots import plot_run

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RECORDS = [
    {"event": "start", "config": {"rounds": 3}, "acc_node_mean": 0.99},  # not an eval: ignored
    {"event": "partition", "sizes": [10, 12]},
    {"event": "round", "round": 1, "train_loss": 0.9, "bytes_round": 1e6, "bytes_total": 1e6, "wall_s": 1.0},
    {
        "event": "eval",
        "round": 1,
        "acc_node_mean": 0.6,
        "acc_node_std": 0.05,
        "acc_node_min": 0.5,
        "acc_node_max": 0.7,
        "acc_avg_factors": 0.62,
        "consensus_A": 0.1,
        "consensus_B": 0.0,
        "consensus_BA": 0.2,
        "cross_term": 0.01,
        "peak_mem_mb": 100.0,
    },
    {"event": "round", "round": 2, "train_loss": 0.7, "bytes_round": 1e6, "bytes_total": 2e6, "wall_s": 2.05},
    {
        "event": "eval",
        "round": 2,
        "acc_node_mean": 0.8,
        "acc_node_std": 0.02,
        "acc_avg_factors": None,
        "consensus_A": 0.05,
        "consensus_B": 0.01,
        "consensus_BA": 0.1,
        "peak_mem_mb": 150.5,
    },
    {"event": "round", "round": 3, "train_loss": 0.5, "bytes_round": 1123456, "bytes_total": 3123456},
    {
        "event": "eval",
        "round": 3,
        "acc_node_mean": 0.75,
        "acc_node_std": 0.04,
        "acc_avg_factors": 0.7,
        "acc_server": 0.65,
        "acc_f1": 0.61,
        "consensus_A": 0.02,
        "consensus_B": 0.005,
        "consensus_BA": 0.0,
        "cross_term": 0.003,
        "wall_s": 3.14159,
        "peak_mem_mb": 120.0,
    },
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    lines = [json.dumps(r) for r in RECORDS]
    lines.insert(3, "")  # blank line
    lines.append('{"event": "eval", "rou')  # a run killed mid-write
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_read_metrics_skips_blank_and_broken_lines(run_dir: Path) -> None:
    assert read_metrics(run_dir / "metrics.jsonl") == RECORDS


def test_read_metrics_skips_records_a_report_cannot_use(run_dir: Path, caplog) -> None:
    path = run_dir / "metrics.jsonl"
    odd = [
        '{"event": "eval", "round": "x", "acc_node_mean": 1.0}',
        "[1, 2]",
        '{"event": "round", "round": true}',
    ]
    path.write_text(path.read_text() + "\n".join(odd) + "\n")
    assert read_metrics(path) == RECORDS  # a hand edit, not a reason to lose the report
    assert "has round 'x', not a whole number" in caplog.text and "is not a JSON object" in caplog.text
    assert "has round True" in caplog.text
    summarize(read_metrics(path))  # and the report is made from the rest


def test_summary_matches_hand_computation(run_dir: Path) -> None:
    s = summarize(read_metrics(run_dir / "metrics.jsonl"))
    assert s["rounds"] == 3
    assert s["evals"] == 3
    # known modes first, other acc_* keys after; per-node min/max/std are not modes of their own
    assert list(s["accuracy"]) == ["acc_node_mean", "acc_avg_factors", "acc_server", "acc_f1"]
    assert s["accuracy"]["acc_node_mean"] == {
        "final": 0.75,
        "final_round": 3,
        "best": 0.8,
        "best_round": 2,
        "final_std": 0.04,
        "best_std": 0.02,
    }
    assert s["accuracy"]["acc_avg_factors"] == {"final": 0.7, "final_round": 3, "best": 0.7, "best_round": 3}
    assert s["accuracy"]["acc_server"] == {"final": 0.65, "final_round": 3, "best": 0.65, "best_round": 3}
    assert s["final"] == {
        "train_loss": 0.5,
        "consensus_A": 0.02,
        "consensus_B": 0.005,
        "consensus_BA": 0.0,
        "cross_term": 0.003,
        "bytes_total": 3123456.0,
        "wall_s": 3.14159,
    }
    assert s["peak_mem_mb"] == 150.5


def test_best_is_the_earliest_of_ties_and_missing_final_falls_back() -> None:
    evals = [
        {"event": "eval", "round": 1, "acc_server": 0.5},
        {"event": "eval", "round": 2, "acc_server": 0.5, "consensus_A": 0.3},
        {"event": "eval", "round": 3, "consensus_A": None},
    ]
    s = summarize(evals)
    assert s["accuracy"]["acc_server"] == {"final": 0.5, "final_round": 2, "best": 0.5, "best_round": 1}
    assert s["final"]["consensus_A"] == 0.3
    assert s["final"]["cross_term"] is None
    assert s["peak_mem_mb"] is None


def test_table_shows_formatted_numbers(run_dir: Path) -> None:
    table = format_table(summarize(read_metrics(run_dir / "metrics.jsonl")))
    lines = [line for line in table.splitlines() if line.startswith("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in lines[2:]}
    assert rows["acc_node_mean"] == ["75.00 ± 4.00", "80.00 ± 2.00", "2"]
    assert rows["acc_avg_factors"] == ["70.00", "70.00", "3"]
    assert rows["acc_server"] == ["65.00", "65.00", "3"]
    assert rows["acc_f1"] == ["61.00", "61.00", "3"]
    assert rows["bytes_total"][0] == "3.12 MB"
    assert rows["wall_s"][0] == "3.1 s"
    assert rows["peak_mem_mb (max)"][0] == "150.5 MB"
    assert rows["consensus_A"][0] == "2.000e-02"
    assert rows["train_loss"][0] == "0.5000"
    assert "1 MB = 1e6 bytes" in table
    assert "| metric" in table and "best round |" in table
    # padded: every table line has the same width
    assert len({len(line) for line in lines}) == 1


def test_a_run_that_stopped_before_its_last_round_is_marked_not_finished(run_dir: Path) -> None:
    finished = format_table(summarize(read_metrics(run_dir / "metrics.jsonl")))
    assert "Rounds: 3," in finished and "NOT FINISHED" not in finished
    killed = RECORDS[:6]  # the run asked for 3 rounds and logged 2
    table = format_table(summarize(killed))
    assert 'Rounds: 2 of 3: NOT FINISHED (stopped, or still running), so "final" is round 2\'s' in table
    resumed = [*RECORDS, {"event": "start", "round": 3, "config": {"rounds": 5}}]  # resumed for 5 rounds
    assert summarize(resumed)["stopped_early"] == (3, 5)
    # a resume asking for more rounds rewrites config.yaml (not the start line): the report reads it
    (run_dir / "config.yaml").write_text("rounds: 6\n")
    assert "Rounds: 3 of 6: NOT FINISHED" in write_report(run_dir)


def test_plot_is_a_valid_png(run_dir: Path) -> None:
    path = run_dir / "curves.png"
    plot_run(read_metrics(run_dir / "metrics.jsonl"), path)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100


def test_write_report_writes_both_files(run_dir: Path) -> None:
    table = write_report(run_dir)
    assert table in (run_dir / "report.md").read_text()
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_run_without_evaluations_still_reports(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    table = write_report(tmp_path)
    assert "| metric" in table
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def _fake_run(folder, bytes_per_round, consensus, acc):
    folder.mkdir(parents=True)
    lines = [
        {
            "event": "eval",
            "round": t,
            "acc_avg_factors": acc[t - 1],
            "acc_avg_product": acc[t - 1],
            "bytes_total": bytes_per_round * t,
            "consensus_BA": consensus[t - 1],
            "train_loss": 1.0 / t,
        }
        for t in (1, 2, 3)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_comparison_keeps_one_colour_per_method_and_plots_zeros(tmp_path):
    from declora.compare_plots import comparison_figure

    runs = {
        "dec_lora": [_fake_run(tmp_path / "d", 2e6, [1e-3, 5e-4, 2e-4], [0.5, 0.6, 0.7])],
        "centralized": [_fake_run(tmp_path / "c", 0, [0.0, 0.0, 0.0], [0.6, 0.7, 0.8])],  # one node
        "local": [_fake_run(tmp_path / "l", 0, [2e-3, 3e-3, 4e-3], [0.5, 0.55, 0.6])],
    }
    fig = comparison_figure(runs, "acc_avg_factors")
    axes = fig.axes
    for ax in axes:
        assert [line.get_label() for line in ax.lines] == list(runs)  # every method in every panel
    for i in range(len(runs)):
        assert len({ax.lines[i].get_color() for ax in axes}) == 1  # the same colour in each panel
    bytes_ax, cons_ax = axes[1], axes[2]
    assert list(bytes_ax.lines[2].get_xdata()) == [0.0, 0.0, 0.0]  # local sends 0 bytes: plotted at 0
    assert list(bytes_ax.lines[0].get_xdata()) == [2.0, 4.0, 6.0]
    assert list(cons_ax.lines[1].get_ydata()) == [0.0, 0.0, 0.0] and cons_ax.get_yscale() == "symlog"
    fig.savefig(tmp_path / "comparison.png")


def test_curves_show_loss_and_both_consensus_accuracies(tmp_path):
    from declora.run_plots import run_figure

    run = _fake_run(tmp_path / "r", 1e6, [1e-3, 5e-4, 2e-4], [0.5, 0.6, 0.7])
    fig = run_figure(read_metrics(run / "metrics.jsonl"))
    acc, loss, cons = fig.axes
    lines = {line.get_label(): line for line in acc.lines}
    both = (lines["acc_avg_factors"], lines["acc_avg_product"])
    assert list(both[0].get_ydata()) == list(both[1].get_ydata()) == [50.0, 60.0, 70.0]
    assert both[0].get_linestyle() != both[1].get_linestyle() and both[0].get_marker() != both[1].get_marker()
    assert list(loss.lines[0].get_ydata()) == [1.0, 0.5, 1.0 / 3] and loss.get_title() == "Training loss"
    assert cons.lines and cons.get_yscale() == "log"


def test_curves_draw_a_consensus_of_zero_as_zero(tmp_path):
    from declora.run_plots import run_figure

    def consensus_panel(values: list[float]):
        evals = [
            {"event": "eval", "round": t + 1, "acc_avg_factors": 0.5, "consensus_A": v}
            for t, v in enumerate(values)
        ]
        return run_figure(evals).axes[2]

    started = consensus_panel([0.0, 8.27e-4, 4e-4])  # equal at the start, then drifting
    assert list(started.lines[0].get_ydata()) == [0.0, 8.27e-4, 4e-4] and started.get_yscale() == "symlog"
    one_node = consensus_panel([0.0, 0.0])  # centralized: one node, always its own consensus
    assert list(one_node.lines[0].get_ydata()) == [0.0, 0.0] and one_node.get_yscale() == "linear"
    assert not one_node.texts  # not "nothing logged"


def test_a_gpu_runs_peak_gpu_memory_is_summarised_and_shown(tmp_path: Path) -> None:
    lines = [
        {"event": "round", "round": 1, "train_loss": 0.9, "peak_mem_mb": 900.0, "peak_gpu_mem_mb": 2048.0},
        {"event": "eval", "round": 2, "train_loss": 0.8, "peak_mem_mb": 950.0, "peak_gpu_mem_mb": 3072.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = summarize(read_metrics(tmp_path / "metrics.jsonl"))
    assert (summary["peak_mem_mb"], summary["peak_gpu_mem_mb"]) == (950.0, 3072.5)
    assert "| peak_gpu_mem_mb (max) | 3072.5 MB" in format_table(summary)
    assert "peak_gpu_mem_mb" not in summarize(RECORDS)  # a CPU run has none


def test_private_runs_show_the_largest_epsilon_spent_and_attacked_runs_the_worst_honest_node() -> None:
    records = [
        {"event": "round", "round": 1, "privacy_epsilon_max": 3.2, "privacy_epsilon": [3.2, 3.1]},
        {
            "event": "eval",
            "round": 2,
            "privacy_epsilon_max": 4.5,
            "privacy_delta": 1e-5,
            "privacy_noise_multiplier": 1.2756,
            "acc_honest_mean": 0.8,
            "acc_honest_min": 0.6,
        },
    ]
    s = summarize(records)
    assert s["final"]["privacy_epsilon_max"] == 4.5
    assert s["accuracy"]["acc_honest_min"]["final"] == 0.6 and "acc_honest_mean" in s["accuracy"]
    assert re.search(r"\| acc_honest_min +\| 60.00 \|", format_table(s))
    assert "acc_node_min" not in summarize([{"event": "eval", "round": 1, "acc_node_min": 0.5}])["accuracy"]
    assert "| privacy_epsilon_max" in format_table(s) and "4.50" in format_table(s)
    # the delta it is spent at, and the noise, beside it (a delta of 1e-05 is not rounded to 0)
    assert re.search(r"\| privacy_delta +\| 1e-05 ", format_table(s))
    assert re.search(r"\| privacy_noise_multiplier +\| 1.276 ", format_table(s))
    assert "privacy_epsilon_max" not in summarize([{"event": "eval", "round": 1}])["final"]  # not private


def test_instruction_runs_show_exact_match_in_percent_beside_perplexity() -> None:
    from declora.run_plots import run_figure

    evals = [
        {"event": "eval", "round": 1, "ppl_avg_factors": 1.5, "em_avg_factors": 0.25, "train_loss": 0.7},
        {"event": "eval", "round": 2, "ppl_avg_factors": 1.3, "em_avg_factors": 0.4375, "train_loss": 0.5},
    ]
    summary = summarize(evals)
    assert summary["accuracy"]["em_avg_factors"]["best"] == 0.4375  # higher is better
    assert summary["accuracy"]["ppl_avg_factors"]["best"] == 1.3  # lower is better
    table = format_table(summary)
    assert "| em_avg_factors " in table and "43.75" in table and "1.30" in table
    panel = run_figure(evals).axes[0]
    assert [line.get_label() for line in panel.get_lines()] == ["ppl_avg_factors"]  # no % on that axis


def test_a_run_evaluated_once_shows_its_point_on_the_loss_curves_round_axis(tmp_path):
    from declora.run_plots import run_figure

    records = [{"event": "round", "round": t, "train_loss": 1.0 / t} for t in range(1, 31)]
    records.append({"event": "eval", "round": 30, "acc_avg_factors": 0.8, "consensus_A": 0.5})
    acc, loss, cons = run_figure(records).axes
    assert acc.get_xlim() == loss.get_xlim() == cons.get_xlim()  # not an axis of its own around round 30
    assert acc.get_xlim()[0] == 0 and 30 < acc.get_xlim()[1] < 32


def test_a_comparison_evaluated_at_few_rounds_ticks_those_rounds(tmp_path):
    """Evaluations at rounds 20 and 40 had ticks at 21, 24, ..., 39: neither evaluated round was named."""
    from declora.compare_plots import comparison_figure

    folder = tmp_path / "r"
    folder.mkdir()
    records = [
        {"event": "eval", "round": t, "acc_avg_factors": a, "bytes_total": 1e6 * t, "consensus_BA": 1e-3}
        for t, a in ((20, 0.6), (40, 0.7))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = comparison_figure({"dec_lora": [folder]}, "acc_avg_factors")
    assert list(fig.axes[0].get_xticks()) == [20, 40] and list(fig.axes[2].get_xticks()) == [20, 40]


def test_the_run_legends_sit_under_their_panels_and_hide_no_point(tmp_path):
    from declora.run_plots import run_figure

    run = _fake_run(tmp_path / "r", 1e6, [1e-3, 5e-4, 2e-4], [0.5, 0.6, 0.7])
    fig = run_figure(read_metrics(run / "metrics.jsonl"))
    fig.draw_without_rendering()
    for ax in fig.axes:
        legend, panel = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.y1 <= panel.y0 and legend.y0 >= 0  # below the panel, and inside the figure


def test_consensus_at_rounding_level_does_not_stretch_the_log_axis():
    """Exact averaging leaves ~1e-16 in float32: the axis went down to 1e-16, ten empty decades."""
    from declora.run_plots import ROUNDING_DECADES, run_figure

    evals = [
        {"event": "eval", "round": t + 1, "acc_avg_factors": 0.5, "consensus_A": a, "consensus_B": b}
        for t, (a, b) in enumerate([(3e-17, 2e-3), (1e-16, 1e-3), (5e-17, 4e-4)])
    ]
    cons = run_figure(evals).axes[2]
    assert cons.get_yscale() == "symlog" and list(cons.lines[0].get_ydata()) == [3e-17, 1e-16, 5e-17]
    positive_ticks = [y for y in cons.get_yticks() if y > 0]
    assert min(positive_ticks) >= 2e-3 * 10.0**-ROUNDING_DECADES and 0.0 in list(cons.get_yticks())


def test_an_all_zero_consensus_panel_has_no_negative_axis():
    from declora.run_plots import run_figure

    evals = [{"event": "eval", "round": t, "acc_avg_factors": 0.5, "consensus_A": 0.0} for t in (1, 2)]
    cons = run_figure(evals).axes[2]
    assert list(cons.get_yticks()) == [0.0, 1.0] and -0.05 < cons.get_ylim()[0] < 0


def test_perplexity_lines_have_a_style_each():
    from declora.run_plots import run_figure

    evals = [
        {
            "event": "eval",
            "round": t,
            "ppl_avg_factors": 2.0 / t,
            "ppl_avg_product": 2.0 / t,
            "ppl_node_mean": 3.0,
        }
        for t in (1, 2)
    ]
    lines = run_figure(evals).axes[0].get_lines()
    assert [x.get_label() for x in lines] == ["ppl_avg_factors", "ppl_avg_product", "ppl_node_mean"]
    assert list(lines[0].get_ydata()) == [2.0, 1.0]  # perplexities as they are, not ×100
    assert len({(x.get_linestyle(), x.get_marker()) for x in lines}) == 3  # equal curves stay told apart


def test_a_comparison_legend_of_long_grid_cell_names_fits_the_figure(tmp_path):
    """Names of four grid axes ran off both sides of the figure in three columns."""
    from declora.compare_plots import comparison_figure

    names = [
        f"algorithm.name={m},train.lr={lr},train.local_steps=3,topology.graph=exponential,partition.alpha=0.5"
        for m in ("dec_lora", "decaf", "local", "fedavg")
        for lr in (0.001, 0.003)
    ]
    runs = {n: [_fake_run(tmp_path / str(i), 1e6, [1e-3] * 3, [0.5, 0.6, 0.7])] for i, n in enumerate(names)}
    fig = comparison_figure(runs, "acc_avg_factors")
    fig.draw_without_rendering()
    legend, width = fig.legends[0].get_window_extent(), fig.bbox.width
    assert legend.x0 >= 0 and legend.x1 <= width and legend.y0 >= 0
    assert all(legend.y1 <= ax.get_window_extent().y0 for ax in fig.axes)  # under the panels


def test_a_stopped_seed_ending_a_methods_curve_is_said(tmp_path, caplog):
    from declora.compare_plots import comparison_figure, curves

    done = _fake_run(tmp_path / "done", 1e6, [1e-3] * 3, [0.5, 0.6, 0.7])
    stopped = _fake_run(tmp_path / "stopped", 1e6, [1e-3] * 3, [0.5, 0.6, 0.7])
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text(lines[0] + "\n")  # killed after round 1
    c = curves([done, stopped], "acc_avg_factors")
    assert list(c["round"]) == [1] and list(c["cut"]) == [2, 3]
    assert list(curves([done], "acc_avg_factors")["cut"]) == []
    with caplog.at_level(logging.WARNING):
        fig = comparison_figure({"dec_lora": [done, stopped]}, "acc_avg_factors")
    assert "to round 1" in fig.axes[0].lines[0].get_label()
    assert "dec_lora: the curve ends at round 1" in caplog.text and "round 3" in caplog.text


def test_a_comparison_of_methods_that_send_nothing_has_no_negative_bytes_axis(tmp_path):
    from declora.compare_plots import comparison_figure

    runs = {"centralized": [_fake_run(tmp_path / "c", 0, [0.0] * 3, [0.6, 0.7, 0.8])]}
    _, sent, cons = comparison_figure(runs, "acc_avg_factors").axes
    assert list(sent.get_xticks()) == [0.0, 1.0] and -0.05 < sent.get_xlim()[0] < 0
    assert list(cons.get_yticks()) == [0.0, 1.0]


def test_the_round_the_validation_rows_choose_is_scored_on_the_test_rows() -> None:
    from declora.report import lower_is_better, selected_by_validation

    evals = [
        {"event": "eval", "round": 1, "acc_avg_factors": 0.70, "val_acc_avg_factors": 0.60},
        {"event": "eval", "round": 2, "acc_avg_factors": 0.80, "val_acc_avg_factors": 0.65},
        {"event": "eval", "round": 3, "acc_avg_factors": 0.75, "val_acc_avg_factors": 0.66},
    ]
    assert selected_by_validation(evals, "acc_avg_factors") == {"round": 3, "value": 0.75}
    assert summarize(evals, "acc_avg_factors")["accuracy"]["acc_avg_factors"]["best_round"] == 2
    assert (
        selected_by_validation(
            [{k: v for k, v in e.items() if not k.startswith("val_")} for e in evals], "acc_avg_factors"
        )
        is None
    )
    # a perplexity chosen on validation rows is the lowest one
    ppl = [
        {"event": "eval", "round": t, "ppl_avg_factors": 9.0 - t, "val_ppl_avg_factors": v}
        for t, v in ((1, 5.0), (2, 4.0), (3, 4.5))
    ]
    assert (
        lower_is_better("val_ppl_avg_factors")
        and selected_by_validation(ppl, "ppl_avg_factors")["round"] == 2
    )
