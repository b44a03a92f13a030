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
