"""benchmarks/gpu.py in its CPU quick mode: the harness the GPU check runs, on tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_mode_measures_both_methods_and_writes_json_and_markdown(tmp_path, one_thread):
    bench = _bench()
    args = [
        "--device",
        "cpu",
        "--quick",
        "--nodes",
        "1,3",
        "--steps",
        "1",
        "--products-at",
        "3",
        "--peft-nodes",
        "1",
    ]
    doc = bench.main([*args, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_quick.json").read_text())["rows"] == doc["rows"]
    rows = {(r["model"], r["method"], r["n"]): r for r in doc["rows"]}
    methods = {1: ("declora", "sequential_peft"), 3: tuple(bench.SETUPS)}  # + per_row and grouped at N = 3
    assert set(rows) == {(m, k, n) for m in ("minilm", "smollm2") for n in (1, 3) for k in methods[n]}
    assert len(bench.SETUPS) == 4
    for r in rows.values():
        assert r["status"] == "ok" and r["examples_per_s"] > 0 and 0 < r["mfu"] < 1, r
        assert r["tokens_per_s"] > r["examples_per_s"]  # rows of several tokens
    declora = rows[("minilm", "declora", 3)]
    peft = rows[("minilm", "sequential_peft", 3)]
    assert declora["speedup_vs_sequential_peft"] == pytest.approx(
        declora["examples_per_s"] / peft["examples_per_s"]
    )
    assert peft["reused_from_n"] == 1 and peft["nodes_timed"] == 1  # the swap's rate does not depend on N
    assert doc["largest_n_that_fits"] == {"minilm": 3, "smollm2": 3}
    table = (tmp_path / "gpu_quick.md").read_text()
    assert "| smollm2 | declora | 3 | ok |" in table and "Largest N measured that fits" in table


def test_a_failed_measurement_is_recorded_and_the_rows_are_written_as_they_come(
    tmp_path, one_thread, monkeypatch
):
    """One failing product (a kernel never run on that GPU) keeps the other rows; a run stopped at its
    time limit keeps the JSON and table of what it had measured."""
    bench = _bench()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available\nmore lines")

    interrupted = {"after": 3}

    def stop_after(rows):
        if len(rows) == interrupted["after"]:
            raise KeyboardInterrupt  # as timeout's signal would, between two measurements

    monkeypatch.setitem(bench.SETUPS, "declora_grouped", broken)
    args = [
        "--device",
        "cpu",
        "--quick",
        "--nodes",
        "2",
        "--steps",
        "1",
        "--products-at",
        "2",
        "--models",
        "minilm",
    ]
    doc = bench.main([*args, "--peft-nodes", "1", "--out", str(tmp_path / "whole")])
    statuses = {r["method"]: r["status"] for r in doc["rows"]}
    assert statuses == {
        "declora": "ok",
        "sequential_peft": "ok",
        "declora_per_row": "ok",
        "declora_grouped": "error",
    }
    failed = next(r for r in doc["rows"] if r["status"] == "error")
    assert failed["error"] == "RuntimeError: CUDA error: no kernel image is available"
    assert "| minilm | declora_grouped | 2 | error |" in (tmp_path / "whole" / "gpu_quick.md").read_text()
    assert doc["grouped_mm"]["available"] == hasattr(torch.nn.functional, "grouped_mm")

    real_run_all = bench.run_all
    monkeypatch.setattr(
        bench, "run_all", lambda *a: real_run_all(*a[:4], lambda rows: (a[4](rows), stop_after(rows)))
    )
    with pytest.raises(KeyboardInterrupt):
        bench.main([*args, "--peft-nodes", "1", "--out", str(tmp_path / "cut")])
    kept = json.loads((tmp_path / "cut" / "gpu_quick.json").read_text())["rows"]
    assert [r["method"] for r in kept] == ["declora", "sequential_peft", "declora_per_row"]


def test_useful_flops_of_the_smollm2_shapes():
    bench = _bench()
    shape = bench.SHAPES["smollm2"]
    # 30 layers x (2 x 576^2 + 2 x 576 x 192 + 3 x 1536 x 576) + the 49152 x 576 LM head = 134.5 M matmul
    # parameters; forward 2 x that + attention 4 x 30 x 128 x 576; training (frozen base) twice the forward.
    matmul = 30 * (2 * 576**2 + 2 * 576 * 192 + 3 * 1536 * 576) + 49152 * 576
    assert bench.flops_per_token(shape, 128) == 2 * (2 * matmul + 4 * 30 * 128 * 576)
    assert 134e6 < matmul < 135e6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_stops_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        _bench().main(["--device", "cuda", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


CHECK = SCRIPT.with_name("gpu_check.sh")


def test_gpu_check_script_parses_and_names_existing_tests():
    assert subprocess.run(["bash", "-n", str(CHECK)], check=False).returncode == 0
    text = CHECK.read_text()
    for path in ("tests/gpu", "tests/distributed/test_gpu_ranks.py", "benchmarks/gpu.py"):
        assert path in text and (SCRIPT.parents[1] / path).exists(), path


@pytest.mark.slow
def test_gpu_check_script_on_the_cpu(tmp_path):
    """The whole script on a CPU: the gpu tests skip, the benchmark runs its quick mode (about 50 s)."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "BENCH_ARGS": "--device cpu --quick --nodes 1,2 --steps 1 --models minilm",
    }
    done = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()
    rows = json.loads((tmp_path / "gpu_quick.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4
