"""precision=bf16 on the CPU (autocast bf16): fp32 masters over a bf16 base, close to fp32, and every
tensor on the configured device; checkpoints are written from the CPU and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_tensors, crash_after_round
from safetensors.torch import load_file

from declora.config import load_config
from declora.engine import MEASURED, run
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration


def tiny(tiny_bert, tmp_path, *extra):
    return load_config(None, [*_overrides(tiny_bert, tmp_path), *extra])


def _overrides(tiny_bert, tmp_path):
    return [
        f"model.name={tiny_bert}",
        "model.rank=4",
        "model.max_length=32",
        "nodes=4",
        "rounds=2",
        "data.train_limit=64",
        "data.test_limit=16",
        "train.batch_size=4",
        "train.local_steps=2",
        "eval.every=1",
        "eval.node_examples=8",
        "checkpoint_every=1",
        "export=none",
        "device=cpu",
        "threads=1",
        f"run_dir={tmp_path}",
    ]


def test_bf16_keeps_fp32_masters_over_a_bf16_base_all_on_the_device(tiny_bert, tmp_path, restore_threads):
    exp = build_experiment(tiny(tiny_bert, tmp_path, "precision=bf16"))
    run(exp)
    fed, device = exp.fed, torch.device("cpu")
    assert fed.device == device
    layer = next(iter(fed.lora.values()))
    assert layer.base.weight.dtype == torch.bfloat16
    assert fed.model.get_input_embeddings().weight.dtype == torch.bfloat16
    moments = [t for buffer in exp.optimizer.state.values() for t in buffer.values()]
    masters = [*fed.tensors().values(), *moments]
    assert moments and all(t.dtype == torch.float32 for t in masters)
    everything = [*fed.parameters(), *fed.buffers(), *masters, *exp.optimizer.steps.values()]
    assert all(t.device == device for t in everything)
    saved = load_file(str(sorted((tmp_path / "state").glob("*.safetensors"))[-1]))  # round 2
    assert all(t.device.type == "cpu" for t in saved.values())
    assert saved["optim/steps/" + next(iter(fed.tensors()))].tolist() == [4, 4, 4, 4]  # 2 rounds x 2 steps


def test_bf16_training_stays_close_to_fp32(tiny_bert, tmp_path, restore_threads):
    fp32 = run(build_experiment(tiny(tiny_bert, tmp_path / "fp32")))
    bf16 = run(build_experiment(tiny(tiny_bert, tmp_path / "bf16", "precision=bf16")))
    for a, b in zip(fp32, bf16, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=2e-2)
        assert b["acc_node_mean"] == pytest.approx(a["acc_node_mean"], abs=0.13)  # 8 examples: one flip
        assert b["train_tokens"] == a["train_tokens"] > 0 and b["tokens_per_s"] > 0


def test_bf16_resume_after_a_crash_equals_an_uninterrupted_run(tiny_bert, tmp_path, restore_threads):
    full = build_experiment(tiny(tiny_bert, tmp_path / "a", "precision=bf16", "rounds=3"))
    run(full)
    crashed = build_experiment(tiny(tiny_bert, tmp_path / "b", "precision=bf16", "rounds=3"))

    crash_after_round(crashed, 2)
    resumed = build_experiment(crashed.cfg, crashed.run_dir)
    run(resumed, resume=True)

    def evals(exp):
        lines = [json.loads(x) for x in (exp.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in MEASURED} for r in lines if r["event"] == "eval"]

    assert evals(resumed) == evals(full)
    assert_same_tensors(full, resumed)


def test_cli_names_the_device_and_precision_and_logs_tokens_per_second(
    tiny_bert, tmp_path, capsys, restore_threads
):
    from declora.cli import main

    # the CLI starts from configs/default.yaml (dirichlet partition): iid suits 64 examples
    assert (
        main(["run", *_overrides(tiny_bert, tmp_path), "partition.kind=iid", "rounds=1", "precision=bf16"])
        == 0
    )
    assert "(4 nodes, dec_lora, ring, cpu bf16)" in capsys.readouterr().out
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_per_s"] > 0 and "peak_gpu_mem_mb" not in record  # no GPU memory on the CPU
