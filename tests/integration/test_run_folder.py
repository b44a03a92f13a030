"""Run-folder safety end to end: --overwrite, a recorded resume, a full disk, a diverged run, stale grid
cells. Tiny BERT, two rounds, through the real CLI in-process."""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import as_at_a_terminal, crash_after_round, metrics_records, tiny_run_overrides, write_tiny_data
from safetensors.torch import load_file, save_file

from declora.cli import main
from declora.compare import expand, load_grid, run_grid
from declora.config import ConfigError, load_config
from declora.engine import run as run_experiment
from declora.experiment import build_experiment
from declora.runfolder import read_resumes

pytestmark = pytest.mark.integration


SMALL = ("nodes=2", "rounds=2", "data.test_fraction=0.25", "partition.min_size=2", "train.local_steps=1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bert, restore_threads):
    return tiny_run_overrides(tmp_path_factory, tiny_bert, 32, *SMALL)


def _rounds(run: Path) -> list[int]:
    return [r["round"] for r in metrics_records(run)]


def test_overwrite_replaces_an_earlier_run_only_when_asked(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["run", *tiny, f"run_dir={run}", "seed=1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (run / "metrics.jsonl").read_bytes() == before
    (run / "stray.txt").write_text("from the earlier run")
    assert main(["run", *tiny, f"run_dir={run}", "seed=1", "--overwrite"]) == 0
    assert not (run / "stray.txt").exists() and load_config(run / "config.yaml").seed == 1
    assert _rounds(run) == [0, 0, 1, 2]


def test_resume_with_more_rounds_is_recorded(tiny, tmp_path):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    assert main(["run", "--resume", str(run), "rounds=3", "eval.every=3"]) == 0
    assert load_config(run / "config.yaml").rounds == 3  # the folder describes the run as it went on
    (entry,) = read_resumes(run)
    assert entry["from_round"] == 2
    assert entry["changes"] == {"rounds": {"old": 2, "new": 3}, "eval.every": {"old": 1, "new": 3}}
    assert _rounds(run) == [0, 0, 1, 2, 3]


def test_a_resume_by_a_relative_path_keeps_the_folders_recorded_path(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", "run", "rounds=3"]) == 0  # the same folder, named relatively
    assert load_config(run / "config.yaml").run_dir == str(run)
    (entry,) = read_resumes(run)
    assert entry["changes"] == {"rounds": {"old": 2, "new": 3}}
    moved = tmp_path / "moved"
    run.rename(moved)
    assert main(["run", "--resume", "moved", "rounds=4"]) == 0  # a moved folder: recorded where it is now
    assert load_config(moved / "config.yaml").run_dir == str(moved)


def test_a_resume_from_another_folder_never_opens_other_files_by_a_relative_path(
    tiny, tmp_path, monkeypatch, capsys
):
    here, there = tmp_path / "a", tmp_path / "b"
    for folder in (here, there):
        folder.mkdir()
        write_tiny_data(folder / "data.jsonl", 32)
    flipped = [{**row, "label": 1 - row["label"]} for row in map(json.loads, (there / "data.jsonl").open())]
    (there / "data.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in flipped)
    )  # same name, other labels
    relative = [a for a in tiny if not a.startswith("data.dataset=")] + ["data.dataset=data.jsonl"]
    run = tmp_path / "run"
    monkeypatch.chdir(here)
    assert main(["run", *relative, f"run_dir={run}"]) == 0
    before = (run / "metrics.jsonl").read_bytes()
    monkeypatch.chdir(there)
    assert main(["run", "--resume", str(run), "rounds=3"]) == 2
    err = capsys.readouterr().err
    assert (
        f"data.dataset='data.jsonl' is relative, and the run opened it in {here}; from here ({there})" in err
    )
    assert f"Resume from {here} (cd there)" in err and (run / "metrics.jsonl").read_bytes() == before
    monkeypatch.chdir(here)
    assert main(["run", "--resume", str(run), "rounds=3"]) == 0
    (here / "data.jsonl").rename(there / "data.jsonl")  # the inputs moved: they are opened where they are
    monkeypatch.chdir(there)
    assert main(["run", "--resume", str(run), "rounds=4"]) == 0


def test_a_resume_warns_when_an_input_changed_since_the_start(tiny, tmp_path, caplog, capsys):
    data = write_tiny_data(tmp_path / "data.jsonl", 32)
    args = [a for a in tiny if not a.startswith("data.dataset=")] + [f"data.dataset={data}"]
    run = tmp_path / "run"
    assert main(["run", *args, f"run_dir={run}"]) == 0
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["inputs"]["data.dataset"]["bytes"] == data.stat().st_size
    assert main(["run", "--resume", str(run), "rounds=3"]) == 0
    assert "changed since the run started" not in caplog.text
    rows = data.read_text().splitlines()
    data.write_text("".join(r.replace('"text": "', '"text": "edited ') + "\n" for r in rows))  # same rows
    assert main(["run", "--resume", str(run), "rounds=4"]) == 0
    size = start["inputs"]["data.dataset"]["bytes"]
    assert f"data.dataset ({data}) changed since the run started ({size} bytes" in caplog.text
    data.write_text("".join(r + "\n" for r in rows + rows[:3]))  # three rows more: other node sizes
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(run), "rounds=5"]) == 2
    assert "the training data changed since the run started (node " in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before  # refused before anything was written
    third = [json.loads(r) for r in rows]
    third[0]["label"] = 2  # the same rows, one of them now a third class: the head cannot go on
    data.write_text("".join(json.dumps(r) + "\n" for r in third))
    assert main(["run", "--resume", str(run), "rounds=5"]) == 2
    err = capsys.readouterr().err
    assert (
        "the training data's labels changed since the run started (2 labels, now 3: ['0', '1', '2'])" in err
    )
    assert (run / "metrics.jsonl").read_bytes() == before


def test_more_rounds_on_resume_are_refused_when_the_noise_spends_a_target_epsilon(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    dp = ("privacy.level=node", "privacy.target_epsilon=8", "privacy.clip=1.0")
    assert main(["run", *tiny, *dp, f"run_dir={run}"]) == 0
    before = (run / "config.yaml").read_bytes()
    assert main(["run", "--resume", str(run), "rounds=3"]) == 2  # sigma was solved for 2 rounds
    assert "rounds cannot change on resume with privacy.target_epsilon" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == before and _rounds(run) == [0, 0, 1, 2]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_more_rounds_on_resume_are_refused_under_a_decaying_learning_rate(tiny, tmp_path, capsys, schedule):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"train.schedule={schedule}", f"run_dir={run}"]) == 0
    before = (run / "config.yaml").read_bytes()
    assert main(["run", "--resume", str(run), "rounds=3"]) == 2  # its lr decayed to 0 over 2 rounds
    assert f"rounds cannot change on resume with train.schedule={schedule}" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == before and _rounds(run) == [0, 0, 1, 2]


def test_a_finished_run_resumed_with_export_all_writes_every_node_at_its_last_round(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    consensus = (run / "adapters" / "consensus" / "adapter_model.safetensors").read_bytes()
    assert main(["run", "--resume", str(run), "export=all"]) == 0
    assert _rounds(run) == [0, 0, 1, 2]  # no round ran again
    assert (run / "adapters" / "consensus" / "adapter_model.safetensors").read_bytes() == consensus
    for folder in ("consensus", "node_000", "node_001"):
        card = json.loads((run / "adapters" / folder / "declora_adapter.json").read_text())
        assert card["round"] == 2 and "acc_avg_factors" in card["metrics"]
    assert f"adapters: {run / 'adapters'}" in capsys.readouterr().out


def test_export_cannot_change_on_resume_when_the_best_round_is_exported(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}", "export=none", "export_round=best"]) == 0
    assert "adapters:" not in capsys.readouterr().out  # nothing exported, no folder named
    before = (run / "config.yaml").read_bytes()
    assert main(["run", "--resume", str(run), "export=all"]) == 2
    err = capsys.readouterr().err
    assert "export cannot change on resume with export_round=best" in err and len(err.splitlines()) == 1
    assert (run / "config.yaml").read_bytes() == before and not (run / "adapters").exists()


def test_a_full_disk_is_one_line_and_the_checkpoint_survives(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))
    capsys.readouterr()
    try:
        code = main(["run", "--resume", str(run), "rounds=3"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("declora: error:") and "\n" not in err and "metrics.jsonl" in err, err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files
    assert main(["run", "--resume", str(run), "rounds=3"]) == 0 and _rounds(run)[-1] == 3


def _blown_up_adapter(tiny: list[str], tmp_path: Path) -> Path:
    """A finished run's consensus adapter with every entry 1e30: a run that starts from it diverges."""
    first = tmp_path / "first"
    assert main(["run", *tiny, f"run_dir={first}"]) == 0
    adapter = first / "adapters" / "consensus" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in load_file(str(adapter)).items()}, str(adapter))
    return adapter.parent


def test_a_diverged_run_stops_naming_the_node_and_keeps_its_last_checkpoint(tiny, tmp_path, capsys):
    adapter = _blown_up_adapter(tiny, tmp_path)
    run = tmp_path / "run"
    capsys.readouterr()
    code = main(["run", *tiny, f"run_dir={run}", f"model.init_adapter={adapter}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "round 1: node" in err and "NaN or Inf" in err and "\n" not in err, err
    assert "(no checkpoint yet)" in err, err  # the round of the checkpoint on disk, not a guess
    assert not (run / "state").exists()  # nothing bad was saved
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rounds] == ["start", "partition", "diverged"]  # no 0.0 or NaN round logged
    assert rounds[-1]["round"] == 1 and rounds[-1]["reason"] == err.removeprefix("declora: error: ")
    # the report says why it stopped: a resume repeats the same steps, so it does not offer one
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "STOPPED, a NaN or Inf at round 1" in report and "lower train.lr" in report, report
    assert "--resume" not in report


def test_a_private_run_that_diverges_names_the_dp_noise_first(tiny, tmp_path, capsys):
    adapter = _blown_up_adapter(tiny, tmp_path)
    run = tmp_path / "run"
    private = ["privacy.level=node", "privacy.noise_multiplier=2.5", "privacy.clip=0.5"]
    capsys.readouterr()
    assert main(["run", *tiny, f"run_dir={run}", f"model.init_adapter={adapter}", *private]) == 1
    err = capsys.readouterr().err.strip()
    assert "NaN or Inf" in err and "try less DP noise (noise multiplier 2.5 x privacy.clip 0.5)" in err, err
    assert main(["report", str(run)]) == 0
    assert "start again with less DP noise (privacy.noise_multiplier" in (run / "report.md").read_text()


def test_a_grid_cell_run_with_another_config_is_refused(tiny, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({}))
    grid = {"base": str(base), "out": str(tmp_path / "grid"), "overrides": tiny, "seeds": [0]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    run_grid(load_grid(path))
    grid["overrides"] = [*tiny, "train.lr=0.002"]
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=r"train\.lr cannot change"):
        run_grid(load_grid(path))
    grid["overrides"] = [*tiny, "rounds=3"]  # more rounds: the cell resumes, and says so
    path.write_text(yaml.safe_dump(grid))
    states = []
    (cell,) = run_grid(load_grid(path), lambda k, n, c, state: states.append(state))
    assert states == ["partial"] and _rounds(cell.run_dir)[-1] == 3 and len(read_resumes(cell.run_dir)) == 1


def test_the_start_line_says_how_many_examples_each_evaluation_scores(tiny, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="declora.experiment"):
        assert main(["run", *tiny, "eval.consensus_examples=1000", f"run_dir={run}"]) == 0
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["eval_examples"] == {"consensus": 8, "node": 4}  # a quarter of 32 rows held out
    assert (
        "eval.consensus_examples=1000 asks for more than the 8 held-out examples: all 8 are scored"
        in caplog.text
    )


def test_an_adapter_made_on_another_base_is_warned_about(tiny, tmp_path, caplog):
    first = tmp_path / "first"
    assert main(["run", *tiny, f"run_dir={first}"]) == 0
    adapter = first / "adapters" / "consensus"
    with caplog.at_level("WARNING", logger="declora.preflight"):
        assert (
            main(["run", *tiny, "rounds=1", f"run_dir={tmp_path / 'same'}", f"model.init_adapter={adapter}"])
            == 0
        )
        assert "was made on base" not in caplog.text  # its own base
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "/elsewhere/another-model"
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        assert (
            main(["run", *tiny, "rounds=1", f"run_dir={tmp_path / 'other'}", f"model.init_adapter={adapter}"])
            == 0
        )
    assert "was made on base '/elsewhere/another-model'; this run's base is" in caplog.text


def _declora(*args: str, **kwargs):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "declora", *args], env=env, preexec_fn=as_at_a_terminal, **kwargs
    )


