"""The device and precision keys: validation before any work, resolution, and the micro-batch default."""

from __future__ import annotations

import pytest
import torch

from declora.config import ConfigError, load_config
from declora.device import TOKENS_PER_CHUNK, autocast, default_tokens_per_chunk, resolve_device

pytestmark = pytest.mark.unit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_config_error_naming_the_key(device):
    with pytest.raises(ConfigError, match=rf"device='{device}' but this torch .* sees no CUDA GPU"):
        load_config(None, [f"device={device}"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("device=gpu", r"device='gpu' is not allowed; choose auto, cpu, cuda or cuda:K"),
        ("device=cuda:x", r"device='cuda:x' is not allowed"),
        ("precision=fp16", r"precision='fp16' is not allowed; choose one of \['fp32', 'bf16'\]"),
        ("train.tokens_per_chunk=0", r"train.tokens_per_chunk=0 is out of range; allowed: \[1, inf\)"),
    ],
)
def test_bad_device_precision_and_budget_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_defaults_cpu_fp32_and_the_cpu_budget():
    cfg = load_config(None, ["device=cpu"])
    assert (cfg.device, cfg.precision, cfg.train.tokens_per_chunk) == ("cpu", "fp32", None)
    assert resolve_device("cpu") == torch.device("cpu")
    assert default_tokens_per_chunk(torch.device("cpu")) == TOKENS_PER_CHUNK["cpu"] == 256
    assert default_tokens_per_chunk(torch.device("cuda", 0)) == TOKENS_PER_CHUNK["cuda"] == 32768
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_bf16_autocast_rounds_matmuls_on_the_cpu_and_fp32_does_not():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ w).dtype == torch.float32


def test_the_torchrun_backend_follows_the_run_device():
    # device=cpu keeps tensors on the CPU, which nccl cannot carry: gloo, whatever GPUs the machine has;
    # a fixed cuda:K for several ranks of one machine would put them all on one GPU.
    from declora.dist import pick_backend

    assert pick_backend("auto", 2, "cpu") == "gloo"
    with pytest.raises(ConfigError, match="dist.backend=nccl with device=cpu"):
        pick_backend("nccl", 2, "cpu")
    with pytest.raises(ConfigError, match=r"device=cuda:1 under torchrun with 4 ranks .* use device=cuda"):
        pick_backend("auto", 4, "cuda:1")
    assert pick_backend("gloo", 1, "cuda:0") == "gloo"  # one rank on this machine: its own choice
