"""Per-row vs node-grouped LoRA product: forward+backward seconds of one adapted layer, MiniLM shapes.

One ``StackedLoRALinear`` over a frozen 384 -> 384 linear layer (MiniLM's query/value), rank 8, fp32, on
a micro-batch of ``nodes x rows_per_node`` rows of ``seq`` tokens whose nodes are shuffled (the trainer
sorts rows by length, so a micro-batch mixes nodes). One measurement = forward, then backward of a
weighted sum into the input and the factors, as in training. The two products alternate within every
repetition and the minimum over repetitions is kept (the machine is shared: the minimum is the least
disturbed run); the cores other processes kept busy are recorded beside it.

The ratio per_row / grouped at each point gives the auto rule of ``train.lora_product``
(``declora.grouped.AUTO_GROUPED``).

    python benchmarks/grouped_product.py                     # the grid below, 1 thread, about 2 minutes
    python benchmarks/grouped_product.py --nodes 8 --rows 1,8 --seq 32 --out /tmp/gp   # a quick look
    python benchmarks/grouped_product.py --device cuda --precision bf16 --nodes 8,64,1024 --reps 20
                                                             # on a GPU: writes grouped_product_cuda.*
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from declora.lora import NodeRouting, StackedLoRALinear

HERE = Path(__file__).resolve().parent
D, RANK = 384, 8  # MiniLM-L6 hidden size; declora's default rank
MAX_TOKENS = 8192  # points with more tokens per micro-batch are skipped (CPU time)


def busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def setup(nodes: int, rows_per_node: int, seq: int, device: str) -> tuple[StackedLoRALinear, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    routing = NodeRouting()
    init_A = torch.randn(RANK, D, generator=g)
    layer = StackedLoRALinear(nn.Linear(D, D), nodes, RANK, 2.0, 0.0, routing, init_A)
    with torch.no_grad():
        layer.B.normal_(0, 0.02, generator=g)
    rows = torch.arange(nodes).repeat_interleave(rows_per_node)
    routing.rows = rows[torch.randperm(rows.shape[0], generator=g)].to(device)
    x = torch.randn(rows.shape[0], seq, D, generator=g).to(device).requires_grad_(True)
    return layer.to(device), x, torch.randn(rows.shape[0], seq, D, generator=g).to(device)


def step(layer: StackedLoRALinear, x: Tensor, weights: Tensor, product: str, bf16: bool) -> tuple[float, ...]:
    """Wall and own CPU seconds of one forward+backward with ``product`` (bf16: under bf16 autocast)."""
    layer.routing.product = product
    layer.routing.rows = layer.routing.rows  # a new micro-batch: the grouping is recomputed and timed
    layer.A.grad = layer.B.grad = x.grad = None
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        y = layer(x)
    (y.float() * weights).sum().backward()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(nodes: int, rows_per_node: int, seq: int, reps: int, device: str, bf16: bool) -> dict:
    layer, x, weights = setup(nodes, rows_per_node, seq, device)
    times: dict[str, list[tuple[float, float]]] = {"per_row": [], "grouped": []}
    for product in times:  # warm-up
        step(layer, x, weights, product, bf16)
    busy, wall = busy_s(), time.perf_counter()
    for _ in range(reps):
        for product, seconds in times.items():
            seconds.append(step(layer, x, weights, product, bf16))
    wall = time.perf_counter() - wall
    own_cpu = sum(c for seconds in times.values() for _, c in seconds)
    others = max(0.0, (busy_s() - busy) - own_cpu) / wall
    best = {product: min(w for w, _ in seconds) for product, seconds in times.items()}
    best_cpu = {product: min(c for _, c in seconds) for product, seconds in times.items()}
    return {
        "nodes": nodes,
        "rows_per_node": rows_per_node,
        "seq": seq,
        "tokens_per_node": rows_per_node * seq,
        "per_row_ms": 1e3 * best["per_row"],
        "grouped_ms": 1e3 * best["grouped"],
        "speedup": best["per_row"] / best["grouped"],
        "per_row_cpu_ms": 1e3 * best_cpu["per_row"],
        "grouped_cpu_ms": 1e3 * best_cpu["grouped"],
        "speedup_cpu": best_cpu["per_row"] / best_cpu["grouped"],
        "others_busy_cores": others,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Per-row vs node-grouped LoRA product: one 384x384 layer, rank 8, {result['precision']}, "
        f"{result['device']}, forward+backward",
        "",
        f"`{result['command']}`  ",
        f"{result['date']}, torch {result['torch']}, {result['threads']} thread(s), {result['cpus']} CPUs, "
        f"load average at start {result['load']:.2f}. Times: the minimum over {result['reps']} "
        "repetitions (wall; and own CPU time); others busy: the cores other processes kept busy meanwhile.",
        "",
        "| nodes | rows/node | seq | tokens/node | per_row ms | grouped ms | per_row / grouped "
        "| CPU ms per_row / grouped | ratio of CPU ms | others busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['nodes']} | {p['rows_per_node']} | {p['seq']} | {p['tokens_per_node']} | "
            f"{p['per_row_ms']:.2f} | {p['grouped_ms']:.2f} | {p['speedup']:.2f} | "
            f"{p['per_row_cpu_ms']:.2f} / {p['grouped_cpu_ms']:.2f} | {p['speedup_cpu']:.2f} | "
            f"{p['others_busy_cores']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="8,64")
    ap.add_argument("--rows", default="1,2,4,8,32", help="rows per node in the micro-batch")
    ap.add_argument("--seq", default="1,4,8,16,32,128", help="tokens per row")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: under autocast")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    grid = [(n, r, s) for n in ints(args.nodes) for r in ints(args.rows) for s in ints(args.seq)]
    result = {
        "command": "python " + shlex.join(["benchmarks/grouped_product.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load": os.getloadavg()[0],
        "reps": args.reps,
        "device": args.device,
        "precision": args.precision,
        "points": [],
    }
    for n, r, s in grid:
        if n * r * s > MAX_TOKENS:
            continue
        point = measure(n, r, s, args.reps, args.device, args.precision == "bf16")
        print(json.dumps(point), flush=True)
        result["points"].append(point)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "grouped_product" if args.device == "cpu" else f"grouped_product_{args.device.split(':')[0]}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
