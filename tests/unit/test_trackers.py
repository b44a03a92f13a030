"""Trackers offline: TensorBoard event files, a W&B offline run file, an MLflow file store; each holds
the config and the same per-round numbers as the round records, and a resume continues the same run."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from declora.config import load_config
from declora.trackers import Trackers, flat_params, scalars

pytestmark = pytest.mark.unit

RECORDS = [
    {"event": "round", "round": 1, "train_loss": 0.75, "bytes_total": 100, "local_steps": 2},
    {"event": "eval", "round": 2, "train_loss": 0.5, "acc_avg_factors": 0.625, "consensus_BA": math.nan},
]
EXPECTED = {  # what every tracker must hold: tag -> [(step, value)]
    "train/train_loss": [(1, 0.75), (2, 0.5)],
    "bytes/bytes_total": [(1, 100.0)],
    "run/local_steps": [(1, 2.0)],
    "accuracy/acc_avg_factors": [(2, 0.625)],
}


def test_scalars_are_the_records_finite_numbers():
    assert scalars(RECORDS[1]) == {"train/train_loss": 0.5, "accuracy/acc_avg_factors": 0.625}


def _log(tmp_path: Path, *trackers: str):
    cfg = load_config(None, [f"log.trackers=[{','.join(trackers)}]", "train.lr=0.003", "nodes=5"])
    run_dir = tmp_path / "runs" / "r1"
    for records in (RECORDS[:1], RECORDS[1:]):  # the second part as a resumed run
        board = Trackers(cfg, run_dir)
        for record in records:
            board(record)
        board.close()
    return cfg, run_dir


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _, run_dir = _log(tmp_path, "tensorboard")
    events = EventMultiplexer().AddRunsFromDirectory(str(run_dir / "tensorboard"))
    events.Reload()
    got: dict = {}
    for run in events.Runs():
        for tag in events.Runs()[run]["scalars"]:
            got.setdefault(tag, []).extend((e.step, round(e.value, 6)) for e in events.Scalars(run, tag))
    assert {k: sorted(v) for k, v in got.items()} == EXPECTED
    texts = [
        events.Tensors(run, "config/text_summary")
        for run in events.Runs()
        if "config/text_summary" in events.Runs()[run]["tensors"]
    ]
    assert "train.lr: 0.003" in texts[0][0].tensor_proto.string_val[0].decode()


def test_mlflow_file_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg, run_dir = _log(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())  # a file store
    experiment = client.get_experiment_by_name("declora")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "r1"  # the resume continued the one run
    assert runs[0].info.run_id == (run_dir / "mlflow_run_id").read_text()
    assert runs[0].data.params == flat_params(cfg) and runs[0].data.params["train.lr"] == "0.003"
    for tag, points in EXPECTED.items():
        history = client.get_metric_history(runs[0].info.run_id, tag)
        assert sorted((m.step, m.value) for m in history) == points, tag


def test_an_mlflow_experiment_another_process_created_meanwhile_is_used(tmp_path, monkeypatch):
    # Two cells of `declora compare --jobs` share OUT/mlruns: both may find no experiment, and the second
    # to create it would fail. Here the other process's experiment appears between the look and the create.
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "runs" / "mlruns").as_uri()
    theirs = MlflowClient(tracking_uri=store).create_experiment("declora")
    looks = []
    real_look = MlflowClient.get_experiment_by_name

    def first_look_misses(self, name):
        looks.append(name)
        return None if len(looks) == 1 else real_look(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", first_look_misses)
    cfg, run_dir = _log(tmp_path, "mlflow")
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([theirs])  # this run went into the experiment the other one made
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text() and len(looks) >= 2


def test_mlflow_resume_does_not_log_a_repeated_round_twice(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, ["log.trackers=[mlflow]"])
    run_dir = tmp_path / "runs" / "r1"
    third = {"event": "round", "round": 3, "train_loss": 0.25}
    # Killed after logging round 2 but before its checkpoint: the resume runs round 2 again.
    for records in (RECORDS, [RECORDS[1], third]):
        board = Trackers(cfg, run_dir)
        for record in records:
            board(record)
        board.close()
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run_id = (run_dir / "mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "train/train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.75), (2, 0.5), (3, 0.25)]
    assert [m.step for m in client.get_metric_history(run_id, "accuracy/acc_avg_factors")] == [2]


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file (a LevelDB-style log: 7-byte header, 32 KiB blocks, each
    record a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # wandb-core is still writing this record: the rest comes later
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record
        elif kind == 0:
            break


def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    _, run_dir = _log(tmp_path, "wandb")
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # the resume kept the run id
    # run.finish() returns before the wandb-core process has written the whole file: wait for its end.
    deadline = time.monotonic() + 60
    while not all(any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(f)) for f in files):
        assert time.monotonic() < deadline, "the W&B run files were not completed within 60 s"
        time.sleep(0.2)
    got: dict = {}
    config = {}
    for file in files:
        for record in _wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item
                }
                for tag, value in items.items():
                    if tag in EXPECTED or tag.startswith(("train/", "accuracy/", "bytes/", "run/")):
                        got.setdefault(tag, []).append((items["_step"], value))
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    assert {k: sorted(v) for k, v in got.items()} == EXPECTED
    assert config["train"]["lr"] == 0.003 and config["nodes"] == 5


def test_a_run_logs_to_its_trackers(tiny_bert, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from helpers import write_tiny_data
    from mlflow.tracking import MlflowClient

    from declora.engine import run
    from declora.experiment import build_experiment

    data = write_tiny_data(tmp_path / "d.jsonl", 40)
    overrides = [f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "nodes=2", "rounds=2"]
    overrides += [f"data.dataset={data}", "train.local_steps=1", "eval.node_examples=4", "export=none"]
    overrides += ["threads=1", "log.trackers=[mlflow]", "tensorboard=true", f"run_dir={tmp_path / 'runs/x'}"]
    records = run(build_experiment(load_config(None, overrides)))
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run_id = (tmp_path / "runs" / "x" / "mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "accuracy/acc_avg_factors")
    assert [(m.step, m.value) for m in history] == [(2, pytest.approx(records[-1]["acc_avg_factors"]))]
    # the older switch still works: the event files hold the same headline accuracy (as float32) at step 2
    assert records[-1]["round"] == 2
    board = _scalars_by_tag(tmp_path / "runs" / "x" / "tensorboard")
    assert board.get("accuracy/acc_avg_factors") == [(2, _float32(records[-1]["acc_avg_factors"]))]


def _float32(x: float) -> float:
    """``x`` rounded to float32, as an event file stores a scalar."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _tiny_run_args(tiny_bert, tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    """``declora run`` arguments of a 3-round tiny run into ``run_dir`` (``extra`` last)."""
    from helpers import write_tiny_data

    data = write_tiny_data(tmp_path / "d.jsonl", 40)
    args = [f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "nodes=2", "rounds=3"]
    args += [f"data.dataset={data}", "partition.min_size=2", "train.local_steps=1", "eval.node_examples=4"]
    return [*args, "eval.every=1", "export=none", "threads=1", f"run_dir={run_dir}", *extra]


def _killed_after_round_2(tiny_bert, tmp_path, monkeypatch, *extra: str) -> Path:
    """A 3-round tiny run with an MLflow tracker, killed once round 2 is logged (and sent to the
    trackers) but before any later checkpoint; its folder."""
    from declora.cli import main
    from declora.runfolder import CRASH_ENV, CrashPoint, reset_crash_counts

    run_dir = tmp_path / "runs" / "x"
    args = _tiny_run_args(tiny_bert, tmp_path, run_dir, "log.trackers=[mlflow]", *extra)
    reset_crash_counts()
    monkeypatch.setenv(CRASH_ENV, "round.logged:2")
    with pytest.raises(CrashPoint):
        main(["run", *args])
    monkeypatch.delenv(CRASH_ENV)
    reset_crash_counts()
    return run_dir


def test_a_run_killed_before_its_first_checkpoint_resumes_into_the_same_mlflow_run(
    tiny_bert, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from declora.cli import main

    run_dir = _killed_after_round_2(tiny_bert, tmp_path, monkeypatch, "checkpoint_every=3")  # no checkpoint
    assert main(["run", "--resume", str(run_dir)]) == 0  # starts again from round 0
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("declora").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "accuracy/acc_avg_factors")
    assert sorted(m.step for m in history) == [1, 2, 3]


def _scalars_by_tag(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    events = EventMultiplexer().AddRunsFromDirectory(str(folder))
    events.Reload()
    got: dict = {}
    for run in events.Runs():
        for tag in events.Runs()[run]["scalars"]:
            got.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(run, tag))
        if "config/text_summary" in events.Runs()[run]["tensors"]:
            got.setdefault("config", []).extend(events.Tensors(run, "config/text_summary"))
    return got


def test_a_resumed_run_sends_no_round_twice_and_records_its_changes(tiny_bert, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    from declora.cli import main

    # round 2 sent to the trackers, round 1 checkpointed
    run_dir = _killed_after_round_2(
        tiny_bert, tmp_path, monkeypatch, "checkpoint_every=1", "tensorboard=true"
    )
    assert main(["run", "--resume", str(run_dir), "checkpoint_every=2"]) == 0  # runs round 2 again
    board = _scalars_by_tag(run_dir / "tensorboard")
    assert sorted(step for step, _ in board["accuracy/acc_avg_factors"]) == [1, 2, 3]
    assert len(board["config"]) == 1  # the config text of the run's start, once
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert sorted(m.step for m in client.get_metric_history(run_id, "accuracy/acc_avg_factors")) == [1, 2, 3]
    logged = client.get_run(run_id).data
    assert logged.params["checkpoint_every"] == "1" and logged.tags["resumed.checkpoint_every"] == "2"


def test_wandb_follows_wandb_mode_unless_the_config_names_one(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    board = Trackers(load_config(None, ["log.trackers=[wandb]"]), tmp_path / "a")
    board(RECORDS[0])
    board.close()
    assert not list((tmp_path / "a").glob("wandb/offline-run-*"))  # disabled: nothing written
    board = Trackers(load_config(None, ["log.trackers=[wandb]", "log.wandb_mode=offline"]), tmp_path / "b")
    board(RECORDS[0])
    board.close()
    assert len(list((tmp_path / "b").glob("wandb/offline-run-*"))) == 1


def test_a_tracker_that_is_not_installed_is_refused_when_the_config_loads(monkeypatch):
    import importlib.util

    from declora.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=r"log.trackers asks for wandb, which is not installed: pip install 'declora\[trackers\]'",
    ):
        load_config(None, ["log.trackers=[wandb]"])
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"^tensorboard=true asks for tensorboard, which is not installed"):
        load_config(None, ["tensorboard=true"])


def _wandb_run_ids(run_dir: Path) -> set[str]:
    return {p.stem.removeprefix("run-") for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}


def _log_then_move_and_resume(tmp_path: Path, prepare=None) -> Path:
    """RECORDS[:1] logged to W&B (offline) in runs/A/r1, the folder moved to runs/B/r1 (after
    ``prepare(folder)``), RECORDS[1:] logged there as its resume; the moved folder."""
    cfg = load_config(None, ["log.trackers=[wandb]", "log.wandb_mode=offline"])
    first, moved = tmp_path / "runs" / "A" / "r1", tmp_path / "runs" / "B" / "r1"
    for run_dir, records in ((first, RECORDS[:1]), (moved, RECORDS[1:])):
        board = Trackers(cfg, run_dir)
        for record in records:
            board(record)
        board.close()
        if run_dir == first:
            if prepare is not None:
                prepare(first)
            moved.parent.mkdir(parents=True)
            first.rename(moved)
    return moved


def test_a_moved_folder_resumes_into_the_same_wandb_run(tmp_path):
    pytest.importorskip("wandb")
    run_dir = _log_then_move_and_resume(tmp_path)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # a start and a resume
    ids = _wandb_run_ids(run_dir)
    assert len(ids) == 1 and ids == {(run_dir / "wandb_run_id").read_text()}  # one W&B run


def test_a_folder_of_an_older_declora_keeps_its_wandb_run(tmp_path):
    """Older folders hold no wandb_run_id: the id their W&B run files carry is continued, moved or not."""
    pytest.importorskip("wandb")

    def as_older_declora(folder: Path) -> None:
        older = "0123456789abcdef"  # the older id: a hash of the folder's path
        (folder / "wandb_run_id").unlink()
        for run in (folder / "wandb").glob("offline-run-*"):
            new = run.with_name(f"{run.name.rsplit('-', 1)[0]}-{older}")
            run.rename(new)
            for file in new.glob("run-*.wandb"):
                file.rename(file.with_name(f"run-{older}.wandb"))

    run_dir = _log_then_move_and_resume(tmp_path, as_older_declora)
    assert _wandb_run_ids(run_dir) == {"0123456789abcdef"}
    assert (run_dir / "wandb_run_id").read_text() == "0123456789abcdef"


def _folder_state(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resuming_a_moved_folder_whose_mlflow_store_stayed_behind_is_refused_untouched(
    tiny_bert, tmp_path, capsys
):
    """The default store (mlruns beside the folder) does not move with it: the resume is refused in one
    line, before the folder changes, from the command line and from Python."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from declora.cli import main
    from declora.config import ConfigError
    from declora.engine import run
    from declora.experiment import build_experiment

    first, moved = tmp_path / "A" / "x", tmp_path / "B" / "x"
    assert (
        main(["run", *_tiny_run_args(tiny_bert, tmp_path, first, "rounds=2", "log.trackers=[mlflow]")]) == 0
    )
    moved.parent.mkdir()
    first.rename(moved)
    before = _folder_state(moved)
    capsys.readouterr()
    assert main(["run", "--resume", str(moved), "rounds=3"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not in the store" in err and "log.mlflow_uri" in err
    assert _folder_state(moved) == before and not (tmp_path / "B" / "mlruns").exists()
    store = MlflowClient(tracking_uri=(tmp_path / "B" / "mlruns").as_uri())
    store.create_experiment("other")  # a store there now, but without the run
    cfg = load_config(moved / "config.yaml", ["rounds=3", f"run_dir={moved}"])
    with pytest.raises(ConfigError, match="is not in the store"):
        run(build_experiment(cfg), resume=True)
    assert _folder_state(moved) == before
    old_store = (tmp_path / "A" / "mlruns").as_uri()  # pointed back at the store it logged to: continued
    assert main(["run", "--resume", str(moved), "rounds=3", f"log.mlflow_uri={old_store}"]) == 0
    run_id = (moved / "mlflow_run_id").read_text().strip()
    history = MlflowClient(tracking_uri=old_store).get_metric_history(run_id, "train/train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_a_run_that_used_wandb_resumes_without_it_when_log_trackers_drops_it(
    tiny_bert, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    import importlib.util

    from declora.cli import main

    run_dir = tmp_path / "runs" / "x"
    args = _tiny_run_args(
        tiny_bert, tmp_path, run_dir, "rounds=2", "log.trackers=[wandb]", "log.wandb_mode=disabled"
    )
    assert main(["run", *args]) == 0
    real = importlib.util.find_spec  # wandb not installed, from here on
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb: ImportError
    assert main(["run", "--resume", str(run_dir), "rounds=3"]) == 2  # still asks for it
    assert main(["run", "--resume", str(run_dir), "rounds=3", "log.trackers=[]"]) == 0
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["changes"]["log.trackers"] == {"old": ["wandb"], "new": []}


def _refused_before_the_folder(tiny_bert, tmp_path, capsys, *extra: str) -> str:
    """``declora run`` with ``extra``: exit 2 and no run folder; the one line it said."""
    from declora.cli import main

    run_dir = tmp_path / "runs" / "x"
    assert main(["run", *_tiny_run_args(tiny_bert, tmp_path, run_dir, "log.trackers=[wandb]", *extra)]) == 2
    assert not run_dir.exists()
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


def test_a_bad_wandb_mode_in_the_environment_is_refused_before_the_run_folder(
    tiny_bert, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    err = _refused_before_the_folder(tiny_bert, tmp_path, capsys)
    assert (
        "WANDB_MODE='bogus' (in the environment) is not allowed; choose one of ['offline', 'online', " in err
    )
    # wandb reads the variable even when the config names the mode
    err = _refused_before_the_folder(tiny_bert, tmp_path, capsys, "log.wandb_mode=offline")
    assert "WANDB_MODE='bogus'" in err


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """No W&B credentials anywhere wandb looks (its variables, ~/.netrc, its settings file), with its
    settings loaded afresh; nothing here contacts the network."""
    pytest.importorskip("wandb")
    from wandb.sdk import wandb_setup

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_wandb_online_without_credentials_is_refused_before_the_run_folder(
    tiny_bert, tmp_path, monkeypatch, capsys, no_wandb_credentials
):
    from wandb.sdk import wandb_setup

    home = no_wandb_credentials
    err = _refused_before_the_folder(tiny_bert, tmp_path, capsys, "log.wandb_mode=online")
    assert "log.wandb_mode=online needs W&B credentials for https://" in err and "WANDB_API_KEY" in err
    monkeypatch.setenv("WANDB_MODE", "online")
    assert "WANDB_MODE=online needs W&B credentials" in _refused_before_the_folder(
        tiny_bert, tmp_path, capsys
    )
    online = ["log.trackers=[wandb]", "log.wandb_mode=online"]
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # found as wandb finds it: the config is accepted
    load_config(None, online)
    monkeypatch.delenv("WANDB_API_KEY")
    host = urlparse(wandb_setup.singleton().settings.base_url).hostname
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {'0' * 40}\n")
    (home / ".netrc").chmod(0o600)
    load_config(None, online)


def test_an_mlflow_store_given_as_a_folder_path_is_that_folder(tmp_path, monkeypatch):
    """MLflow's docs show a local store as a path: absolute or relative (to the current folder), it is
    the file store there, as if written file:///..."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    monkeypatch.chdir(tmp_path)
    for given, store in (("store_rel", tmp_path / "store_rel"), (str(tmp_path / "abs"), tmp_path / "abs")):
        cfg = load_config(None, ["log.trackers=[mlflow]", f"log.mlflow_uri={given}"])
        board = Trackers(cfg, tmp_path / "runs" / given.replace("/", "_"))
        board(RECORDS[0])
        board.close()
        client = MlflowClient(tracking_uri=store.as_uri())
        runs = client.search_runs([client.get_experiment_by_name("declora").experiment_id])
        assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "train/train_loss")] == [0.75]


def test_an_mlflow_store_the_installed_mlflow_cannot_open_is_refused_before_the_run_folder(
    tiny_bert, tmp_path, capsys
):
    mlflow = pytest.importorskip("mlflow")
    if importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip(f"mlflow {mlflow.__version__} with SQLAlchemy opens sqlite: stores")
    uri = f"sqlite:///{tmp_path}/ml.db"
    err = _refused_before_the_folder(
        tiny_bert, tmp_path, capsys, "log.trackers=[mlflow]", f"log.mlflow_uri={uri}"
    )
    assert (
        f"log.mlflow_uri='{uri}': the installed MLflow has no store for its scheme; use a folder path " in err
    )
    assert "(a database such as sqlite: needs pip install mlflow)" in err


@pytest.mark.parametrize(
    ("project", "why"),
    [
        ("team/proj", r"cannot contain \['/'\] \(the entity goes in WANDB_ENTITY"),
        ("p" * 129, "has 129 characters, more than 128"),
    ],
)
def test_a_project_name_wandb_refuses_is_refused_before_the_run_folder(
    tiny_bert, tmp_path, capsys, project, why
):
    pytest.importorskip("wandb")
    err = _refused_before_the_folder(
        tiny_bert, tmp_path, capsys, "log.wandb_mode=offline", f"log.project={project}"
    )
    assert re.search(rf"log.project='{project}': a W&B project name {why}", err), err


def test_the_wandb_tracker_leaves_the_callers_own_wandb_run_open(tmp_path, monkeypatch):
    """A sweep script's own W&B run stays usable: wandb.init's default would have finished it."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mine = wandb.init(
        project="my-sweep", mode="offline", dir=str(tmp_path), settings=wandb.Settings(console="off")
    )
    try:
        _log(tmp_path, "wandb")
        assert not mine._is_finished
        mine.log({"outer": 1.0}, step=1)  # raises on a finished run
    finally:
        mine.finish()


def test_an_mlflow_server_that_does_not_answer_is_refused_before_the_run_folder(tiny_bert, tmp_path, capsys):
    """Else MLflow retries its first request for minutes before the run fails."""
    import socket

    pytest.importorskip("mlflow")
    with socket.socket() as s:  # a port nothing listens on once this is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    err = _refused_before_the_folder(
        tiny_bert, tmp_path, capsys, "log.trackers=[mlflow]", f"log.mlflow_uri={uri}"
    )
    assert f"log.mlflow_uri='{uri}': no MLflow tracking server answers there (" in err
    assert "Connection refused" in err


def test_any_http_answer_is_a_server_for_mlflow_to_talk_to(tmp_path):
    import functools
    import http.server
    import threading

    from declora.trackers import _server_problem

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # /health: 404, an answer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _server_problem(f"http://127.0.0.1:{server.server_address[1]}/") is None
        (tmp_path / "health").write_text("OK")  # what an MLflow server says
        assert _server_problem(f"http://127.0.0.1:{server.server_address[1]}") is None
    finally:
        server.shutdown()
        server.server_close()
