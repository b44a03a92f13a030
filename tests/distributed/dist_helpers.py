"""What the distributed tests share: the tiny run, torchrun launches, and comparisons with the simulator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from declora.engine import MEASURED

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "default.yaml"  # what `declora run` uses without a config argument
NOT_COMPARED = {*MEASURED, "bytes_cross_process", "bytes_cross_process_total"}
# How a rank killed by a fatal signal begins its dump (faulthandler), or a C++ abort its last words.
CRASH_MARKS = ("Fatal Python error", "terminate called")


def tiny_overrides(model: Path, run_dir: Path, algorithm: str, *extra: str) -> list[str]:
    """A few seconds per run: 2-layer BERT (hidden 32), 5 nodes on a ring, 3 rounds, all evaluated."""
    return [
        f"model.name={model}",
        "model.rank=4",
        "model.max_length=32",
        "nodes=5",
        "partition.kind=iid",
        "rounds=3",
        "threads=1",
        "data.train_limit=96",
        "data.test_limit=24",
        "train.batch_size=4",
        "train.local_steps=2",
        "eval.every=1",
        "eval.node_examples=12",
        "checkpoint_every=1",
        "algorithm.switch_interval=1",  # tad_lora alternates every round: both phases within 3 rounds
        f"algorithm.name={algorithm}",
        f"run_dir={run_dir}",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float

    @property
    def digest(self) -> str:
        """The output for a failure message: a crashed rank's dump first (40 lines from its start), then
        the last 6000 characters of the output, each line kept once (every rank repeats its warnings)."""
        lines = list(dict.fromkeys(self.output.splitlines()))
        crash = [x for x in lines if x.startswith(CRASH_MARKS)]
        start = lines.index(crash[0]) if crash else len(lines)
        dump = "\n".join(lines[start : start + 40])
        return (dump + "\n...\n" if dump else "") + "\n".join(lines)[-6000:]


def torchrun(
    args: list[str],
    procs: int,
    port: int | None = None,
    hosts: tuple[int, int] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start ``torchrun`` on this machine; ``hosts`` = (node rank, number of hosts) for multi-host."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
    if hosts is None:  # the launcher binds a free port itself: no race with other processes
        launcher += ["--standalone"]
    else:
        launcher += [f"--nnodes={hosts[1]}", f"--node-rank={hosts[0]}", "--master-addr=127.0.0.1"]
        launcher += [f"--master-port={port or free_port()}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        launcher + args,
        cwd=cwd or ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, began: float, timeout: float = 240) -> Launch:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{output[-6000:]}") from None
    return Launch(proc.returncode, output, time.monotonic() - began)


def launch(args: list[str], procs: int, timeout: float = 240, **kwargs) -> Launch:
    began = time.monotonic()
    return finish(torchrun(args, procs, **kwargs), began, timeout)


def finished_lines(run_dir: Path) -> list[str]:
    """metrics.jsonl as its lines, to compare after a resume: what a run had written stays as it was."""
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def assert_resumed(run_dir: Path, from_rounds: list[int], before: list[str]) -> None:
    """The run was resumed (not started again) after each round of ``from_rounds`` (resumes.jsonl), and
    the lines it had written before the last resume are still there, byte for byte (their times too:
    a run started again from round 0 would rewrite them)."""
    resumes = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert [r["from_round"] for r in resumes] == from_rounds
    assert finished_lines(run_dir)[: len(before)] == before


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] in ("round", "eval")]


def assert_same_metrics(
    simulated: Path, distributed: Path, atol: float = 1e-6, node_vote: float = 0.0
) -> None:
    """Every logged number equal within ``atol`` (plus float32's relative precision, 1e-7 of the number:
    a consensus distance between noised states runs to thousands); for tests whose nodes are scored in
    batches of another make-up than the simulator's, one node's own accuracy within ``node_vote`` more (an
    untrained tiny model's near-tied logits can then flip one vote), and so their mean within
    node_vote / n more."""
    sim, dist = records(simulated), records(distributed)
    assert [r["round"] for r in sim] == [r["round"] for r in dist]
    for a, b in zip(sim, dist, strict=True):
        assert set(a) - NOT_COMPARED == set(b) - NOT_COMPARED
        for key in set(a) - NOT_COMPARED:
            tol = atol
            if key.startswith("acc_node"):
                tol += node_vote / len(a["acc_node"]) if key == "acc_node_mean" else node_vote
            if isinstance(a[key], float):
                assert abs(a[key] - b[key]) <= tol + 1e-7 * abs(a[key]), (a["round"], key, a[key], b[key])
            elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], float):  # per node
                gaps = [abs(x - y) for x, y in zip(a[key], b[key], strict=True)]
                assert all(gap <= tol for gap in gaps), (a["round"], key, a[key], b[key])
                assert sum(gap > atol for gap in gaps) <= (1 if tol > atol else 0), (a["round"], key)
            else:
                assert a[key] == b[key], (a["round"], key, a[key], b[key])


def assert_same_adapters(
    simulated: Path, distributed: Path, atol: float = 1e-6, products: bool = False
) -> None:
    """Every exported PEFT folder (consensus and each node's): same files, same tensors. With
    ``products``, each LoRA pair is compared as its product B A (the update the model applies): factors
    from an SVD are defined only up to a rotation within equal singular values, which last-bit
    differences can turn (measured: factors 7e-3 apart, products 5e-7)."""
    folders = sorted(p.name for p in (simulated / "adapters").iterdir())
    assert folders == sorted(p.name for p in (distributed / "adapters").iterdir())
    for name in folders:
        a = load_file(str(simulated / "adapters" / name / "adapter_model.safetensors"))
        b = load_file(str(distributed / "adapters" / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            if products and ".lora_B." in key:
                continue  # compared with its A
            if products and ".lora_A." in key:
                key_b = key.replace(".lora_A.", ".lora_B.")
                want, got = a[key_b] @ a[key], b[key_b] @ b[key]
                torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"{name} {key} (B A)")
            else:
                torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=f"{name} {key}")


def cut_bytes(edges: torch.Tensor, counts: list[int]) -> tuple[int, int]:
    """From the simulator's per-edge ledger of one round: (bytes on edges between nodes of different
    ranks, the same with one copy per (sender, receiving rank): what goes on the wire)."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    cut = owner[:, None] != owner[None, :]
    per_edge = int(edges[cut].sum())
    wire = 0
    for rank in range(len(counts)):
        to_rank = edges[:, owner == rank] * (owner != rank)[:, None]  # senders elsewhere -> nodes on rank
        wire += int(to_rank.max(1).values.sum())  # every edge of a sender carries the same message
    return per_edge, wire
