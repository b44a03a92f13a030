"""Config loading: overrides, validation errors that name the bad value and the allowed ones."""

from __future__ import annotations

import re

import pytest

from declora.config import ConfigError, load_config, save_config

pytestmark = pytest.mark.unit


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "nodes=16",
            "topology.graph=complete",
            "model.target_modules=[query]",
            "train.lr=2e-4",
            "model.rslora=true",
        ],
    )
    assert cfg.nodes == 16 and cfg.topology.graph == "complete"
    assert cfg.model.target_modules == ("query",) and cfg.train.lr == 2e-4 and cfg.model.rslora is True


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("nodez=3", ["nodez", "nodes"]),
        ("train.lrr=1", ["train.lrr", "lr"]),
        ("nodes=0", ["nodes=0", "positive"]),
        ("nodes=three", ["nodes", "integer", "three"]),
        ("algorithm.name=dec-lora", ["dec-lora", "dec_lora", "fedavg"]),
        ("partition.kind=zipf", ["zipf", "dirichlet"]),
        ("model.dropout=1.5", ["model.dropout", "1.5"]),
        ("rounds", ["key=value"]),
    ],
)
def test_bad_values_name_the_value_and_the_allowed_ones(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_file_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config(None, ["nodes=5", "partition.proportions=[[0.5, 0.5], [0.1, 0.9]]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("nodse=3", "(did you mean nodes?)"),
        ("model.rnak=4", "(did you mean model.rank?)"),
        ("lr=0.1", "(did you mean train.lr or server.lr?)"),  # a key of another section
    ],
)
def test_an_unknown_key_suggests_the_closest_one(override, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        load_config(None, [override])


def test_an_unknown_key_with_nothing_close_suggests_nothing():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zzz=1"])
    assert "did you mean" not in str(err.value)


def test_a_section_given_as_a_mapping_sets_only_its_keys(tmp_path):
    # model={rank: 8} means model.rank=8: the file's other model keys stay (it silently reset them).
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  alpha: 8\n  max_length: 48\n")
    cfg = load_config(path, ["model={rank: 4, dropout: 0.1}"])
    assert (cfg.model.rank, cfg.model.dropout, cfg.model.alpha, cfg.model.max_length) == (4, 0.1, 8.0, 48)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "run_dir=x", "configs/smoke.yaml"], "a config file goes first"),
        (["run", ".nodes=4"], "the key '.nodes' has an empty part"),
    ],
)
def test_command_line_override_mistakes_are_one_line(argv, message, capsys):
    from declora.cli import main

    with pytest.raises(SystemExit) as stop:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and message in err, err


def test_version_and_a_run_folder_config_the_version_does_not_know(tmp_path, capsys):
    from declora import __version__
    from declora.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"declora {__version__}"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("nodes: 4\nfuture_key: 3\n")
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"declora: error: {run / 'config.yaml'}: unknown config key future_key"), err


def test_a_key_given_twice_on_the_command_line_is_pointed_out(tmp_path, caplog):
    from declora.cli import main

    with caplog.at_level("WARNING"):
        main(["topology", "nodes=5", "nodes=6", "--out", str(tmp_path / "t.png")])
    assert "nodes is given more than once (nodes=5, then nodes=6): the last one counts" in caplog.text


def test_a_grid_given_to_run_says_to_compare_it():
    with pytest.raises(
        ConfigError, match=r"smoke.yaml is a grid, not a run config: run it with declora compare"
    ):
        load_config("configs/grids/smoke.yaml")


@pytest.mark.parametrize(
    ("overrides", "headline"),
    [
        ([], "acc_avg_factors"),
        (["algorithm.name=fedavg"], "acc_avg_factors"),
        (["algorithm.name=local"], "acc_node_mean"),  # the nodes share no model
        (["algorithm.name=fedsa_lora"], "acc_node_mean"),  # each node keeps its own B
        (["task.kind=causal_lm", "model.head=none"], "ppl_avg_factors"),
        (["task.kind=instruction", "model.head=none", "algorithm.name=fedsa_lora"], "ppl_node_mean"),
        (["algorithm.name=local", "eval.headline=acc_avg_product"], "acc_avg_product"),  # as asked
    ],
)
def test_the_automatic_headline_is_a_model_the_run_has_in_its_tasks_measure(overrides, headline):
    assert load_config(None, overrides).eval.headline == headline


def test_a_server_headline_without_a_server_names_the_metric_the_algorithm_has():
    with pytest.raises(ConfigError, match=r"fedsa_lora has no server model; use acc_node_mean or"):
        load_config(None, ["algorithm.name=fedsa_lora", "eval.headline=acc_server"])
    with pytest.raises(ConfigError, match=r"dec_lora has no server model; use acc_avg_factors or"):
        load_config(None, ["eval.headline=acc_server"])


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        ("configs/smoke.yaml", {None: 1}, "override None is not a string"),
        ("configs/smoke.yaml", {1: 1}, "override 1 is not a string"),
        ("configs/smoke.yaml", [("rounds", 2)], "override ('rounds', 2) is not a string"),
        ("configs/smoke.yaml", {"rounds=2"}, "overrides is a set"),  # a later key wins: order matters
        (5, (), "config path 5 is not a path"),
        ("configs", (), "'configs' is a folder"),
    ],
)
def test_load_config_refuses_what_is_not_a_path_or_an_override(path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("section", [{"lr": 0.1}, None, "model"])
def test_a_section_replaced_by_another_kind_of_value_is_refused(section):
    import dataclasses

    from declora.config import check_sections

    cfg = load_config("configs/smoke.yaml")
    value = cfg.model if section == "model" else section
    with pytest.raises(ConfigError) as err:  # a dict would have reset batch_size and local_steps silently
        check_sections(dataclasses.replace(cfg, train=value))
    assert str(err.value).startswith("train: expected a TrainConfig, got ")
    check_sections(cfg)
