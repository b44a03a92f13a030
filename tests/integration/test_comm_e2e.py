"""Message codec end to end: Dec-LoRA on a ring, 8-bit quantized messages vs fp32, shipped MiniLM.

A BBC-news topic task (5 classes, majority share about 25%) that MiniLM learns to about 90% in three
rounds; review sentiment at this budget stays at the majority class, which would hide any effect.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from declora.assets import model_path
from declora.cli import main

pytestmark = pytest.mark.integration
SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
NODES, ROUNDS, RANK = 4, 3, 4
TASK = [
    f"nodes={NODES}",
    f"rounds={ROUNDS}",
    f"model.rank={RANK}",
    "topology.graph=ring",
    "algorithm.name=dec_lora",
    "data.dataset=bbc_news",
    "data.train_limit=256",
    "data.test_limit=200",
    "model.max_length=32",
    "train.batch_size=8",
    "train.local_steps=5",
    "train.lr=0.01",
    f"eval.every={ROUNDS}",
    "eval.node_examples=50",
    "checkpoint_every=100",
    "export=none",
    "threads=1",
]


def _last_eval(run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "eval"][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    torch.set_num_threads(1)
    out = {}
    for name, codec in (("fp32", ["comm.codec=fp32"]), ("q8", ["comm.codec=quantize", "comm.bits=8"])):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        assert main(["run", str(SMOKE), *TASK, *codec, f"run_dir={run_dir}"]) == 0
        out[name] = _last_eval(run_dir)
    return out


def _adapted_shapes() -> list[tuple[int, ...]]:
    """One node's gossiped tensors for MiniLM: A (r, d), B (d, r) per query/value, head weight and bias."""
    cfg = json.loads((model_path("minilm") / "config.json").read_text())
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    return [(RANK, d), (d, RANK)] * (2 * layers) + [(5, d), (5,)]


def test_8bit_messages_train_as_well_as_fp32(runs):
    fp32, q8 = runs["fp32"], runs["q8"]
    assert fp32["acc_avg_factors"] > 0.6  # non-trivial: the majority class is about 25%
    assert abs(q8["acc_avg_factors"] - fp32["acc_avg_factors"]) <= 0.01
    assert abs(q8["acc_node_mean"] - fp32["acc_node_mean"]) <= 0.01
    # the 8-bit values, not only the 8-bit byte counts, went through: training moved a little
    assert q8["train_loss"] != fp32["train_loss"] and q8["consensus_BA"] != fp32["consensus_BA"]
    assert abs(q8["train_loss"] - fp32["train_loss"]) < 0.05 * fp32["train_loss"]


def test_8bit_bytes_are_the_codec_payload_on_every_ring_edge(runs):
    """fp32 costs 4 bytes per entry; 8 bits cost 1 byte per entry plus an fp32 (lo, scale) per block of
    comm.block_size = 256 entries of each tensor's flattened message: about a quarter of fp32."""
    shapes = _adapted_shapes()
    entries = sum(torch.Size(s).numel() for s in shapes)
    blocks = sum(math.ceil(torch.Size(s).numel() / 256) for s in shapes)
    edges = 2 * NODES * ROUNDS  # a ring: every node sends to both neighbours every round
    assert runs["fp32"]["bytes_total"] == edges * 4 * entries
    assert runs["q8"]["bytes_total"] == edges * (entries + 8 * blocks)
    ratio = runs["q8"]["bytes_total"] / runs["fp32"]["bytes_total"]
    assert 0.25 < ratio < 0.27
