"""declora driven from Python: an Experiment runs once, StopRun ends a run cleanly after a round, configs
built in Python are checked, default run folders never collide, and a resume checks its inputs as the
command line does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import metrics_records, write_tiny_data
from safetensors.torch import load_file

from declora.compare import Grid
from declora.config import ConfigError, load_config
from declora.engine import MEASURED, StopRun, run
from declora.experiment import build_experiment, default_run_dir
from declora.model import averaged_factors

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.jsonl", 40)


@pytest.fixture
def tiny(tiny_bert, data, restore_threads):
    return {
        "model.name": str(tiny_bert),
        "model.rank": 2,
        "model.max_length": 16,
        "nodes": 2,
        "rounds": 4,
        "data.dataset": str(data),
        "partition.min_size": 2,
        "train.batch_size": 4,
        "train.local_steps": 1,
        "eval.every": 1,
        "eval.node_examples": 4,
        "checkpoint_every": 3,
        "export": "consensus",
        "threads": 1,
    }


def _numbers(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in records]


def _folder_records(run_dir: Path) -> list[dict]:
    return _numbers([r for r in metrics_records(run_dir) if r["event"] in ("round", "eval")])


def test_stoprun_ends_after_its_round_with_checkpoint_adapters_and_report_then_resumes(tiny, tmp_path):
    whole = run(build_experiment(load_config(None, {**tiny, "run_dir": str(tmp_path / "whole")})))

    def stop_at_two(record: dict) -> None:
        if record["round"] == 2:
            raise StopRun

    cfg = load_config(None, {**tiny, "run_dir": str(tmp_path / "stopped")})
    exp = build_experiment(cfg)
    records = run(exp, on_round=stop_at_two)
    assert [r["round"] for r in records] == [1, 2]
    folder = tmp_path / "stopped"
    # round 2 is checkpointed although checkpoint_every is 3; the adapters and the report are written
    assert json.loads((folder / "state" / "latest.json").read_text())["round"] == 2
    assert (folder / "adapters" / "consensus" / "adapter_model.safetensors").is_file()
    assert (folder / "report.md").is_file()
    with pytest.raises(ConfigError, match="this Experiment has already run"):
        run(exp, resume=True)  # its state is the stopped run's: a resume needs a new one
    run(build_experiment(cfg), resume=True)
    assert _folder_records(folder) == _numbers(whole)


def test_an_experiment_runs_once(tiny, tmp_path):
    exp = build_experiment(load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / "a")}))
    run(exp)
    with pytest.raises(ConfigError, match=r"already run .* build a new one with build_experiment"):
        run(exp, overwrite=True)


def test_run_refuses_a_config_or_an_on_round_that_is_no_function_before_any_round(tiny, tmp_path):
    cfg = load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / "a")})
    with pytest.raises(
        TypeError, match=r"^run takes an Experiment, got Config; build one with build_experiment"
    ):
        run(cfg)
    with pytest.raises(TypeError, match=r"^on_round must be a function .* got 5$"):
        run(build_experiment(cfg), on_round=5)
    assert not (tmp_path / "a").exists()  # refused before the folder was made


def test_an_exception_in_on_round_closes_the_trackers(tiny, tmp_path, monkeypatch):
    from declora import engine

    closed = []

    class Recorded(engine.Trackers):
        def close(self) -> None:
            closed.append(True)
            super().close()

    monkeypatch.setattr(engine, "Trackers", Recorded)
    exp = build_experiment(load_config(None, {**tiny, "tensorboard": True, "run_dir": str(tmp_path / "tb")}))

    def fail(record: dict) -> None:
        raise RuntimeError("the user's callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        run(exp, on_round=fail)
    assert closed == [True]


def test_a_config_built_in_python_is_checked_before_any_work(tiny, tmp_path, monkeypatch):
    from declora import experiment

    cfg = load_config(None, {**tiny, "run_dir": str(tmp_path / "x")})
    loaded = []
    monkeypatch.setattr(experiment, "build_federation", lambda *a, **k: loaded.append(1))
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=-1.0))
    with pytest.raises(ConfigError, match="train.lr=-1.0"):
        build_experiment(bad)
    with pytest.raises(ConfigError, match="algorithm.name='nope' is not known"):
        build_experiment(dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, name="nope")))
    with pytest.raises(ConfigError, match="nodes: expected an integer"):
        build_experiment(dataclasses.replace(cfg, nodes=4.0))
    assert loaded == []
    assert hash(cfg) == hash(load_config(None, {**tiny, "run_dir": str(tmp_path / "x")}))  # a dict key


def test_overrides_may_be_a_mapping_of_python_values():
    cfg = load_config(
        None, {"train.lr": 3e-4, "train.max_grad_norm": None, "model.target_modules": ("query",)}
    )
    assert (cfg.train.lr, cfg.train.max_grad_norm, cfg.model.target_modules) == (3e-4, None, ("query",))
    assert load_config(None, {"model": {"rank": 4}}).model.alpha == load_config(None).model.alpha
    with pytest.raises(ConfigError, match="one string; give a list"):
        load_config(None, "nodes=4")


def test_overrides_take_numpy_scalars_and_paths_as_the_python_values_they_hold(tmp_path):
    """A sweep over np.arange seeds, or folders built with pathlib, needs no conversion by hand."""
    import numpy as np

    cfg = load_config(
        None,
        {
            "seed": np.int64(1),
            "model.dropout": np.float32(0.1),
            "run_dir": tmp_path / "run",
            "plugins": [],
            "model.target_modules": [np.str_("query")],
        },
    )
    assert load_config(None, {"model.target_modules": np.array(["query", "value"])}).model.target_modules == (
        "query",
        "value",
    )
    assert (cfg.seed, cfg.model.dropout, cfg.run_dir) == (1, 0.1, str(tmp_path / "run"))
    assert type(cfg.seed) is int and cfg.model.target_modules == ("query",)
    with pytest.raises(ConfigError, match="seed: expected an integer, got 1.5"):
        load_config(None, {"seed": np.float64(1.5)})  # still the key's type


def test_default_run_folders_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    first, second = default_run_dir(cfg), default_run_dir(cfg)  # one sweep, the same second
    assert first != second and second.name.startswith(first.name)
    taken = default_run_dir(cfg)
    taken.mkdir(parents=True)
    assert default_run_dir(cfg) not in (first, second, taken)


def test_a_resume_from_python_refuses_a_relative_input_that_names_another_file(tiny, tmp_path, monkeypatch):
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    for folder, rows in ((started, 40), (elsewhere, 24)):
        folder.mkdir()
        write_tiny_data(folder / "data.jsonl", rows)
    monkeypatch.chdir(started)
    cfg = load_config(None, {**tiny, "data.dataset": "data.jsonl", "run_dir": str(tmp_path / "run")})

    def stop(record: dict) -> None:
        raise StopRun

    run(build_experiment(cfg), on_round=stop)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match=r"data.dataset='data.jsonl' is relative.*Resume from"):
        run(build_experiment(load_config(tmp_path / "run" / "config.yaml")), resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_export_peft_folds_fed_sb_middle_factor(tiny, tmp_path):
    from declora.peft_io import export_peft

    exp = build_experiment(load_config(None, {**tiny, "algorithm.name": "fed_sb", "run_dir": str(tmp_path)}))
    with torch.no_grad():
        for name, t in exp.fed.tensors().items():
            if name.endswith(".lora_R"):
                t.copy_(torch.randn_like(t))
    single = averaged_factors(exp.fed.tensors())
    written = load_file(export_peft(exp.fed, single, tmp_path / "peft") / "adapter_model.safetensors")
    assert not any("lora_R" in k for k in written)
    modules = [name.removesuffix(".lora_R") for name in single if name.endswith(".lora_R")]
    assert modules
    for module in modules:  # PEFT's B is Fed-SB's B R (by hand here), its A is A itself
        B, R, A = (single[f"{module}.lora_{part}"][0] for part in "BRA")
        torch.testing.assert_close(written[f"base_model.model.{module}.lora_B.weight"], B @ R)
        torch.testing.assert_close(written[f"base_model.model.{module}.lora_A.weight"], A)


def test_a_grid_built_in_python_is_checked():
    assert Grid(base=None, out="runs/x", seeds=[0, 1]).out == Path("runs/x")
    with pytest.raises(ConfigError, match="axis 'seed' needs a non-empty list"):
        Grid(base=None, out=Path("runs/x"), axes={"seed": 3})


def test_a_notebook_cell_that_registers_again_replaces_its_algorithm(monkeypatch):
    from declora import algorithms
    from declora.algorithms import register
    from declora.algorithms.local import LocalOnly

    monkeypatch.setattr(algorithms, "ALGORITHMS", dict(algorithms.ALGORITHMS))

    def define() -> type:
        class Mine(LocalOnly):  # the same module and qualified name each time, as a cell run twice
            pass

        return Mine

    first, again = define(), define()
    register("mine", first)
    register("mine", again)
    assert algorithms.ALGORITHMS["mine"] is again


def test_the_python_api_example_runs_and_stops_early(tiny, tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "python_api.py"
    spec = importlib.util.spec_from_file_location("python_api_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    finals = example.sweep(out=str(tmp_path), stop_at=0.0, **{**tiny, "rounds": 3})  # stops at round 1
    assert set(finals) == {(a, s) for a in ("dec_lora", "fedavg") for s in (0, 1)}
    for result in finals.values():
        assert result["rounds"] == 1 and result["stopped_early"] == (1, 3)
        assert 0 <= result["acc_avg_factors"] <= 1 and result["adapter_tensors"] > 0


def test_a_stop_at_a_round_that_is_not_evaluated_is_warned_about(tiny, tmp_path, caplog):
    def stop_at_two(record: dict) -> None:
        if record["round"] == 2:
            raise StopRun

    cfg = load_config(None, {**tiny, "eval.every": 3, "run_dir": str(tmp_path / "run")})
    records = run(build_experiment(cfg), on_round=stop_at_two)
    assert [r["event"] for r in records] == ["round", "round"]
    assert "StopRun after round 2, which eval.every=3 does not evaluate" in caplog.text
    caplog.clear()
    cfg = load_config(None, {**tiny, "eval.every": 2, "run_dir": str(tmp_path / "evaluated")})
    run(build_experiment(cfg), on_round=stop_at_two)
    assert "StopRun after" not in caplog.text


def test_a_dropped_experiment_is_freed_at_once_after_its_report_is_drawn(tiny, tmp_path):
    """The run's plot leaves a garbage cycle holding the run's frames (and so the Experiment): without
    a collection there, a sweep kept every earlier base model alive until Python's next full GC."""
    import gc
    import weakref

    gc.disable()  # only reference counting frees it, as between two cells of a sweep
    try:
        for cell in range(3):
            exp = build_experiment(
                load_config(
                    None,
                    {
                        **tiny,
                        "nodes": 4,
                        "rounds": 2,
                        "checkpoint_every": 1,
                        "run_dir": str(tmp_path / f"{cell}"),
                    },
                )
            )
            base = weakref.ref(exp.fed.model)
            run(exp)
            del exp
            assert base() is None, cell
    finally:
        gc.enable()


