"""declora run --dry-run on the shipped MiniLM (configs/smoke.yaml): it plays the run's first rounds
exactly, predicts the run's bytes, writes nothing, and refuses what the run would refuse."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from helpers import folder_digest, tiny_grid_file

from declora.cli import main
from declora.config import ConfigError, load_config
from declora.dry_run import plan
from declora.engine import run, trial_rounds
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration
SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dry") / "run"
    assert main(["run", str(SMOKE), f"run_dir={run_dir}", "export=none"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, [r for r in records if r["event"] in ("round", "eval")]


def plan_lines(text: str) -> dict[str, str]:
    """The plan's lines by their name ("messages" -> "1.20 MB in round 2 ...")."""
    rows = [re.match(r"  (\w[\w ]*?)  +(.*)", line) for line in text.splitlines()]
    return {m.group(1): m.group(2) for m in rows if m}


def test_dry_run_predicts_the_run_and_writes_nothing(smoke_run, tmp_path, capsys, monkeypatch):
    _, records = smoke_run
    target = tmp_path / "planned"
    scratch = tmp_path / "scratch"  # the temporary folder the run's writes are timed in
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--dry-run", f"run_dir={target}"]) == 0
    lines = plan_lines(capsys.readouterr().out)
    assert not target.exists()  # not even the folder
    assert not list(scratch.iterdir())  # the timed checkpoint, export and report are removed
    assert lines["run folder"] == f"{target} (new)"
    # The smoke partition: 64 rows, IID over 4 nodes; 3 rounds of 2 steps of batch 4 each.
    assert lines["data"] == "64 training rows over the nodes, 16 a node"
    assert (
        lines["training"]
        == "3 rounds × 2 local steps × batch 4 = 24 examples a node (1.5 passes over its rows)"
    )
    assert lines["evaluation"].startswith("3 evaluations (after round 1, 2, 3)")
    assert lines["nodes"].startswith("4 nodes, dec_lora, ring, degree 2, spectral gap 0.667")
    # The messages: round 2's bytes as the run logged them, and the run's total at that rate (a static ring).
    per_round = records[1]["bytes_round"]
    assert lines["messages"].startswith(f"{per_round / 1e6:.2f} MB in round 2")
    assert f"{records[-1]['bytes_total'] / 1e6:.2f} MB in 3 rounds" in lines["messages"]
    assert re.match(
        r"set-up [\d.]+ s, [\d.]+ s a round \(train [\d.]+, communicate [\d.]+\), "
        r"[\d.]+ s an evaluation, [\d.]+ m?s a checkpoint \(3\), [\d.]+ m?s an export, "
        r"[\d.]+ m?s the report: about ",
        lines["time"],
    )
    assert re.match(r"peak [\d,]+ MB resident", lines["memory"])


def test_the_trial_rounds_are_the_runs_first_rounds(smoke_run, tmp_path):
    """The dry run's rounds are the run's: the same losses and bytes, to the last bit."""
    _, records = smoke_run
    exp = build_experiment(load_config(SMOKE, [f"run_dir={tmp_path / 'trial'}", "export=none"]))
    trial = trial_rounds(exp, 2)
    assert [r["round"] for r in trial.records] == [1, 2]
    for played, logged in zip(trial.records, records[:2], strict=True):
        assert played["train_loss"] == logged["train_loss"]
        assert played["bytes_round"] == logged["bytes_round"]
        assert played["tokens_per_s"] > 0
    assert set(trial.seconds[-1]) == {"train", "communicate"}
    assert trial.eval_s > 0
    # The experiment is spent: neither a run nor another plan may start from its moved state.
    with pytest.raises(ConfigError, match="already run"):
        run(exp)
    with pytest.raises(ConfigError, match="already run"):
        plan(exp)
    assert not (tmp_path / "trial").exists()


def test_dry_run_refuses_what_the_run_refuses_and_changes_no_folder(smoke_run, capsys):
    run_dir, _ = smoke_run
    before = folder_digest(run_dir)
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--dry-run", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"declora: error: run folder '{run_dir}' is not empty")
    assert main(["run", "--dry-run", "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "declora: error: --dry-run plans a new run; --resume continues one: give one of them"
    )
    # --overwrite: the plan says the folder would be replaced, and leaves it as it was.
    assert main(["run", str(SMOKE), "--dry-run", "--overwrite", f"run_dir={run_dir}"]) == 0
    assert plan_lines(capsys.readouterr().out)["run folder"] == f"{run_dir} (replaced: --overwrite)"
    assert main(["run", str(SMOKE), "--dry-run", f"run_dir={run_dir}", "nodes=0"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == "declora: error: nodes=0 must be a positive integer"
    )
    assert folder_digest(run_dir) == before


@pytest.mark.parametrize(
    ("override", "nodes", "messages"),
    [
        ("algorithm.name=fedavg", "4 nodes, fedavg (a server); cpu fp32", r"[\d.]+ MB in round 2"),
        ("algorithm.name=centralized", "1 node, centralized; cpu fp32", r"none in 2 trial rounds$"),
        ("algorithm.name=local", "4 nodes, local (no messages); cpu fp32", r"none in 2 trial rounds$"),
    ],
)
def test_the_plan_names_how_the_nodes_meet(tmp_path, override, nodes, messages):
    """A server method's plan names no graph (it reads none); a run without messages says so."""
    exp = build_experiment(load_config(SMOKE, [override, f"run_dir={tmp_path / 'run'}", "rounds=2"]))
    lines = plan_lines("\n".join(plan(exp)))
    assert lines["nodes"] == nodes
    assert re.match(messages, lines["messages"])
    assert not (tmp_path / "run").exists()


def test_compare_dry_run_says_what_the_grid_would_do_and_writes_nothing(tmp_path, tiny_bert, capsys):
    """A grid's dry run names each cell's fate (a half-finished cell resumes, a finished one is skipped),
    times the methods that would run, and changes no folder."""
    out = tmp_path / "out"
    for name in ("short", "whole"):
        (tmp_path / name).mkdir()
    # dec_lora alone, 1 round of 2: its cell is then half done
    short = tiny_grid_file(
        tmp_path / "short",
        tiny_bert,
        ("rounds=1",),
        grid={"algorithm.name": ["dec_lora"]},
        seeds=[0],
        out=str(out),
    )
    assert main(["compare", str(short)]) == 0
    whole = tiny_grid_file(tmp_path / "whole", tiny_bert, seeds=[0], out=str(out))
    before = folder_digest(out)
    capsys.readouterr()
    assert main(["compare", str(whole), "--dry-run"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"dry run of a grid of 2 cells in {out}: nothing is kept"
    assert said[1] == "  [1/2] algorithm.name=dec_lora seed=0: would resume (50% of it left)"
    assert said[2] == "  [2/2] algorithm.name=local seed=0: would run"
    assert re.match(
        r"  algorithm.name=dec_lora: set-up [\d.]+ s, [\d.]+ s a round, [\d.]+ s an evaluation: "
        r"(about \d+ s|under a second) a run",
        said[4],
    )
    assert re.match(r"(about \d+ s|under a second) for the 2 cells to run, one after another", said[-1])
    assert folder_digest(out) == before
    assert main(["compare", str(whole)]) == 0
    capsys.readouterr()
    assert main(["compare", str(whole), "--dry-run"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[1:] == [
        "  [1/2] algorithm.name=dec_lora seed=0: finished, skipped",
        "  [2/2] algorithm.name=local seed=0: finished, skipped",
        "every cell is finished: the grid would only write its table",
    ]
