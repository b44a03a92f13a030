"""Settings a run would ignore (declora.ignored): every key has a reader; the known cases are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from declora.config import (
    AttackConfig,
    CommConfig,
    Config,
    PartitionConfig,
    RobustConfig,
    TaskConfig,
    TopologyConfig,
    load_config,
)
from declora.ignored import (
    ALGORITHM,
    ATTACK,
    COMM,
    PARTITION,
    ROBUST,
    TASK,
    TOPOLOGY,
    ignored_settings,
    without_unread_defaults,
)

pytestmark = pytest.mark.unit


def test_every_key_of_the_three_sections_has_a_reader_or_is_always_read():
    names = {f.name for f in dataclasses.fields(Config().algorithm)}
    assert names == set(ALGORITHM) | {"name"}
    assert {f.name for f in dataclasses.fields(CommConfig)} == set(COMM)
    assert {f.name for f in dataclasses.fields(TopologyConfig)} == set(TOPOLOGY) | {"node_dropout"}
    assert {f.name for f in dataclasses.fields(TaskConfig)} == set(TASK) | {"kind"}
    assert {f.name for f in dataclasses.fields(PartitionConfig)} == set(PARTITION) | {"kind"}
    assert {f.name for f in dataclasses.fields(RobustConfig)} == set(ROBUST) | {"aggregator"}
    assert {f.name for f in dataclasses.fields(AttackConfig)} == set(ATTACK) | {"kind"}


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["algorithm.name=fedavg", "algorithm.mu=0.5"],
            "algorithm.mu=0.5 has no effect in this run; it applies to fedprox",
        ),
        (
            ["algorithm.name=fslora", "algorithm.ranks=[1,2,3,4]"],
            "algorithm.ranks=[1, 2, 3, 4] has no effect",
        ),
        (
            ["algorithm.name=hetlora", "algorithm.sketch_ratios=[.5,.5,.5,.5]"],
            "algorithm.sketch_ratios=[0.5, 0.5, 0.5, 0.5]",
        ),
        (["algorithm.switch_interval=3"], "algorithm.switch_interval=3 has no effect"),  # dec_lora
        (["algorithm.name=fedavg", "algorithm.server_lr=0.5"], "algorithm.server_lr=0.5 has no effect"),
        (["algorithm.clients_per_round=1"], "algorithm.clients_per_round=1 has no effect"),
        (
            ["comm.codec=fp16", "comm.bits=2"],
            "comm.bits=2 has no effect in this run; it applies to comm.codec=quantize",
        ),
        (["comm.codec=quantize", "comm.fraction=0.2"], "comm.fraction=0.2 has no effect"),
        (["topology.schedule=dynamic_er", "topology.graph=star"], "topology.graph='star' has no effect"),
        (["topology.schedule=pairwise", "topology.p=0.9"], "topology.p=0.9 has no effect"),
        (["topology.weight_file=w.txt"], "topology.weight_file='w.txt' has no effect"),
        (["topology.graph=ring", "topology.degree=6"], "topology.degree=6 has no effect"),
        (["task.template='Q: {text} A:'"], "task.template='Q: {text} A:' has no effect"),  # a head classifies
        (["partition.min_size=32"], "partition.min_size=32 has no effect"),  # iid
        (
            ["robust.trim=0.1"],
            "robust.trim=0.1 has no effect in this run; it applies to robust.aggregator=trimmed",
        ),
        (["attack.kind=sign_flip", "attack.nodes=[0]", "attack.scale=3"], "attack.scale=3.0 has no effect"),
        (  # a server method gossips on no graph
            ["algorithm.name=fedavg", "topology.graph=star"],
            "topology.graph='star' has no effect in this run; it applies to gossip algorithms",
        ),
        (["algorithm.name=hetlora", "topology.lazy=true"], "topology.lazy=True has no effect"),
        (["algorithm.name=local", "comm.codec=fp16"], "comm.codec='fp16' has no effect in this run"),
        (["model.head=frozen", "train.head_lr=0.5"], "train.head_lr=0.5 has no effect in this run"),
        (
            ["task.kind=causal_lm", "model.head=none", "model.pooling=cls"],
            "model.pooling='cls' has no effect",
        ),
        (
            ["export=none", "export_round=best"],
            "export_round='best' has no effect in this run; it applies to runs",
        ),
        (
            ["log.project=mine"],
            "log.project='mine' has no effect in this run; it applies to log.trackers wandb",
        ),
        (["log.trackers=[tensorboard]", "log.mlflow_uri=x"], "log.mlflow_uri='x' has no effect"),
        (
            ["model.base_quantization=int8", "model.quant_backend=declora"],
            "model.quant_backend='declora' has no effect in this run; it applies to model.base_quant",
        ),
        (  # DP-SGD multiplies per row and clips each example at privacy.clip
            ["privacy.level=example", "privacy.noise_multiplier=1", "train.lora_product=grouped"],
            "train.lora_product='grouped' has no effect in this run; it applies to runs without privacy",
        ),
        (
            ["privacy.level=example", "privacy.noise_multiplier=1", "train.max_grad_norm=0.5"],
            "train.max_grad_norm=0.5 has no effect in this run; it applies to runs without privacy.level=ex",
        ),
    ],
)
def test_a_setting_the_run_never_reads_is_named(overrides, line):
    lines = ignored_settings(load_config(None, ["nodes=4", *overrides]))
    assert any(x.startswith(line) for x in lines), lines
    assert len(lines) == 1, lines


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["algorithm.name=fedprox", "algorithm.mu=0.5"],
        ["algorithm.name=tad_lora", "algorithm.switch_interval=auto", "algorithm.auto_c=2"],
        ["algorithm.name=hetlora", "algorithm.ranks=[1,2,3,4]", "algorithm.server_lr=0.01"],
        ["algorithm.name=fedavg", "server.optimizer=adamw", "algorithm.server_lr=0.01"],
        ["comm.codec=topk", "comm.fraction=0.2", "comm.consensus_step=0.5"],
        ["topology.graph=erdos_renyi", "topology.p=0.5"],
        ["topology.schedule=dynamic_er", "topology.p=0.5"],
        ["topology.schedule=periodic_full", "topology.period=3", "topology.graph=complete"],
        ["partition.kind=dirichlet", "partition.alpha=0.1", "partition.min_size=4"],
        ["robust.aggregator=trimmed_mean", "robust.trim=0.4"],
        ["attack.kind=scaled", "attack.nodes=[0]", "attack.scale=3"],
        ["model.base_quantization=nf4", "model.quant_backend=declora"],
        ["algorithm.name=fedavg", "topology.node_dropout=0.2"],  # offline nodes miss the server's round
        ["algorithm.name=fedavg", "comm.codec=fp16"],
        ["train.head_lr=0.01"],  # the head trains by default
        ["export_round=best"],
        ["log.trackers=[mlflow]", "log.project=mine", "log.mlflow_uri=x"],
    ],
)
def test_settings_the_run_reads_are_not_named(overrides):
    assert ignored_settings(load_config(None, ["nodes=4", *overrides])) == []


def test_the_shipped_configs_set_nothing_they_ignore():
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("**/*.yaml")):
        if path.parent.name in ("grids", "fidelity", "fidelity_gpu"):  # grid files, not run configs
            continue
        assert ignored_settings(load_config(str(path))) == [], path.name


def test_building_a_run_warns_of_each_ignored_setting(tiny_bert, tiny_data, tmp_path, caplog):
    from unit_helpers import tiny_experiment

    with caplog.at_level("WARNING", logger="declora.experiment"):
        tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=fedavg", "algorithm.mu=0.5")
    assert "algorithm.mu=0.5 has no effect in this run; it applies to fedprox, dec_prox" in caplog.text


ROOT_DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def test_a_server_method_is_not_refused_over_a_graph_it_never_gossips_on(tiny_bert, tiny_data, tmp_path):
    from unit_helpers import tiny_experiment

    disconnected = ("topology.graph=erdos_renyi", "topology.p=0.01", "nodes=6")
    with pytest.raises(ValueError, match="is disconnected"):  # gossip would never reach consensus
        tiny_experiment(tiny_bert, tiny_data, tmp_path / "gossip", *disconnected)
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path / "server", "algorithm.name=fedavg", *disconnected)
    assert exp.cfg.topology.allow_disconnected is False  # the run's config says what the user set


def test_keys_of_the_fallback_config_that_a_run_ignores_fall_back_to_their_defaults():
    cfg = load_config(ROOT_DEFAULT, ["partition.kind=iid"])  # the default config sets min_size: 32
    assert ignored_settings(cfg) == [
        "partition.min_size=32 has no effect in this run; "
        "it applies to partition.kind dirichlet or quantity_skew"
    ]
    cleaned = without_unread_defaults(cfg, ["partition.kind"])
    assert ignored_settings(cleaned) == []
    assert cleaned.partition.min_size == PartitionConfig().min_size
    assert dataclasses.replace(cleaned, partition=cfg.partition) == cfg  # nothing else touched
    # a key the user chose stays, and is warned about
    for chosen in (["partition.kind", "partition.min_size"], ["partition"]):
        assert without_unread_defaults(cfg, chosen) == cfg


def test_a_file_per_node_leaves_the_fallback_partition_unread_and_set_back_whole():
    """The default config's Dirichlet partition (kind, then the min_size only it reads) means nothing
    once data.node_files gives each node its file: both go back to their defaults, in one call."""
    given = ["data.node_files=[a.csv,b.csv]", "data.test_file=t.csv", "nodes=2"]
    cfg = load_config(ROOT_DEFAULT, given)
    assert "partition.kind='dirichlet' has no effect in this run" in " ".join(ignored_settings(cfg))
    keys = ["data.node_files", "data.test_file", "nodes"]
    cleaned = without_unread_defaults(cfg, keys)
    assert cleaned.partition == PartitionConfig() and ignored_settings(cleaned) == []
    chosen = without_unread_defaults(cfg, [*keys, "partition.kind"])
    assert ignored_settings(chosen) == [
        "partition.kind='dirichlet' has no effect in this run; it applies to data split from one source "
        "(not data.node_files)"
    ]


def test_declora_run_without_a_config_does_not_warn_of_keys_the_user_never_set(tmp_path, monkeypatch):
    import argparse
    import shutil

    from declora import run_setup

    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT_DEFAULT, tmp_path / "configs" / "default.yaml")
    monkeypatch.chdir(tmp_path)

    def run_config(config, *overrides):
        args = argparse.Namespace(config=config, overrides=list(overrides), resume=None, overwrite=False)
        return run_setup.run_config(args)[0]

    assert run_config(None, "partition.kind=iid").partition.min_size == PartitionConfig().min_size
    assert run_config(None, "partition.kind=iid", "partition.min_size=32").partition.min_size == 32
    assert run_config("configs/default.yaml", "partition.kind=iid").partition.min_size == 32  # named: kept
    assert run_config(None).partition.min_size == 32  # read by the default's Dirichlet partition


def test_a_batch_larger_than_a_nodes_rows_is_warned_about(tiny_bert, tiny_data, tmp_path, caplog):
    from unit_helpers import tiny_experiment

    with caplog.at_level("WARNING", logger="declora.experiment"):
        tiny_experiment(tiny_bert, tiny_data, tmp_path, "partition.kind=iid", "train.batch_size=50")
    assert "train.batch_size=50 is more than the training rows of node(s) [0, 1, 2, 3]" in caplog.text
