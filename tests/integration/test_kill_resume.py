"""Kill a run at many points (inside checkpoint and metrics writes too), resume it, and compare bit for bit.

The crash points (``declora.runfolder.crash_point``, set by DECLORA_CRASH_AT=POINT:K) stop the run the
K-th time it reaches POINT, leaving every file as it is at that moment (a torn metrics line, a checkpoint
``.tmp`` not yet renamed, ...). In-process the stop is an exception nothing catches; two cases send a real
SIGKILL to a subprocess. ``declora run --resume`` must then finish with exactly the uninterrupted run's
metrics (times aside), adapters and final checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_data
from safetensors.torch import load_file

from declora.cli import main
from declora.engine import MEASURED
from declora.runfolder import CRASH_ENV, CrashPoint, read_resumes, reset_crash_counts

pytestmark = pytest.mark.integration
ROUNDS = 3
# (point, K): every round's steps and logs, each file of each checkpoint (written but not renamed, and
# committed but not pruned), torn metrics lines, the end (export, report), and the start.
KILLS = [
    *(("round.trained", k) for k in (1, 2)),  # trained and mixed, nothing logged
    *(("metrics.append", k) for k in (1, 3, 4, 5)),  # torn line: start record, rounds 1-3
    *(("round.logged", k) for k in (1, 2)),  # logged, not saved
    *(("ckpt.tensors", k) for k in (1, 2, 3)),  # tensors in .tmp, not renamed
    ("ckpt.counters", 3),
    *(("ckpt.latest", k) for k in (1, 2, 3)),  # every shard saved, latest.json not yet
    ("ckpt.committed", 2),  # latest.json written, older shards not pruned
    ("start.config", 1),
    ("export_swap", 1),  # the adapters folder set aside, the new one not yet in place
    ("exported", 1),
    ("report", 1),
    ("report.plot", 1),
]
# A second kill during the resume itself: while metrics.jsonl is rewritten, while the history is written.
DOUBLE = [("round.logged", 2, "metrics.rewrite"), ("ckpt.latest", 3, "resumes")]
REAL = [("ckpt.tensors", 2)]  # SIGKILL in a subprocess


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert, restore_threads):
    root = tmp_path_factory.mktemp("kill")
    data = write_tiny_data(root / "tiny.jsonl", 32)
    args = [
        f"model.name={tiny_bert}",
        *("model.rank=2", "model.max_length=16", "model.dropout=0.1", "nodes=2", f"rounds={ROUNDS}"),
        *(f"data.dataset={data}", "data.test_fraction=0.25", "partition.min_size=2", "train.batch_size=4"),
        *("train.local_steps=1", "eval.every=1", "eval.node_examples=4", "checkpoint_every=1"),
        *("export=consensus", "threads=1"),
    ]
    ref = root / "ref"
    assert main(["run", *args, f"run_dir={ref}"]) == 0
    return root, args, _outcome(ref)


def _outcome(run: Path) -> tuple:
    """What must match: metrics without times, the consensus adapter and the last checkpoint."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for key in MEASURED:  # times, rates and memory: measured, not computed
            r.pop(key, None)
        if r.get("event") == "start":
            r["config"].pop("run_dir")
    adapter = load_file(str(run / "adapters/consensus/adapter_model.safetensors"))
    state = load_file(str(run / f"state/round_{ROUNDS:06d}.rank_0.safetensors"))
    return records, adapter, state


def _same(a: tuple, b: tuple) -> bool:
    def equal(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    return a[0] == b[0] and equal(a[1], b[1]) and equal(a[2], b[2])


def _crash(args: list[str], spec: str, monkeypatch) -> None:
    reset_crash_counts()
    monkeypatch.setenv(CRASH_ENV, spec)
    with pytest.raises(CrashPoint):
        main(args)
    monkeypatch.delenv(CRASH_ENV)
    reset_crash_counts()


@pytest.mark.parametrize(("point", "k"), KILLS, ids=[f"{p}:{k}" for p, k in KILLS])
def test_killed_then_resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, point, k):
    _, args, reference = setup
    run = tmp_path / "run"
    _crash(["run", *args, f"run_dir={run}"], f"{point}:{k}", monkeypatch)
    assert main(["run", "--resume", str(run)]) == 0
    assert _same(_outcome(run), reference)
    assert len(read_resumes(run)) == 1


