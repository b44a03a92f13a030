"""Two torchrun ranks on CUDA (marker ``gpu``): NCCL with one GPU per rank when the machine has two, else
two gloo ranks sharing one GPU; either way the in-process simulator's numbers on the same GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import assert_same_metrics, launch, records, tiny_overrides
from safetensors.torch import load_file

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
    assert result.returncode == 0, result.digest
    for label in CASES:  # a GPU's peak memory is logged only by a run whose model lives on a GPU
        assert all("peak_gpu_mem_mb" in r for r in records(tmp_path / "dist" / label)), label
    for label in CASES:  # byte counts exactly; numbers within GPU rounding (see near_adapters)
        assert_same_metrics(tmp_path / "sim" / label, tmp_path / "dist" / label, atol=1e-3)
        near_adapters(tmp_path / "sim" / label, tmp_path / "dist" / label)


def near_adapters(simulated: Path, distributed: Path, rel: float = 1e-2) -> None:
    """Every exported adapter within ``rel`` in norm per tensor. Not elementwise: a rank's micro-batches
    hold other rows than the simulator's, cuBLAS may sum in another order for another batch size, and
    AdamW then moves an entry whose gradient is ~0 by +-lr either way."""
    for folder in sorted(p.name for p in (simulated / "adapters").iterdir()):
        a = load_file(str(simulated / "adapters" / folder / "adapter_model.safetensors"))
        b = load_file(str(distributed / "adapters" / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            diff, size = torch.linalg.norm((b[key] - a[key]).double()), torch.linalg.norm(a[key].double())
            assert diff <= rel * size + 1e-6, (folder, key, float(diff))