def test_a_folder_another_process_is_writing_is_refused_and_free_again_after_it(tiny, tmp_path, capsys):
    # A real second declora process: while it writes the folder, a resume, an overwrite and a new run of
    # the same folder are each refused (they would interleave their rounds); a kill releases the lock.
    import subprocess
    import time

    run = tmp_path / "busy"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    other = _declora("run", *tiny, "rounds=1000", "eval.every=1000", f"run_dir={run}", **quiet)
    try:
        deadline = time.time() + 120
        while not (run / "state" / "latest.json").is_file():  # it has run a round and checkpointed it
            assert other.poll() is None and time.time() < deadline, "the other run did not start"
            time.sleep(0.2)
        before = (run / "config.yaml").read_bytes()
        attempts = (
            ["run", "--resume", str(run)],
            ["run", *tiny, f"run_dir={run}", "--overwrite"],
            ["run", *tiny, f"run_dir={run}"],
        )
        for attempt in attempts:
            capsys.readouterr()
            assert main(attempt) == 2, attempt
            err = capsys.readouterr().err.strip()
            assert "is in use by another declora process" in err and "\n" not in err, err
        assert (run / "config.yaml").read_bytes() == before and other.poll() is None  # untouched, still going
    finally:
        other.kill()
        other.wait()
    done = json.loads((run / "state" / "latest.json").read_text())["round"]
    assert main(["run", "--resume", str(run), f"rounds={done + 1}"]) == 0  # a killed holder holds nothing
    assert _rounds(run)[-1] == done + 1


