"""Two torchrun ranks on CUDA (marker ``gpu``): NCCL with one GPU per rank when the machine has two, else
two gloo ranks sharing one GPU; either way the in-process simulator's numbers on the same GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import assert_same_adapters, assert_same_metrics, launch, records, tiny_overrides

from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
WORKER = Path(__file__).with_name("worker.py")
CASES = {  # the gossip path (neighbour send/receive), DeCAF's shared factors, and the server's all_reduce
    "dec_lora": ("dec_lora", "dist.node_slices=[3,2]"),
    "decaf": ("decaf", "dist.node_slices=[1,4]"),
    "fedavg": ("fedavg", "dist.node_slices=[2,3]"),
}


def test_two_ranks_on_cuda_give_the_simulators_numbers(tiny_bert, tmp_path):
    cases = {}
    for label, (algorithm, slices) in CASES.items():
        sim = tiny_overrides(tiny_bert, tmp_path / "sim" / label, algorithm, "device=cuda")
        run(build_experiment(load_config(None, sim)))
        cases[label] = tiny_overrides(tiny_bert, tmp_path / "dist" / label, algorithm, "device=cuda", slices)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = launch([str(WORKER), str(tmp_path / "cases.json")], 2)
    assert result.returncode == 0, result.output[-4000:]
    for label in CASES:  # a GPU's peak memory is logged only by a run whose model lives on a GPU
        assert all("peak_gpu_mem_mb" in r for r in records(tmp_path / "dist" / label)), label
    for label in CASES:
        assert_same_metrics(tmp_path / "sim" / label, tmp_path / "dist" / label, atol=1e-5)
        assert_same_adapters(tmp_path / "sim" / label, tmp_path / "dist" / label, atol=1e-5)
