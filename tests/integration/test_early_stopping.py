"""eval.patience: a run stops once its validation score has not improved for that many evaluations, ends
as a finished run (its line, checkpoint, adapters, report), and a resume goes on only with more patience."""

from __future__ import annotations

import json

import pytest
from helpers import metrics_records
from test_validation_rows import _overrides, _rows

from declora.cli import main
from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment
from declora.report import format_table, read_metrics, summarize

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


def _data(tmp_path):
    # test rows labelled the other way round, as in test_validation_rows: the rounds best on them are
    # not the ones best on the validation rows
    return _rows(tmp_path / "rows.jsonl", 80), _rows(tmp_path / "test.jsonl", 30, seed=4, inverted=True)


def _config(tiny_bert, tmp_path, name, *extra):
    data, test = _data(tmp_path)
    more = (f"data.test_file={test}", "rounds=8", "train.lr=0.1", "export_round=best", *extra)
    return load_config(None, _overrides(tiny_bert, data, tmp_path / name, *more))


def test_a_run_stops_once_the_validation_score_stops_improving(tiny_bert, tmp_path):
    whole = run(build_experiment(_config(tiny_bert, tmp_path, "whole")))
    scores = [r["val_acc_avg_factors"] for r in whole]  # 8 rounds, every one evaluated
    # the first round after which 2 evaluations in a row were no better
    expected = next(t for t in range(2, 8) if max(scores[: t + 1]) == max(scores[: t - 1]))
    assert expected < 7, scores  # it does stop before the end on this seed (the premise of this test)

    exp = build_experiment(_config(tiny_bert, tmp_path, "early", "eval.patience=2"))
    records = run(exp)
    assert [r["val_acc_avg_factors"] for r in records] == scores[: expected + 1]  # the same rounds, then stop
    logged = read_metrics(exp.run_dir / "metrics.jsonl")
    assert logged[-1]["event"] == "stopped" and logged[-1]["round"] == expected + 1
    assert "in 2 evaluations (eval.patience=2)" in logged[-1]["reason"]
    assert (exp.run_dir / "state" / "latest.json").is_file()
    summary = summarize(logged)
    assert summary["stopped_early"] is None and summary["patience"] == logged[-1]["reason"]  # finished
    assert f"Rounds: {expected + 1}, stopped early: no better val_acc_avg_factors" in format_table(summary)
    # the adapters exported are those of the round the validation rows chose among the rounds run
    ran = scores[: expected + 1]
    card = json.loads((exp.run_dir / "adapters" / "consensus" / "declora_adapter.json").read_text())
    assert card["round"] == ran.index(max(ran)) + 1


def test_a_stopped_run_resumes_only_with_more_patience(tiny_bert, tmp_path, capsys):
    exp = build_experiment(_config(tiny_bert, tmp_path, "run", "eval.patience=1"))
    stopped_at = run(exp)[-1]["round"]
    before = (exp.run_dir / "metrics.jsonl").read_text()
    code = main(["run", "--resume", str(exp.run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "stopped early" in err and "larger eval.patience" in err
    assert (exp.run_dir / "metrics.jsonl").read_text() == before  # nothing changed
    assert main(["run", "--resume", str(exp.run_dir), "eval.patience=null"]) == 0
    rounds = [r["round"] for r in metrics_records(exp.run_dir) if r["event"] == "eval"]
    assert rounds == list(range(1, 9)) and stopped_at < 8  # went on to the end
    assert summarize(read_metrics(exp.run_dir / "metrics.jsonl"))["patience"] is None


def test_patience_without_validation_rows_is_refused(tiny_bert, tmp_path, capsys):
    data, _ = _data(tmp_path)
    args = [f"model.name={tiny_bert}", f"data.dataset={data}", "eval.patience=2", f"run_dir={tmp_path / 'r'}"]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "eval.patience=2 stops on the score of validation rows" in err and not (tmp_path / "r").exists()
