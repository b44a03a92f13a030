"""declora on one GPU against the sequential PEFT swap, in one process: throughput, FLOP utilisation, memory.

Models are built from config with random weights (throughput does not depend on the weights):
- ``minilm``: the MiniLM-L6 shapes (BERT, 6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522),
  sequence classification, LoRA on query/value plus a trained head; rows of ~30 tokens (16..44).
- ``smollm2``: the SmolLM2-135M shapes (LLaMA, 30 layers, hidden 576, 9 heads, 3 KV heads, intermediate
  1536, vocab 49152, tied embeddings), causal language modelling, LoRA on q_proj/v_proj; rows of ~128
  tokens (96..160).

A round: N nodes, K = 5 local steps of 8 examples per node, LoRA r = 8, alpha 16, AdamW lr 1e-3, precision
bf16 (frozen base in bf16 under autocast, fp32 LoRA, heads and moments). Two ways to run it:
- ``declora``: every node's adapter stacked on one node axis over one frozen base (``LocalTrainer``),
  micro-batches of the device's default token budget (``declora.device.TOKENS_PER_CHUNK``).
- ``sequential_peft``: what OpenFedLLM and FS-LLM do. ONE PEFT model; nodes train one after another, each
  loading its adapter and its AdamW state, K steps, saving both back. Its cost is linear in N (one node
  after another), so it is timed on min(N, --peft-nodes) nodes and its rate (examples/s) reported.
- ``declora_per_row`` / ``declora_grouped`` (at --products-at, default N = 64 and 256): declora with
  ``train.lora_product`` forced to each LoRA product (``declora`` itself uses ``auto``).

Per (model, N): examples/s, tokens/s (real tokens, padding excluded), model FLOP utilisation = useful
FLOPs / s over the bf16 matmul rate measured at startup (useful FLOPs per token: the forward, 2 x the
matmul parameters + the attention products, twice: the backward into the activations costs another
forward, and the frozen base computes no weight gradients), peak GPU memory, and the largest N that fits
(a CUDA out-of-memory ends that model's list). An untimed round of every node precedes the timed one.
A measurement that fails otherwise is recorded with its error and the next one runs; the JSON and the
table are rewritten after every measurement, so a run stopped at its time limit keeps what it measured.

    python benchmarks/gpu.py                              # one GPU: both models, N = 1..1024, <= 8 min
    python benchmarks/gpu.py --device cpu --quick         # tiny shapes on the CPU: the harness itself
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from the source tree, no install needed

RANK, ALPHA, LR, STEPS, BATCH, SEED = 8, 16.0, 1e-3, 5, 8, 0
NODES = (1, 8, 64, 256, 1024)


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # bert | llama
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    lengths: tuple[int, int]  # rows' token counts are uniform in [lo, hi]
    targets: tuple[str, ...]


SHAPES = {
    "minilm": Shape("minilm", "bert", 6, 384, 12, 12, 1536, 30522, (16, 44), ("query", "value")),
    "smollm2": Shape("smollm2", "llama", 30, 576, 9, 3, 1536, 49152, (96, 160), ("q_proj", "v_proj")),
}
TINY = {  # --quick: the same families, a few thousand parameters
    "minilm": Shape("minilm", "bert", 2, 32, 2, 2, 64, 512, (8, 16), ("query", "value")),
    "smollm2": Shape("smollm2", "llama", 2, 32, 4, 2, 64, 512, (12, 24), ("q_proj", "v_proj")),
}


def build_model(shape: Shape, folder: Path) -> Path:
    """A random model of ``shape`` saved as a transformers folder (what declora's loader reads)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    if shape.family == "bert":
        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            num_labels=2,
        )
        model = BertForSequenceClassification(config)
    else:
        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            intermediate_size=shape.intermediate,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        )
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)  # half the bytes to write and read; bf16 runs anyway
    return folder


def flops_per_token(shape: Shape, mean_len: float) -> float:
    """Useful training FLOPs per token: 2 x forward (the backward into the activations), see the top."""
    h, kv = shape.hidden, shape.hidden * shape.kv_heads // shape.heads
    per_layer = h * h * 2 + h * kv * 2 + shape.intermediate * h * (3 if shape.family == "llama" else 2)
    matmul = shape.layers * per_layer + (shape.vocab * h if shape.family == "llama" else 0)  # LM head
    attention = 4 * shape.layers * mean_len * h  # QK^T and AV: 2 * seq * h each, per token and layer
    return 2 * (2 * matmul + attention)


