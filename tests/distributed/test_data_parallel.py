"""``centralized`` over 2 processes (data parallel: a replica of the one node on each rank, a share of
every batch, gradients summed before clipping and the step) gives the one-process run's numbers: every
metric and the final adapter at atol 1e-6, with gradient clipping, LoRA dropout and example-level DP-SGD,
and a one-process checkpoint resumes over 2 processes to the uninterrupted run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import (
    assert_resumed,
    assert_same_adapters,
    assert_same_metrics,
    finished_lines,
    free_port,
    launch,
    records,
    tiny_overrides,
)
from safetensors.torch import load_file

from declora.config import ConfigError, DistConfig, load_config
from declora.dist import Distributed
from declora.engine import run
from declora.experiment import build_experiment

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("worker.py")
# batch 9: the ranks' shares differ in size (5 and 4 rows), so the weights must stay 1/9 of the batch
CASES = {
    "plain": [],
    "clipped": ["train.max_grad_norm=0.02"],
    "dropout": ["model.dropout=0.2"],  # each rank masks its share of the rows as one process would
    "logit_adjusted": ["train.logit_adjustment=1"],  # every replica shifts by the pooled label prior
    "dp_sgd": ["privacy.level=example", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"],
}


def overrides(model: Path, out: Path, label: str, *extra: str) -> list[str]:
    more = CASES.get(label, [])
    return tiny_overrides(model, out / label, "centralized", "train.batch_size=9", *more, *extra)


@pytest.fixture(scope="module")
def simulator(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("simulator")
    for label in CASES:
        run(build_experiment(load_config(None, overrides(tiny_bert, out, label))))
    return out


def test_two_replicas_give_the_one_process_numbers(simulator, tiny_bert, tmp_path):
    run(build_experiment(load_config(None, overrides(tiny_bert, tmp_path, "resumed", "rounds=2"))))
    written = finished_lines(tmp_path / "resumed")
    cases: dict = {label: overrides(tiny_bert, tmp_path, label) for label in CASES}
    cases["resumed"] = {"resume": str(tmp_path / "resumed"), "overrides": ["rounds=3"]}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = launch([str(WORKER), str(tmp_path / "cases.json")], 2)
    assert result.returncode == 0, result.digest
    for label in CASES:
        assert_same_metrics(simulator / label, tmp_path / label)
        assert_same_adapters(simulator / label, tmp_path / label)
    assert_resumed(tmp_path / "resumed", [2], written)
    changes = json.loads((tmp_path / "resumed" / "resumes.jsonl").read_text())["changes"]
    assert changes == {"rounds": {"old": 2, "new": 3}}
    assert_same_metrics(simulator / "plain", tmp_path / "resumed")  # one process, then two
    assert_same_adapters(simulator / "plain", tmp_path / "resumed")
    losses = {label: [r["train_loss"] for r in records(simulator / label)] for label in CASES}
    assert losses["clipped"] != losses["plain"]  # the clipping bites
    shards = sorted(p.name for p in (tmp_path / "plain" / "state").glob("round_000003.*"))
    assert shards == [f"round_000003.rank_{k}.{x}" for k in (0, 1) for x in ("json", "safetensors")]
    replicas = [
        load_file(str(tmp_path / "plain" / "state" / f"round_000003.rank_{k}.safetensors")) for k in (0, 1)
    ]
    assert replicas[0].keys() == replicas[1].keys()  # every replica took the same steps: bit-identical
    assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0])


def test_node_slices_do_not_apply_to_replicas(tiny_bert, tmp_path, monkeypatch):
    """torch.distributed with a single rank (in this process): the replicas' own check."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    for key, value in {**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    group = Distributed(DistConfig(timeout_s=30))
    try:
        given = overrides(tiny_bert, tmp_path, "plain", "dist.node_slices=[5]")
        with pytest.raises(ConfigError, match=r"dist.node_slices=\[5\] does not apply to .*single-node"):
            build_experiment(load_config(None, given), None, group)
    finally:
        group.close()