def test_a_checkpoint_temporary_left_by_a_kill_is_removed_at_the_next_checkpoint(tiny, tmp_path):
    # safetensors writes through its own state/.tmpXXXXXX; a kill inside that write leaves one behind,
    # as big as a checkpoint, which nothing else would ever remove.
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    stray = run / "state" / ".tmpAbC123"
    stray.write_bytes(b"\0" * 4096)
    assert main(["run", "--resume", str(run), "rounds=3"]) == 0
    assert not stray.exists() and _rounds(run)[-1] == 3


@pytest.mark.parametrize(
    ("sig", "code", "what"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated"),
        (signal.SIGHUP, 129, "hung up (its terminal closed)"),  # a closed terminal: a stop, not a kill
    ],
)
def test_ctrl_c_or_a_kill_is_one_line_and_the_run_resumes(tiny, tmp_path, sig, code, what):
    import subprocess
    import time

    run = tmp_path / "run"
    proc = _declora("run", *tiny, "rounds=1000", "eval.every=1000", f"run_dir={run}", stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "state" / "latest.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = [x for x in err.decode().splitlines() if x.startswith("declora") or "Traceback" in x]
    assert proc.returncode == code and "Traceback" not in err.decode(), err.decode()[-2000:]
    assert lines == [
        f"declora: {what}; the run folder keeps its last checkpoint: declora run --resume "
        f"{run} continues from it"
    ], lines
    done = json.loads((run / "state" / "latest.json").read_text())["round"]
    assert main(["run", "--resume", str(run), f"rounds={done + 1}"]) == 0


def test_a_reader_that_leaves_the_pipe_early_gets_no_error(tiny, tmp_path):
    import subprocess

    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    report = _declora("report", str(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report.stdout.readline()
    report.stdout.close()  # as `| head -1` does
    err = report.stderr.read().decode()
    assert report.wait(timeout=60) in (0, 141) and err == "", err


def test_report_compares_a_run_stopped_before_round_one_and_refuses_a_percent_target(tiny, tmp_path, capsys):
    done, empty = tmp_path / "done", tmp_path / "empty"
    assert main(["run", *tiny, f"run_dir={done}"]) == 0
    empty.mkdir()
    (empty / "config.yaml").write_bytes((done / "config.yaml").read_bytes())
    head = (done / "metrics.jsonl").read_text().splitlines()[:2]  # start and partition: killed in round 1
    (empty / "metrics.jsonl").write_text("\n".join(head) + "\n")
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["report", str(done), str(empty), "--out", str(out)]) == 0  # a numpy reshape error before
    assert (out / "comparison.png").is_file() and "not finished" in (out / "comparison.md").read_text()
    assert main(["report", str(done), str(empty), "--out", str(out), "--target", "65"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "declora: error: --target=65.0: acc_avg_factors is a fraction in [0, 1] (the tables show it in %); "
        "for 65 % give 0.65"
    ), err


def test_a_run_dir_below_a_file_names_the_file(tiny, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main(["run", *tiny, f"run_dir={blocker / 'sub'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"declora: error: run folder '{blocker / 'sub'}': '{blocker}' is a file, not a folder", err


def test_a_folder_that_is_not_a_run_is_refused_untouched_with_advice_that_works(tiny, tmp_path, capsys):
    from declora.engine import run
    from declora.experiment import build_experiment

    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        assert main(["run", *tiny, f"run_dir={mine}", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"declora: error: run folder '{mine}' is not empty and is not a declora run folder (no "
            "config.yaml / config.yaml.tmp / metrics.jsonl / state): declora writes only into its own run "
            "folders; choose another run_dir"
        )
    cfg = load_config(None, [*tiny, f"run_dir={mine}"])
    with pytest.raises(ConfigError, match="is not a declora run folder"):
        run(build_experiment(cfg))  # from Python: refused before its lock file is made there
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    typo = tmp_path / "typo" / "sub"
    with pytest.raises(ConfigError, match="nothing to resume in .*no config.yaml"):
        run(build_experiment(load_config(None, [*tiny, f"run_dir={typo}"])), resume=True)
    assert not (tmp_path / "typo").exists()


def test_an_interruption_names_the_folder_only_once_it_holds_a_run(tmp_path):
    from argparse import Namespace

    from declora.cli import _interrupted_line

    run = tmp_path / "run"
    fresh = Namespace(command="run", run_dir=None, resume=None)
    assert _interrupted_line(fresh) == (
        "the run had not started (no run folder was written): the same command starts it"
    )
    assert _interrupted_line(Namespace(command="run", run_dir=run, resume=None)) == _interrupted_line(fresh)
    run.mkdir()
    (run / "config.yaml").write_text("nodes: 2\n")  # started, stopped before its first checkpoint
    first = f"the run folder holds no checkpoint yet: declora run --resume {run} starts it from round 0"
    assert _interrupted_line(Namespace(command="run", run_dir=run, resume=None)) == first
    (run / "state").mkdir()
    (run / "state" / "latest.json").write_text('{"round": 2}')
    hint = f"the run folder keeps its last checkpoint: declora run --resume {run} continues from it"
    assert _interrupted_line(Namespace(command="run", run_dir=run, resume=None)) == hint
    assert _interrupted_line(Namespace(command="run", run_dir=None, resume=str(run))) == hint
    assert _interrupted_line(Namespace(command="compare")).startswith("finished cells are kept")


def test_a_one_node_runs_header_names_no_graph_and_node_slices_say_they_split_a_torchrun_launch(
    tiny, tmp_path, capsys
):
    from declora.dist import make_layout

    assert main(["run", *tiny, "algorithm.name=centralized", f"run_dir={tmp_path / 'c'}"]) == 0
    assert "(1 node, centralized, cpu fp32)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"sum to nodes=4; this launch has 1 process: dist.node_slices"):
        make_layout(4, 1, (2, 2))


def test_resume_hints_name_the_launch_the_checkpoint_was_saved_by(tmp_path):
    from argparse import Namespace

    from declora.cli import _interrupted_line
    from declora.report import format_table
    from declora.runfolder import resume_command

    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "config.yaml").write_text("nodes: 4\n")
    assert resume_command(run) == f"declora run --resume {run}"  # no checkpoint yet
    (run / "state" / "latest.json").write_text(json.dumps({"round": 3, "wall_s": 1.0, "node_slices": [2, 2]}))
    torchrun = f"torchrun --nproc-per-node 2 -m declora run --resume {run}"
    assert resume_command(run) == torchrun
    assert torchrun in _interrupted_line(Namespace(command="run", run_dir=run, resume=None))
    summary = {"rounds": 3, "stopped_early": (3, 30), "accuracy": {}, "final": {}}
    assert f"`{torchrun}` continues a stopped run" in format_table(summary, run_dir=run)
    (run / "state" / "latest.json").write_text(json.dumps({"round": 3, "wall_s": 1.0, "node_slices": [4]}))
    assert resume_command(run) == f"declora run --resume {run}"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("lost", "every"),
    [("state", 1), ("state/latest.json", 1), ("state", 5)],  # 5: the only checkpoint was the last round's
)
def test_a_resume_whose_checkpoint_is_gone_is_refused_not_restarted_over_the_rounds_done(
    tiny, tmp_path, capsys, lost, every
):
    import shutil

    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}", f"checkpoint_every={every}"]) == 0
    (run / "notes.txt").write_text("the user's own notes")
    gone = run / lost
    shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    before = _files(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "export=all"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("declora: error: ") and "\n" not in err, err
    assert f"{run / 'state' / 'latest.json'} is missing, but the run logged 2 rounds" in err, err
    assert _files(run) == before  # nothing retrained, nothing deleted
    with pytest.raises(ConfigError, match="is missing, but the run logged 2 rounds"):  # from Python too
        run_experiment(build_experiment(load_config(run / "config.yaml")), resume=True)
    assert _files(run) == before


def test_a_run_stopped_before_its_first_checkpoint_still_starts_again_on_resume(tiny, tmp_path):
    run = tmp_path / "run"
    crash_after_round(build_experiment(load_config(None, [*tiny, f"run_dir={run}", "checkpoint_every=2"])), 1)
    assert not (run / "state" / "latest.json").exists() and _rounds(run)[-1] == 1
    assert main(["run", "--resume", str(run)]) == 0
    assert _rounds(run) == [0, 0, 1, 2] and read_resumes(run)[0]["from_round"] == 0


def test_a_resume_into_another_run_dir_is_refused(tiny, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    before = _files(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), f"run_dir={other}", "rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run_dir={other} with --resume {run}: a resumed run goes on in the folder --resume names" in err
    assert not other.exists() and _files(run) == before
    assert main(["run", "--resume", str(run), f"run_dir={run}", "rounds=3"]) == 0  # its own folder: fine


def test_rounds_lowered_to_an_unevaluated_checkpoint_round_are_refused(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(None, [*tiny, f"run_dir={run}", "rounds=4", "eval.every=3"])
    crash_after_round(build_experiment(cfg), 3)  # checkpoint of round 2, which eval.every=3 did not score
    before = _files(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rounds=2 would end the run at its checkpoint's round 2, which was not evaluated" in err, err
    assert _files(run) == before
    assert main(["run", "--resume", str(run), "rounds=3"]) == 0  # a round to run, evaluated as the last
    assert [r["round"] for r in metrics_records(run) if r["event"] == "eval"] == [3]


def _grid(tmp_path: Path, tiny: list[str], *extra: str, axes: dict | None = None) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({}))
    grid = {"base": str(base), "out": str(tmp_path / "grid"), "overrides": [*tiny, *extra], "seeds": [0]}
    if axes:
        grid["grid"] = axes
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_grid_cell_whose_checkpoint_is_gone_is_refused_not_rerun(tiny, tmp_path):
    import shutil

    (cell,) = run_grid(load_grid(_grid(tmp_path, tiny)))
    shutil.rmtree(cell.run_dir / "state")
    (cell.run_dir / "notes.txt").write_text("the user's own notes")
    before = _files(cell.run_dir)
    with pytest.raises(ConfigError, match=r"train\.lr cannot change"):  # another config: stale, as ever
        run_grid(load_grid(_grid(tmp_path, tiny, "train.lr=0.05")))
    with pytest.raises(
        ConfigError, match=r"latest\.json is missing, .* delete that folder to rerun the cell"
    ):
        run_grid(load_grid(_grid(tmp_path, tiny)))
    assert _files(cell.run_dir) == before


def test_a_grid_cell_with_a_corrupt_checkpoint_is_named(tiny, tmp_path):
    (cell,) = run_grid(load_grid(_grid(tmp_path, tiny)))
    latest = cell.run_dir / "state" / "latest.json"
    latest.write_text('{"round":')
    with pytest.raises(
        ConfigError, match=rf"checkpoint file {re.escape(str(latest))} is corrupt or truncated"
    ):
        run_grid(load_grid(_grid(tmp_path, tiny)))


def test_a_grid_cell_folder_of_other_files_stops_the_grid_before_any_cell_runs(tiny, tmp_path):
    path = _grid(tmp_path, tiny, axes={"algorithm.name": ["dec_lora", "fedavg"]})
    first, second = expand(load_grid(path))
    second.run_dir.mkdir(parents=True)
    (second.run_dir / "x.txt").write_text("not a run")
    with pytest.raises(ConfigError, match="is not empty and is not a declora run folder"):
        run_grid(load_grid(path))
    assert not first.run_dir.exists() and (second.run_dir / "x.txt").read_text() == "not a run"


def test_a_comparison_folder_that_cannot_be_made_is_refused_before_any_report(tiny, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *tiny, f"run_dir={a}"]) == 0 and main(["run", *tiny, f"run_dir={b}", "seed=1"]) == 0
    (tmp_path / "file").write_text("not a folder")
    for out, said in [
        ("", "--out '' names no folder"),
        (str(tmp_path / "file" / "x"), "cannot make that folder"),
    ]:
        capsys.readouterr()
        assert main(["report", str(a), str(b), "--out", out]) == 2
        printed = capsys.readouterr()
        assert said in printed.err and "\n" not in printed.err.strip(), printed.err
        assert printed.out == ""  # no run's report printed before the refusal
    assert main(["compare", "grid.yaml", "--out", ""]) == 2
    assert "--out '' names no folder" in capsys.readouterr().err


def test_a_grid_cell_whose_data_or_model_does_not_fit_stops_the_grid_before_any_cell_runs(tiny, tmp_path):
    for axis, said in [
        ({"nodes": [2, 100]}, r"grid cell nodes=100 seed=0: nodes=100 must be between 1 and"),
        ({"model.target_modules": [["query"], ["valu"]]}, r"grid cell .*valu.*: .* matches no linear layer"),
    ]:
        path = _grid(tmp_path, tiny, axes=axis)
        first = expand(load_grid(path))[0]
        with pytest.raises(ConfigError, match=said):
            run_grid(load_grid(path))
        assert not first.run_dir.exists()


@pytest.mark.parametrize("damage", ["round 1 cut", "start cut", "emptied", "deleted"])
def test_a_resume_whose_log_lost_checkpointed_rounds_is_refused(tiny, tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}", "checkpoint_every=1"]) == 0  # checkpoint at round 2
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    kept = {
        "round 1 cut": [x for x in lines if json.loads(x).get("round") != 1],
        "start cut": lines[1:],
        "emptied": [],
    }
    if damage == "deleted":
        log.unlink()
    else:
        log.write_text("".join(kept[damage]))
    files = _files(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    expected = "lacks round 1 of the 2" if damage == "round 1 cut" else "has no start record"
    assert expected in err and "--overwrite" in err and "\n" not in err, err
    assert _files(run) == files  # refused before anything was written


def test_report_on_a_run_another_process_writes_prints_its_table_and_writes_nothing(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *tiny, f"run_dir={run}"]) == 0
    (run / "report.md").unlink()
    files = _files(run)
    holder = subprocess.Popen(  # holds the run folder's lock, as a running declora run does
        [sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["report", str(run)]) == 0
        out = capsys.readouterr().out
        assert "acc_avg_factors" in out and "still running" in out and "nothing was written there" in out
        assert _files(run) == files  # no report.md or curves.png written into the folder in use
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", str(run)]) == 0 and (run / "report.md").is_file()  # not in use: written


HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""
