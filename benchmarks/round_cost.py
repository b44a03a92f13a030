"""The cost of ONE federated round of N nodes: seconds, examples per second, and peak memory.

Workload: N nodes, K = 5 local steps per node, 8 review snippets per node per step (the shipped
rotten_tomatoes training set, IID split, each node drawing its own minibatches; MiniLM tokenizer,
truncation at 128 tokens, no fixed padding), LoRA r=8 alpha=16 on query/value plus a trained classifier
head, AdamW lr 1e-3 (no weight decay, no clipping), fp32, on CPU.

Three ways to run that round are compared:

- ``sequential_peft``: what today's simulators do. ONE PEFT model; nodes train one after another, each
  loading its adapter (``set_peft_model_state_dict``) and its AdamW state, taking K steps on its own
  dynamically padded minibatches, then saving both back. Per-node state is kept in memory.
- ``union_batch``: one union batch of all N x 8 examples (padded to the longest of the union) through a
  single PEFT adapter, K steps. Not a federated computation (every node shares one adapter): it is the
  throughput of simply making the batch N times bigger, a reference point.
- ``declora``: declora's batched trainer (``LocalTrainer.local_work``): every node's adapter stacked on
  one node axis over one frozen base, rows sorted by length into micro-batches of ``tokens_per_chunk``.

Why: declora's claim is that training N adapters as one model costs about what one big batch costs, and
that memory is base + N x (adapter + optimizer state), never N x base. This measures both claims.

Each (method, N) runs in its own subprocess (this file re-invoked with ``--worker``), so that peak RSS
(``ru_maxrss``) belongs to that measurement alone. One warm-up round is timed separately; the reported
s/round is the mean of the timed rounds that follow. Every method draws the same minibatches
(``declora.train.NodeStreams``, same seed) and is padded by the same function (``declora.train.pad``).

    python benchmarks/round_cost.py [--methods declora,sequential_peft,union_batch] [--nodes 8,32] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKER = "ROUND_COST_JSON "
METHODS = ("declora", "sequential_peft", "union_batch")
SEED, BATCH, STEPS, LR, RANK, ALPHA, MAX_LENGTH = 0, 8, 5, 1e-3, 8, 16.0, 128
SWEEP_CHUNKS = (256, 512, 1024, 2048, 8192)  # declora tokens_per_chunk tried at the sweep N
SWEEP_N = 8
MEMORY_NODES = (1, 128, 1024)  # declora only: memory growth with N
QUIET_CORES = 0.3  # other processes using fewer cores than this: an idle machine
BIG_N = 128  # from here on: one timed round of one local step (memory is the point)


@dataclass(frozen=True)
class Job:
    """One measurement, run in its own process."""

    method: str
    n: int
    steps: int = STEPS
    rounds: int = 2  # timed rounds after the warm-up round
    tokens_per_chunk: int = 8192  # declora only
    train_limit: int | None = None  # --quick: fewer training examples
    purpose: str = ""  # "sweep" | "main" | "memory"
    threads: int = 0  # torch intra-op threads; 0: torch's default
    warmup_nodes: int = 0  # nodes that train in the warm-up round (0: all); big N warms up cheaply


Round = Callable[[int], None]  # one round; the argument: train only the first k nodes (0: all)


@dataclass
class Workload:
    token_ids: list[list[int]]
    labels: np.ndarray
    streams: object  # declora.train.NodeStreams
    pad_id: int


# ---------------------------------------------------------------- the shared workload


def load_workload(job: Job) -> Workload:
    from transformers import AutoTokenizer

    from declora.assets import model_path
    from declora.config import DataConfig, PartitionConfig
    from declora.data import load_dataset, tokenize
    from declora.partition import partition
    from declora.train import NodeStreams

    train, _ = load_dataset(DataConfig(train_limit=job.train_limit), SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path("minilm")))
    token_ids = tokenize(train.texts, tokenizer, MAX_LENGTH)
    parts = partition(train.labels, job.n, PartitionConfig(kind="iid"), SEED)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Workload(token_ids, train.labels, NodeStreams(parts, BATCH, SEED), pad_id)


def node_batch(work: Workload, node: int) -> tuple[list[list[int]], torch.Tensor]:
    idx = work.streams.next_batch(node)
    return [work.token_ids[k] for k in idx], torch.as_tensor(work.labels[idx])


def peft_model() -> torch.nn.Module:
    """MiniLM with a PEFT LoRA adapter (SEQ_CLS: the classifier head is trained too), base dropout off."""
    from peft import LoraConfig, get_peft_model

    from declora.config import ModelConfig
    from declora.model import load_base

    base, _ = load_base(ModelConfig(rank=RANK, alpha=ALPHA, max_length=MAX_LENGTH), num_labels=2)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS"
    )
    model = get_peft_model(base, cfg)
    model.eval()  # as declora: the frozen base runs without dropout
    return model


def peft_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ids: list[list[int]],
    labels: torch.Tensor,
    pad_id: int,
) -> None:
    from declora.train import pad

    input_ids, mask = pad(ids, pad_id)  # padded to the longest row of this batch
    loss = F.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


# ---------------------------------------------------------------- the three methods: setup -> one round


def trainable(model: torch.nn.Module) -> dict:
    return {"params_per_node": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def setup_sequential_peft(job: Job, work: Workload) -> tuple[Round, dict]:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = peft_model()
    opt = adamw(model)
    init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    adapters = [{k: v.clone() for k, v in init.items()} for _ in range(job.n)]
    opt_states: list[dict | None] = [None] * job.n
    fresh = copy.deepcopy(opt.state_dict())  # no moments yet: AdamW creates them on its first step

    def train_node(i: int) -> None:
        set_peft_model_state_dict(model, adapters[i])
        opt.load_state_dict(opt_states[i] if opt_states[i] is not None else fresh)
        for _ in range(job.steps):
            peft_step(model, opt, *node_batch(work, i), work.pad_id)
        adapters[i] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        opt_states[i] = copy.deepcopy(opt.state_dict())

    def one_round(nodes: int = 0) -> None:
        for i in range(nodes or job.n):
            train_node(i)

    return one_round, trainable(model)


def setup_union_batch(job: Job, work: Workload) -> tuple[Round, dict]:
    model = peft_model()
    opt = adamw(model)

    def one_round(nodes: int = 0) -> None:
        for _ in range(job.steps):
            batches = [node_batch(work, i) for i in range(nodes or job.n)]
            ids = [row for rows, _ in batches for row in rows]
            peft_step(model, opt, ids, torch.cat([y for _, y in batches]), work.pad_id)

    return one_round, trainable(model)


def setup_declora(job: Job, work: Workload) -> tuple[Round, dict]:
    from declora.config import ModelConfig
    from declora.model import build_federation
    from declora.optim import NodeAdamW
    from declora.train import LocalTrainer

    fed = build_federation(ModelConfig(rank=RANK, alpha=ALPHA, max_length=MAX_LENGTH), n=job.n, num_labels=2)
    params = dict(fed.tensors())
    names = list(params)
    optimizer = NodeAdamW(params, {k: LR for k in names}, weight_decay=0.0)
    trainer = LocalTrainer(
        fed, optimizer, work.streams, work.token_ids, work.labels, work.pad_id, None, job.tokens_per_chunk
    )
    per_node = sum(p[0].numel() for p in params.values())

    def one_round(nodes: int = 0) -> None:
        active = torch.arange(job.n) < (nodes or job.n)
        trainer.local_work(active, names, job.steps, "steps")

    return one_round, {"params_per_node": per_node}


Setup = Callable[[Job, Workload], tuple[Round, dict]]
SETUPS: dict[str, Setup] = {
    "declora": setup_declora,
    "sequential_peft": setup_sequential_peft,
    "union_batch": setup_union_batch,
}


# ---------------------------------------------------------------- one measurement (worker process)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def machine_busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot, all cores (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def timed(fn: Callable[[], None]) -> dict:
    """Wall and own CPU seconds of ``fn``, and the cores other processes kept busy meanwhile."""
    wall, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "others": max(0.0, machine_busy_s() - busy - cpu) / wall}


def wait_quiet(max_wait_s: float, busy_cores: float = QUIET_CORES, sample_s: float = 3.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use < ``busy_cores``; returns the last sample."""
    deadline = time.monotonic() + max_wait_s
    while True:
        start = machine_busy_s()
        time.sleep(sample_s)
        busy = (machine_busy_s() - start) / sample_s
        if busy < busy_cores or time.monotonic() > deadline:
            return busy
        time.sleep(10)