def test_the_callback_gets_a_copy_of_the_record(tiny, tmp_path):
    def percent(record):  # a display edit must not reach the adapter card or the returned records
        record["acc_avg_factors"] = 100 * record["acc_avg_factors"]

    records = run(
        build_experiment(load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / "r")})),
        on_round=percent,
    )
    logged = metrics_records(tmp_path / "r")[-1]["acc_avg_factors"]
    card = json.loads((tmp_path / "r" / "adapters" / "consensus" / "declora_adapter.json").read_text())
    assert records[-1]["acc_avg_factors"] == logged == card["metrics"]["acc_avg_factors"] <= 1


def test_a_run_trains_inside_the_callers_no_grad_or_float64_default_and_restores_them(tiny, tmp_path):
    reference = run(
        build_experiment(load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / "ref")}))
    )
    before = torch.get_default_dtype()
    for name, mode in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        with mode():
            got = run(
                build_experiment(load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / name)}))
            )
            assert not torch.is_grad_enabled()
        assert _numbers(got) == _numbers(reference), name
    torch.set_default_dtype(torch.float64)
    try:
        got = run(
            build_experiment(load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / "f64")}))
        )
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(before)
    assert _numbers(got) == _numbers(reference)


def test_resume_with_overwrite_is_refused_as_on_the_command_line(tiny, tmp_path):
    exp = build_experiment(load_config(None, {**tiny, "rounds": 1, "run_dir": str(tmp_path / "r")}))
    with pytest.raises(ConfigError, match="resume=True and overwrite=True contradict each other"):
        run(exp, resume=True, overwrite=True)
    assert not (tmp_path / "r").exists()
