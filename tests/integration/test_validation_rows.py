"""data.validation_fraction: rows held out from every node, scored at each evaluation under val_* keys,
and what export_round=best and the report choose a round by, so the test rows never choose."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import WORDS, crash_after_round, metrics_records

from declora.cli import main
from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment
from declora.node_data import hold_out_validation
from declora.report import format_table, read_metrics, summarize
from declora.text_dataset import TextDataset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


def _rows(path, n, seed=3, inverted=False):
    """``n`` distinct rows (a row number, then five seeded words), labelled by the first word (the other
    way round with ``inverted``)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        words = [WORDS[k] for k in rng.integers(0, 10, size=5)]
        label = int(words[0] in ("good", "fine", "great", "nice", "fun")) ^ inverted
        lines.append(json.dumps({"text": f"row {i} " + " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _overrides(tiny_bert, data, run_dir, *extra):
    return [
        f"model.name={tiny_bert}",
        *("model.rank=2", "model.max_length=16", f"data.dataset={data}", "data.validation_fraction=0.25"),
        *("nodes=3", "rounds=4", "train.batch_size=4", "train.lr=0.05", "eval.every=1"),
        *("eval.node_examples=8", "checkpoint_every=1", "export=consensus", "threads=1"),
        f"run_dir={run_dir}",
        *extra,
    ]


def test_the_validation_rows_are_a_seeded_share_no_node_trains_on(tiny_bert, tmp_path):
    data = _rows(tmp_path / "rows.jsonl", 80)
    cfg = load_config(None, _overrides(tiny_bert, data, tmp_path / "run"))
    exp = build_experiment(cfg)
    from declora.node_data import build_node_data

    rows = build_node_data(cfg, 3, range(3), exp.group)
    train, test, validation = (set(d.texts) for d in (rows.train, rows.test, rows.validation))
    assert not train & validation and not test & validation and not train & test
    assert len(train) + len(validation) + len(test) == 80
    assert len(validation) == 16  # a quarter of the 64 training rows, label by label
    trained = {rows.train.texts[i] for part in rows.parts for i in part}
    assert trained <= train  # every node's rows are training rows
    assert len(exp.validation[0].labels) == 16 and len(exp.validation[1].labels) == 8  # eval.node_examples
    # the same rows whatever the training seed: they are drawn from eval.seed, as the test rows
    other = build_node_data(
        load_config(None, [*_overrides(tiny_bert, data, tmp_path / "r"), "seed=5"]), 3, range(3), exp.group
    )
    assert set(other.validation.texts) == validation
    # a dry run's plan says they are scored too (its evaluation is timed with them)
    from declora.dry_run import plan

    lines = plan(build_experiment(cfg))
    assert any("the same on 16 validation rows" in line for line in lines), lines


def test_grouped_rows_hold_out_whole_groups():
    labels = np.arange(60) % 2
    groups = np.arange(60) // 4  # 15 groups of 4 rows (a movie's reviews)
    ds = TextDataset([f"t{i}" for i in range(60)], labels, ("a", "b"), groups)
    cfg = load_config(None, ["data.validation_fraction=0.2"])
    kept, held = hold_out_validation(ds, cfg)
    assert not set(kept.groups) & set(held.groups) and len(set(held.groups)) == 3  # 20 % of 15 groups


def test_every_evaluation_scores_the_validation_rows_and_best_chooses_by_them(tiny_bert, tmp_path, caplog):
    data = _rows(tmp_path / "rows.jsonl", 80)
    # test rows labelled the other way round: the round best on them is the worst on the validation rows,
    # so choosing by the test rows and choosing by the validation rows are told apart
    test = _rows(tmp_path / "test.jsonl", 30, seed=4, inverted=True)
    extra = ("export_round=best", f"data.test_file={test}", "rounds=5", "train.lr=0.1")
    exp = build_experiment(load_config(None, _overrides(tiny_bert, data, tmp_path / "run", *extra)))
    assert "export_round=best chooses the round by its score on the test rows" not in caplog.text
    run(exp)
    records = read_metrics(exp.run_dir / "metrics.jsonl")
    evals = [r for r in records if r["event"] == "eval"]
    start = next(r for r in records if r["event"] == "start")
    assert start["eval_examples"] == {"consensus": 30, "node": 8, "validation": 20}
    for key in ("val_acc_avg_factors", "val_acc_avg_product", "val_acc_node_mean", "val_f1_avg_factors"):
        assert all(0.0 <= r[key] <= 1.0 for r in evals), key
    assert not any(k.startswith("val_consensus") for k in evals[0])  # the metrics only
    # the exported round is the best on validation (earliest on ties), not the best on the test rows
    scores = [r["val_acc_avg_factors"] for r in evals]
    chosen = evals[scores.index(max(scores))]
    on_test = [r["acc_avg_factors"] for r in evals]
    assert chosen["round"] != evals[on_test.index(max(on_test))]["round"]
    card = json.loads((exp.run_dir / "adapters" / "consensus" / "declora_adapter.json").read_text())
    assert card["round"] == chosen["round"]
    summary = summarize(records)
    assert summary["selected"] == {"round": chosen["round"], "value": chosen["acc_avg_factors"]}
    table = format_table(summary)
    assert f"at round {chosen['round']}, the best on the validation rows:" in table
    assert "val_acc_avg_factors" in table and "val_acc_avg_product" not in table  # the chosen-by one only


def test_a_resumed_run_scores_the_validation_rows_as_an_uninterrupted_one(tiny_bert, tmp_path):
    data = _rows(tmp_path / "rows.jsonl", 80)
    whole = build_experiment(load_config(None, _overrides(tiny_bert, data, tmp_path / "whole")))
    run(whole)
    crash_after_round(build_experiment(load_config(None, _overrides(tiny_bert, data, tmp_path / "cut"))), 3)
    resumed = build_experiment(load_config(tmp_path / "cut" / "config.yaml"))
    run(resumed, resume=True)

    def scores(folder):
        return [r["val_acc_avg_factors"] for r in metrics_records(folder) if r["event"] == "eval"]

    assert scores(tmp_path / "cut") == scores(tmp_path / "whole")


def test_choosing_on_the_test_rows_is_warned_about_and_bad_fractions_are_refused(tiny_bert, tmp_path, capsys):
    data = _rows(tmp_path / "rows.jsonl", 40)
    base = [f"model.name={tiny_bert}", "model.max_length=16", f"data.dataset={data}", "nodes=2", "rounds=1"]
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("declora").addHandler(handler)
    try:
        build_experiment(load_config(None, [*base, "export_round=best", f"run_dir={tmp_path / 'w'}"]))
    finally:
        logging.getLogger("declora").removeHandler(handler)
    assert any(
        "export_round=best chooses the round by its score on the test rows" in r.getMessage() for r in records
    )

    def refused(*extra):
        code = main(["run", *base, f"run_dir={tmp_path / 'r'}", *extra])
        err = capsys.readouterr().err
        assert code == 2 and not (tmp_path / "r").exists(), err
        return err

    assert "data.validation_fraction=1.5" in refused("data.validation_fraction=1.5")
    files = [str(_rows(tmp_path / f"n{i}.jsonl", 10)) for i in range(2)]
    assert "with data.node_files" in refused(f"data.node_files={files}", "data.validation_fraction=0.2")
    assert "leaves 0 validation" in refused("data.validation_fraction=0.001")