def count_padding() -> dict[str, int]:
    """Wrap ``declora.train.pad`` (every method pads through it) to count padded and real tokens."""
    import declora.train

    counts, pad = {"padded": 0, "real": 0}, declora.train.pad

    def counting_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = pad(ids, pad_id)
        counts["padded"] += input_ids.numel()
        counts["real"] += int(mask.sum())
        return input_ids, mask

    declora.train.pad = counting_pad
    return counts


def measure(job: Job) -> dict:
    load_before = os.getloadavg()
    tokens = count_padding()
    work = load_workload(job)
    one_round, info = SETUPS[job.method](job, work)
    setup_rss = rss_gb()
    warmup = timed(lambda: one_round(job.warmup_nodes))
    tokens.update(padded=0, real=0)
    runs = [timed(lambda: one_round(0)) for _ in range(job.rounds)]
    seconds = float(np.mean([r["wall"] for r in runs]))
    examples = job.n * job.steps * BATCH
    return {
        **asdict(job),
        **info,
        "warmup_s": warmup["wall"],  # with warmup_nodes > 0: a round of that many nodes only
        "round_s": [r["wall"] for r in runs],
        "s_per_round": seconds,
        "examples_per_round": examples,
        "examples_per_s": examples / seconds,
        "padded_tokens_per_round": tokens["padded"] / job.rounds,
        "real_tokens_per_round": tokens["real"] / job.rounds,
        "cpu_s_per_round": float(np.mean([r["cpu"] for r in runs])),
        "cpu_per_wall": float(np.sum([r["cpu"] for r in runs]) / np.sum([r["wall"] for r in runs])),
        "others_busy_cores": float(np.mean([r["others"] for r in runs])),
        "rss_after_setup_gb": setup_rss,
        "peak_rss_gb": rss_gb(),
        "threads": torch.get_num_threads(),
        "threads_requested": job.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def worker(spec: str) -> None:
    job = Job(**json.loads(spec))
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(SEED)
    print(MARKER + json.dumps(measure(job)), flush=True)


def profile(method: str, n: int, threads: int, chunk: int, rows: int = 25) -> None:
    """One warm-up round, then one round under torch.profiler; prints the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if threads:
        torch.set_num_threads(threads)
    job = Job(method, n, threads=threads, tokens_per_chunk=chunk)
    one_round, _ = SETUPS[method](job, load_workload(job))
    one_round(0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        one_round(0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---------------------------------------------------------------- the harness (parent process)


def run_job(job: Job, max_wait_s: float) -> dict:
    busy = wait_quiet(max_wait_s) if max_wait_s > 0 else None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))]
    print(f"-> {job}", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {job} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = {**json.loads(lines[-1].removeprefix(MARKER)), "others_busy_cores_before": busy}
    print(
        f"   {result['s_per_round']:.2f} s/round, {result['peak_rss_gb']:.2f} GB, "
        f"others busy {result['others_busy_cores']:.2f} cores",
        file=sys.stderr,
    )
    return result


def big_job(method: str, n: int, purpose: str) -> Job:
    """N >= BIG_N: one timed local step (memory is the point), after a warm-up step of SWEEP_N nodes."""
    return Job(method, n, steps=1, rounds=1, warmup_nodes=SWEEP_N, purpose=purpose)


def plan(
    methods: list[str],
    nodes: list[int],
    threads: list[int],
    quick: bool,
    chunks: tuple[int, ...] = SWEEP_CHUNKS,
    memory_nodes: tuple[int, ...] = MEMORY_NODES,
) -> list[Job]:
    """The sweep (declora chunk sizes at N=8), then every method at every N, then declora's memory Ns.

    Speed rows run once per thread count, back to back; the big-N memory rows only with the first one.
    """
    if quick:
        base = Job("declora", 2, steps=1, rounds=1, train_limit=200, purpose="main")
        jobs = [replace(base, method=m) for m in methods]
        jobs += [replace(base, n=4, purpose="memory")] if "declora" in methods else []
        return [replace(j, threads=t) for j in jobs for t in threads]
    speed, memory = [], []
    if "declora" in methods:
        speed += [Job("declora", SWEEP_N, tokens_per_chunk=c, purpose="sweep") for c in chunks]
        extra = [n for n in memory_nodes if n not in nodes]
        speed += [Job("declora", n, purpose="memory") for n in extra if n < BIG_N]
        memory += [big_job("declora", n, "memory") for n in extra if n >= BIG_N]
    for n in nodes:
        speed += [big_job(m, n, "main") if n >= BIG_N else Job(m, n, purpose="main") for m in methods]
    return [replace(j, threads=t) for j in speed for t in threads] + [
        replace(j, threads=threads[0]) for j in memory
    ]


def default_chunk() -> int:
    """The micro-batch budget a user gets: the rows after the sweep measure what ``declora run`` does."""
    from declora.device import TOKENS_PER_CHUNK

    return TOKENS_PER_CHUNK["cpu"]  # the CPU default of train.tokens_per_chunk


def run_all(jobs: list[Job], max_wait_s: float, chunk: int) -> list[dict]:
    """Runs the jobs in order; declora rows other than the sweep use ``chunk``."""
    results: list[dict] = []
    for job in jobs:
        if job.method == "declora" and job.purpose != "sweep":
            job = replace(job, tokens_per_chunk=chunk)
        results.append(run_job(job, max_wait_s))
    return results


# ---------------------------------------------------------------- memory model and the written results


def memory_model(results: list[dict]) -> dict:
    """Theoretical adapter + optimizer bytes per node, and the measured growth between the two largest
    declora Ns (one comparison per tokens_per_chunk: the chunk sets the activation memory)."""
    rows = [r for r in results if r["method"] == "declora" and r["purpose"] != "sweep"]
    if not rows:
        return {}
    per_node, gb = rows[0]["params_per_node"], 2**30
    growth = []
    for chunk in sorted({r["tokens_per_chunk"] for r in rows if r["n"] >= BIG_N}):
        by_n: dict[int, dict] = {}
        for r in rows:
            if r["tokens_per_chunk"] == chunk:
                by_n.setdefault(r["n"], r)
        if len(by_n) < 2:
            continue
        small, big = (by_n[n] for n in sorted(by_n)[-2:])
        dn = big["n"] - small["n"]
        growth.append(
            {
                "tokens_per_chunk": chunk,
                "between_n": [small["n"], big["n"]],
                "setup_bytes_per_node": (big["rss_after_setup_gb"] - small["rss_after_setup_gb"]) * gb / dn,
                "peak_bytes_per_node": (big["peak_rss_gb"] - small["peak_rss_gb"]) * gb / dn,
            }
        )
    return {
        "params_per_node": per_node,
        "theory_param_adam_bytes_per_node": per_node * 4 * 3,  # param + 2 Adam moments, fp32
        "theory_with_grad_bytes_per_node": per_node * 4 * 4,  # ... + the dense (n, ...) gradient
        "measured_growth": growth,
    }


def environment() -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_end": os.getloadavg(),
    }


def note(r: dict, chunk: int) -> str:
    parts = [f"K={r['steps']}"]
    if r["method"] == "declora":
        parts.append(f"chunk={r['tokens_per_chunk']}" + (" (main)" if r["tokens_per_chunk"] == chunk else ""))
    if r["steps"] != STEPS:  # one local step only (memory runs): scale to a full round
        parts.append(f"1 step timed, x{STEPS} = {r['s_per_round'] * STEPS:.1f} s for K={STEPS}")
    if r.get("warmup_nodes"):
        parts.append(f"warm-up step on {r['warmup_nodes']} nodes")
    if r.get("real_tokens_per_round"):
        parts.append(f"padded/real tokens {r['padded_tokens_per_round'] / r['real_tokens_per_round']:.2f}")
    parts.append(
        f"{r['purpose']}; load {r['loadavg_before'][0]:.1f}; others busy {r['others_busy_cores']:.1f} cores"
    )
    return ", ".join(parts)


def table(results: list[dict], chunk: int) -> list[str]:
    lines = [
        "| method | N | threads | s/round | examples/s | CPU s/round | peak RSS GB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = sorted(results, key=lambda r: (r["threads"], r["purpose"] != "sweep", r["n"], r["method"]))
    for r in order:
        cpu = r["s_per_round"] * r["cpu_per_wall"]  # own CPU seconds: less sensitive to contention
        lines.append(
            f"| {r['method']} | {r['n']} | {r['threads']} | {r['s_per_round']:.2f} | "
            f"{r['examples_per_s']:.1f} | {cpu:.2f} | {r['peak_rss_gb']:.2f} | "
            f"{note(r, chunk)} |"
        )
    return lines


def memory_lines(mem: dict) -> list[str]:
    if not mem:
        return []
    mb = 1e6
    lines = [
        "",
        f"Per node: {mem['params_per_node']} trainable parameters (A, B, head). Theory: "
        f"{mem['theory_param_adam_bytes_per_node'] / mb:.3f} MB (param + 2 Adam moments, fp32), "
        f"{mem['theory_with_grad_bytes_per_node'] / mb:.3f} MB with the gradient.",
    ]
    for g in mem["measured_growth"]:
        lines.append(
            f"Measured growth N={g['between_n'][0]} -> {g['between_n'][1]} (chunk {g['tokens_per_chunk']}): "
            f"{g['setup_bytes_per_node'] / mb:.3f} MB/node after setup (params + moments), "
            f"{g['peak_bytes_per_node'] / mb:.3f} MB/node at peak RSS."
        )
    return lines


def merged(results: list[dict], command: str, out: Path) -> tuple[list[dict], list[str]]:
    """The results already in ``out`` with rows measured again replaced, and both commands."""
    old = json.loads((out / "round_cost.json").read_text())

    def key(r: dict) -> tuple:
        return r["method"], r["n"], r["purpose"], r["tokens_per_chunk"], r["threads_requested"]

    again = {key(r) for r in results}
    kept = [r for r in old["results"] if key(r) not in again]
    commands = old["command"] if isinstance(old["command"], list) else [old["command"]]
    return kept + results, [*commands, command]


def write(results: list[dict], command: str | list[str], out: Path, chunk: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "environment": environment(), "memory_per_node": memory_model(results)}
    doc["main_tokens_per_chunk"] = chunk
    doc["results"] = results
    (out / "round_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "round_cost.md").write_text(markdown(doc))


def caveat(results: list[dict]) -> list[str]:
    busy = [r["others_busy_cores"] for r in results]
    if max(busy) < QUIET_CORES:
        return []
    return [
        f"**Measured under load: other processes kept {min(busy):.1f}-{max(busy):.1f} of the "
        f"{os.cpu_count()} cores busy during the timed rounds** (notes column). Wall times compare methods "
        "only loosely; the own-CPU column and the padded/real token ratio are the steadier guides. "
        "Rerun on an idle machine before quoting speeds.",
        "",
    ]


def markdown(doc: dict) -> str:
    env = doc["environment"]
    load = " / ".join(f"{x:.2f}" for x in env["loadavg_end"])
    commands = doc["command"] if isinstance(doc["command"], list) else [doc["command"]]
    head = [
        "# Cost of one round (MiniLM, LoRA r=8 on query/value + head, K=5 steps x 8 examples per node)",
        "",
        *caveat(doc["results"]),
        "Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands),
        "",
        f"{env['date']}, torch {env['torch']}, default {env['threads']} threads, {env['cpu_count']} CPUs, "
        f"load average at the end {load}. s/round: mean of the timed rounds after one warm-up round; "
        "examples/s = N x K x 8 / s per round; CPU s/round: the process's own CPU time; peak RSS of the "
        "measuring process (one per row); others busy: cores used by other processes meanwhile.",
        "",
    ]
    chunk = doc.get("main_tokens_per_chunk", 0)
    return "\n".join(head + table(doc["results"], chunk) + memory_lines(memory_model(doc["results"]))) + "\n"


def rerender(path: Path) -> None:
    """Writes the markdown next to a results JSON again (after editing the table code, say)."""
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--nodes", default="8,32", help="N for every method (declora adds 1, 128, 1024)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a sanity check of the harness")
    ap.add_argument(
        "--threads",
        default="0",
        help="comma-separated torch thread counts, each measured (0: torch's default)",
    )
    ap.add_argument(
        "--chunks",
        default=",".join(map(str, SWEEP_CHUNKS)),
        help=f"declora tokens_per_chunk values swept at N={SWEEP_N}",
    )
    ap.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="declora tokens_per_chunk for the rows after the sweep (0: declora's default)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement wait up to S seconds for other processes to leave the CPUs idle",
    )
    ap.add_argument(
        "--memory-nodes",
        default=",".join(map(str, MEMORY_NODES)),
        help="declora-only N for the memory-growth rows ('' for none)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="replace the re-measured rows in OUT/round_cost.json (a row disturbed by load, say) "
        "instead of writing a new file",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--profile", metavar="METHOD:N", help="print a torch.profiler table of one round")
    ap.add_argument(
        "--report", type=Path, metavar="JSON", help="only re-render the markdown of a results file"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        return worker(args.worker)
    if args.report:
        return rerender(args.report)
    if args.profile:
        method, n = args.profile.split(":")
        first = [int(x.split(",")[0]) for x in (args.threads, args.chunks)]
        return profile(method, int(n), *first)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    nodes = [int(x) for x in args.nodes.split(",") if x]
    threads = [int(x) for x in args.threads.split(",") if x]
    chunks = tuple(int(x) for x in args.chunks.split(",") if x)
    chunk = args.chunk or default_chunk()
    memory_nodes = tuple(int(x) for x in args.memory_nodes.split(",") if x)
    results = run_all(plan(methods, nodes, threads, args.quick, chunks, memory_nodes), args.wait_quiet, chunk)
    command: str | list[str] = "python " + shlex.join(["benchmarks/round_cost.py", *sys.argv[1:]])
    if args.merge:
        results, command = merged(results, command, args.out)
    write(results, command, args.out, chunk)


if __name__ == "__main__":
    main()