def matmul_rate(device: torch.device, size: int, iters: int) -> float:
    """Measured bf16 matmul FLOP/s of this device (the denominator of the FLOP utilisation)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up (cuBLAS picks its kernel)
    sync(device)
    began = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - began)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------- the workload


@dataclass
class Workload:
    token_ids: list[list[int]]  # node i's examples: rows [i * per_node, (i + 1) * per_node)
    labels: np.ndarray
    per_node: int

    def batch(self, node: int, step: int) -> list[int]:
        start = node * self.per_node + (step * BATCH) % self.per_node
        return list(range(start, start + BATCH))


def workload(shape: Shape, n: int, steps: int) -> Workload:
    rng = np.random.default_rng(SEED)
    per_node = BATCH * steps
    lo, hi = shape.lengths
    lengths = rng.integers(lo, hi + 1, size=n * per_node)
    ids = [rng.integers(5, shape.vocab, size=int(k)).tolist() for k in lengths]
    return Workload(ids, rng.integers(0, 2, size=n * per_node), per_node)


def task_of(shape: Shape):  # noqa: ANN201 - a declora.tasks.Task
    from declora.tasks import CausalLM, SequenceClassification

    return CausalLM(None, 0) if shape.family == "llama" else SequenceClassification(None, 0)


# ---------------------------------------------------------------- the two methods: setup -> one round


Round = Callable[[int], int]  # local steps this round -> real (unpadded) tokens trained


def setup_declora(
    shape: Shape, folder: Path, n: int, work: Workload, device: torch.device, product: str = "auto"
) -> Round:
    from declora.config import ModelConfig
    from declora.device import default_tokens_per_chunk
    from declora.model import build_federation
    from declora.optim import NodeAdamW
    from declora.train import LocalTrainer, NodeStreams

    head = "none" if shape.family == "llama" else "train"
    cfg = ModelConfig(name=str(folder), target_modules=shape.targets, rank=RANK, alpha=ALPHA, head=head)
    fed = build_federation(cfg, n, 2, shape.family == "llama", device, "bf16")
    fed.routing.product = product  # train.lora_product: auto | per_row | grouped
    params = dict(fed.tensors())
    optimizer = NodeAdamW(params, dict.fromkeys(params, LR))
    parts = [np.arange(i * work.per_node, (i + 1) * work.per_node) for i in range(n)]
    streams = NodeStreams(parts, BATCH, SEED)
    chunk = default_tokens_per_chunk(device)
    trainer = LocalTrainer(
        fed, optimizer, streams, work.token_ids, work.labels, 0, None, chunk, task_of(shape)
    )
    active = torch.ones(n, dtype=torch.bool)

    def one_round(steps: int) -> int:
        trainer.tokens = 0
        trainer.local_work(active, list(params), steps, "steps")
        return trainer.tokens

    return one_round


def setup_sequential_peft(shape: Shape, folder: Path, n: int, work: Workload, device: torch.device) -> Round:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from declora.config import ModelConfig
    from declora.device import autocast
    from declora.model import load_base
    from declora.train import pad

    causal = shape.family == "llama"
    base, _ = load_base(ModelConfig(name=str(folder)), 2, causal, "bf16")
    kind = "CAUSAL_LM" if causal else "SEQ_CLS"
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(shape.targets), task_type=kind)
    model = get_peft_model(base, lora).to(device)
    for p in model.parameters():  # fp32 masters of what trains, as declora's
        if p.requires_grad:
            p.data = p.data.float()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0)
    fresh = copy.deepcopy(opt.state_dict())
    init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    adapters, states = [dict(init) for _ in range(n)], [fresh] * n
    task = task_of(shape)

    def step(node: int, s: int) -> int:
        rows = work.batch(node, s)
        input_ids, mask = (t.to(device) for t in pad([work.token_ids[k] for k in rows], 0))
        labels = torch.as_tensor(work.labels[rows]).to(device)
        with autocast(device, "bf16"):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = task.row_loss(logits.float(), input_ids, mask, labels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return sum(len(work.token_ids[k]) for k in rows)

    def one_round(steps: int) -> int:
        tokens = 0
        for i in range(n):
            set_peft_model_state_dict(model, adapters[i])
            opt.load_state_dict(states[i])
            tokens += sum(step(i, s) for s in range(steps))
            adapters[i] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            states[i] = copy.deepcopy(opt.state_dict())
        return tokens

    return one_round


SETUPS = {
    "declora": setup_declora,
    "sequential_peft": setup_sequential_peft,
    # train.lora_product forced either way (declora itself uses auto), side by side at --products-at
    "declora_per_row": partial(setup_declora, product="per_row"),
    "declora_grouped": partial(setup_declora, product="grouped"),
}
PRODUCT_METHODS = ("declora_per_row", "declora_grouped")


# ---------------------------------------------------------------- one measurement


def measure(method: str, shape: Shape, folder: Path, n: int, args: argparse.Namespace, rate: float) -> dict:
    """Build, warm up (one untimed round), then time rounds of K steps of ``nodes`` nodes until 1 s has
    been timed (at most 5 rounds) and keep the median round. On an H200 a one-step warm-up and one timed
    round read the first method at each N up to 2.5x slower than the same product timed just after it
    (a round of MiniLM's N = 64 lasts 0.2 s); a one-round warm-up still left 1.7x."""
    device = torch.device(args.device)
    nodes = min(n, args.peft_nodes) if method == "sequential_peft" else n
    work = workload(shape, nodes, args.steps)
    row = {"model": shape.name, "method": method, "n": n, "nodes_timed": nodes, "steps": args.steps}
    gc.collect()  # the previous measurement's model (and, after an OOM, its traceback's tensors)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        one_round = SETUPS[method](shape, folder, nodes, work, device)
        one_round(args.steps)
        sync(device)
        times: list[float] = []
        while not times or (sum(times) < 1.0 and len(times) < 5):
            began = time.perf_counter()
            tokens = one_round(args.steps)
            sync(device)
            times.append(time.perf_counter() - began)
        seconds = float(np.median(times))
    except Exception as err:  # one failure (a kernel never run on this GPU) must not lose the other rows
        first = (str(err).splitlines() or [""])[0][:200]
        if is_oom(err):
            return {**row, "status": "oom", "error": first}
        return {**row, "status": "error", "error": f"{type(err).__name__}: {first}"}
    examples = nodes * args.steps * BATCH
    flops = tokens * flops_per_token(shape, tokens / examples)
    row.update(
        status="ok",
        seconds=seconds,
        rounds_timed=len(times),
        examples_per_s=examples / seconds,
        tokens_per_s=tokens / seconds,
        mfu=flops / seconds / rate,
        peak_gpu_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )
    return row


def reused(rows: list[dict], row: dict, peft_nodes: int) -> dict | None:
    """The sequential PEFT swap above --peft-nodes times the same nodes as at N = --peft-nodes: its row."""
    if row["method"] != "sequential_peft" or row["n"] <= peft_nodes:
        return None
    key = (row["model"], "sequential_peft", peft_nodes)
    done = next((r for r in rows if (r["model"], r["method"], r["n"]) == key and r["status"] == "ok"), None)
    return None if done is None else {**done, "n": row["n"], "reused_from_n": peft_nodes}


def run_all(
    shapes: list[Shape],
    args: argparse.Namespace,
    rate: float,
    deadline: float,
    on_row: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """N ascending, both models at each N (so a time budget cuts the largest N, not a whole model);
    ``on_row(rows)`` after each measurement."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {s.name: build_model(s, Path(tmp) / s.name) for s in shapes}
        for n in args.nodes:
            for shape in shapes:
                for method in args.methods + (list(PRODUCT_METHODS) if n in args.products_at else []):
                    row = {"model": shape.name, "method": method, "n": n}
                    if any(
                        (r["model"], r["method"], r["status"]) == (shape.name, method, "oom") for r in rows
                    ):
                        continue  # a larger N than one that did not fit
                    same = reused(rows, row, args.peft_nodes)
                    if same is not None:
                        rows.append(same)
                        continue
                    if time.perf_counter() > deadline:
                        rows.append({**row, "status": "skipped: time budget"})
                        continue
                    rows.append(measure(method, shape, folders[shape.name], n, args, rate))
                    print(json.dumps(rows[-1]), flush=True)  # a killed run still leaves its rows in the log
                    on_row(rows)
    return rows


# ---------------------------------------------------------------- output


def speedups(rows: list[dict]) -> None:
    """declora's examples/s over the sequential PEFT swap's, same model and N, in place."""
    for r in rows:
        peft = next(
            (p for p in rows if (p["model"], p["n"], p["method"]) == (r["model"], r["n"], "sequential_peft")),
            None,
        )
        if r["method"] == "declora" and r["status"] == "ok" and peft and peft["status"] == "ok":
            r["speedup_vs_sequential_peft"] = r["examples_per_s"] / peft["examples_per_s"]


def largest_fit(rows: list[dict]) -> dict[str, int]:
    fits = {}
    for r in rows:
        if r["method"] == "declora" and r["status"] == "ok":
            fits[r["model"]] = max(fits.get(r["model"], 0), r["n"])
    return fits


def fmt(value: object, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return "" if value is None else str(value)


def markdown(doc: dict) -> str:
    lines = [
        f"# declora on {doc['device_name']}: one round of N nodes x {doc['steps']} steps x {BATCH} examples",
        "",
        f"Command: `{doc['command']}`  ",
        f"Measured {doc['date']}; torch {doc['torch']}; bf16 matmul rate {doc['matmul_tflops']:.1f} TFLOP/s "
        f"(the FLOP utilisation's denominator); wall {doc['wall_s']:.0f} s.",
        f"torch's grouped_mm kernel: {grouped_note(doc['grouped_mm'])}.",
        "",
        "| model | method | N | status | examples/s | tokens/s | MFU % | peak GPU MB | x sequential PEFT |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        mfu = 100 * r["mfu"] if "mfu" in r else None
        lines.append(
            f"| {r['model']} | {r['method']} | {r['n']} | {r['status']} | {fmt(r.get('examples_per_s'))} | "
            f"{fmt(r.get('tokens_per_s'), 0)} | {fmt(mfu)} | {fmt(r.get('peak_gpu_mem_mb'), 0)} | "
            f"{fmt(r.get('speedup_vs_sequential_peft'))} |"
        )
    fits = ", ".join(f"{m}: N = {n}" for m, n in doc["largest_n_that_fits"].items())
    lines += [
        "",
        f"Largest N measured that fits: {fits or 'none'} (of N = {', '.join(map(str, doc['nodes']))}).",
        f"sequential PEFT is timed on min(N, {doc['peft_nodes']}) nodes (its cost is linear in N; "
        f"rows above N = {doc['peft_nodes']} repeat that measurement).",
    ]
    return "\n".join(lines) + "\n"


def grouped_note(grouped: dict) -> str:
    if not grouped["available"]:
        return "absent from this torch (the grouped rows time a loop of per-node products)"
    probes = ", ".join(
        f"{k} {'runs' if v else 'failed its probe (loop instead)'}" for k, v in grouped["probe"].items()
    )
    return probes or "available, not used"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:K | cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, N = 1, 4, 2 steps: tests the harness")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--methods", default="declora,sequential_peft")
    p.add_argument("--nodes", default=None, help=f"comma-separated N (default {','.join(map(str, NODES))})")
    p.add_argument("--steps", type=int, default=None, help=f"local steps K (default {STEPS})")
    p.add_argument("--products-at", default="64,256", help="N where per_row and grouped are also timed")
    p.add_argument("--peft-nodes", type=int, default=8, help="nodes the sequential PEFT swap is timed on")
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="start no measurement after this many seconds"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.models, args.methods = args.models.split(","), args.methods.split(",")
    args.nodes = (
        [int(x) for x in args.nodes.split(",")] if args.nodes else ([1, 4] if args.quick else list(NODES))
    )
    args.steps = args.steps or (2 if args.quick else STEPS)
    args.products_at = [int(x) for x in args.products_at.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from declora.device import check_device

    check_device(args.device)  # device=cuda without CUDA: one clear line, before any work
    device = torch.device(args.device)
    began = time.perf_counter()
    rate = matmul_rate(device, *((256, 4) if args.quick else (8192, 100)))
    shapes = TINY if args.quick else SHAPES
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> dict:
        doc = document(args, argv, copy.deepcopy(rows), device_name, rate, time.perf_counter() - began)
        stem = "gpu_quick" if args.quick else "gpu"
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(doc))
        return doc

    doc = write(run_all([shapes[m] for m in args.models], args, rate, began + args.budget_s, write))
    print(markdown(doc))
    return doc


def document(
    args: argparse.Namespace,
    argv: list[str] | None,
    rows: list[dict],
    device_name: str,
    rate: float,
    wall_s: float,
) -> dict:
    from declora import grouped

    speedups(rows)
    shapes = TINY if args.quick else SHAPES
    return {
        "command": " ".join(["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_name": device_name,
        "torch": torch.__version__,
        "matmul_tflops": rate / 1e12,
        "steps": args.steps,
        "nodes": args.nodes,
        "peft_nodes": args.peft_nodes,
        "quick": args.quick,
        "shapes": {m: asdict(shapes[m]) for m in args.models},
        "rows": rows,
        "largest_n_that_fits": largest_fit(rows),
        # whether the grouped rows ran torch's kernel or declora's loop (probed on first use per dtype)
        "grouped_mm": {
            "available": hasattr(torch.nn.functional, "grouped_mm"),
            "probe": {
                f"{kind}/{str(dtype).removeprefix('torch.')}": ok
                for (kind, dtype), ok in grouped._SUPPORT.items()
            },
        },
        "wall_s": wall_s,
    }


if __name__ == "__main__":
    main()