@pytest.mark.parametrize(("point", "k", "again"), DOUBLE, ids=[f"{p}:{k}+{a}" for p, k, a in DOUBLE])
def test_killed_twice_then_resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, point, k, again):
    _, args, reference = setup
    run = tmp_path / "run"
    _crash(["run", *args, f"run_dir={run}"], f"{point}:{k}", monkeypatch)
    _crash(["run", "--resume", str(run)], f"{again}:1", monkeypatch)
    assert main(["run", "--resume", str(run)]) == 0
    assert _same(_outcome(run), reference)


@pytest.mark.parametrize(("point", "k"), REAL, ids=[f"sigkill-{p}:{k}" for p, k in REAL])
def test_sigkilled_process_resumes_bit_identically(setup, tmp_path, point, k):
    _, args, reference = setup
    run = tmp_path / "run"
    env = {**os.environ, CRASH_ENV: f"{point}:{k}", "DECLORA_CRASH_MODE": "kill", "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    killed = subprocess.run(
        [sys.executable, "-m", "declora", "run", *args, f"run_dir={run}"], env=env, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert main(["run", "--resume", str(run)]) == 0
    assert _same(_outcome(run), reference)


def test_resuming_under_another_process_count_names_the_launch_that_resumes_it(setup, tmp_path, capsys):
    root, args, _ = setup
    run = tmp_path / "run"
    assert main(["run", *args, "rounds=1", f"run_dir={run}"]) == 0
    latest = run / "state" / "latest.json"
    meta = json.loads(latest.read_text())
    meta["node_slices"] = [1, 1]  # as if two processes had saved it
    latest.write_text(json.dumps(meta))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "rounds=2"]) == 2
    out, err = capsys.readouterr()
    assert "run folder:" not in out  # refused before the experiment (and its model) is built
    assert "was saved by 2 processes (node slices [1, 1]); this launch has 1 ([2])" in err
    assert f"`torchrun --nproc-per-node 2 -m declora run --resume {run}`" in err
    assert "dist.node_slices" not in err  # it comes back from the run's config.yaml
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_nf4_run_resumes_under_the_other_decoder_to_the_same_numbers(tiny_bert, tmp_path):
    """model.quant_backend only chooses who decodes the same NF4 bytes, so a resume may change it (to
    move a run to a machine without bitsandbytes) and still end where an uninterrupted run ends."""
    pytest.importorskip("bitsandbytes")
    data = write_tiny_data(tmp_path / "tiny.jsonl", 32)
    args = [
        *(f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "model.base_quantization=nf4"),
        *(f"data.dataset={data}", "data.test_fraction=0.25", "partition.min_size=2", "train.batch_size=4"),
        *(
            "nodes=2",
            "train.local_steps=1",
            "eval.every=1",
            "eval.node_examples=4",
            "threads=1",
            "train.lr=0.01",
        ),
    ]
    assert (
        main(["run", *args, "rounds=3", "model.quant_backend=bitsandbytes", f"run_dir={tmp_path / 'ref'}"])
        == 0
    )
    assert (
        main(["run", *args, "rounds=2", "model.quant_backend=bitsandbytes", f"run_dir={tmp_path / 'cut'}"])
        == 0
    )
    assert main(["run", "--resume", str(tmp_path / "cut"), "rounds=3", "model.quant_backend=declora"]) == 0

    def evals(run):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in MEASURED} for r in records if r["event"] == "eval"]

    assert len(evals(tmp_path / "ref")) == 3 and evals(tmp_path / "cut") == evals(tmp_path / "ref")
    start = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["base_decoder"] == "bitsandbytes"  # who decoded, recorded
    (resumed,) = read_resumes(tmp_path / "cut")
    assert resumed["changes"]["model.quant_backend"] == {"old": "bitsandbytes", "new": "declora"}
    a, b = (
        load_file(str(tmp_path / r / "adapters/consensus/adapter_model.safetensors")) for r in ("ref", "cut")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
