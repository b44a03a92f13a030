"""Quantized base: declora's torch decoding vs bitsandbytes' kernels, error against fp32 and CPU time.

Three measurements, each the minimum own-CPU time over ``--reps`` repetitions (1 thread):

- ``decode``: rebuilding one weight matrix from its codes (MiniLM's 384x384, 1536x384, 384x1536);
  NF4 through ``declora.quantize.dequantize_nf4`` and through bitsandbytes' ``dequantize_4bit`` on the
  same bytes; int8 through declora's multiply and bitsandbytes' ``int8_vectorwise_dequant``.
- ``model``: forward + backward of a MiniLM-shaped federation (6 layers, hidden 384, random weights
  built from config, LoRA r=8 on query/value, 8 nodes x 1 row of 32 tokens) with the base in fp32, int8
  and NF4, for each ``model.quant_backend``; with the relative error of its logits against fp32.
- bitsandbytes' own modules (``Linear8bitLt`` with threshold 0, ``Linear4bit`` NF4) on one 384->1536
  layer beside declora's ``QuantizedLinear``: forward + backward CPU time and output error against fp32.

    python benchmarks/quant_backend.py              # writes results/quant_backend.{json,md}, ~1 minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from declora.config import ModelConfig
from declora.model import build_federation
from declora.quantize import QuantizedLinear, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4

HERE = Path(__file__).resolve().parent
SHAPES = ((384, 384), (1536, 384), (384, 1536))  # (out, in): attention, intermediate, output


def cpu_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return 1e3 * best


def decode_rows(reps: int) -> list[dict]:
    import bitsandbytes.functional as bnb_f

    from declora import quantize_bnb

    rows = []
    for shape in SHAPES:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
        nf4, int8 = quantize_nf4(w), quantize_int8(w)
        stats = int8["scale"] * 127  # bitsandbytes keeps the row absmax, declora absmax / 127
        decoders = {
            "nf4_declora_ms": lambda nf4=nf4, w=w: dequantize_nf4(nf4, w.shape),
            "nf4_bitsandbytes_ms": lambda nf4=nf4, w=w: quantize_bnb.dequantize_nf4(nf4, w.shape),
            "int8_declora_ms": lambda int8=int8, w=w: dequantize_int8(int8, w.shape),
            "int8_bitsandbytes_ms": lambda c=int8["codes"], s=stats: bnb_f.int8_vectorwise_dequant(c, s),
        }
        rows.append({"shape": list(shape), **{k: cpu_ms(fn, reps) for k, fn in decoders.items()}})
    return rows


def minilm_folder(root: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from declora.assets import model_path

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(str(model_path("minilm"))).save_pretrained(root)
    return root


def model_rows(reps: int) -> list[dict]:
    ids = torch.randint(1000, 20000, (8, 32), generator=torch.Generator().manual_seed(0))
    mask, nodes = torch.ones_like(ids), torch.arange(8)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_folder(Path(tmp))
        for quant, backend in (
            ("none", "declora"),
            *((q, b) for q in ("int8", "nf4") for b in ("declora", "bitsandbytes")),
        ):
            cfg = ModelConfig(name=str(folder), base_quantization=quant, quant_backend=backend)
            fed = build_federation(cfg, 8, 2)
            with torch.no_grad():
                for layer in fed.lora.values():
                    layer.B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))

            def step(fed=fed) -> torch.Tensor:
                with fed.route(nodes):
                    logits = fed(ids, mask)
                logits.sum().backward()
                return logits.detach()

            logits = step()
            reference = logits if reference is None else reference
            error = ((logits - reference).norm() / reference.norm()).item()
            rows.append(
                {
                    "base": quant,
                    "backend": backend,
                    "fwd_bwd_ms": cpu_ms(step, reps),
                    "logit_rel_error": error,
                }
            )
    return rows


def module_rows(reps: int) -> list[dict]:
    import bitsandbytes as bnb

    linear = nn.Linear(384, 1536).requires_grad_(False)  # frozen, as a base layer: no weight gradient
    x0 = torch.randn(8, 32, 384, generator=torch.Generator().manual_seed(2))
    reference = linear(x0).detach()
    weight, bias = linear.weight.data.clone(), nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    l8 = bnb.nn.Linear8bitLt(384, 1536, has_fp16_weights=False, threshold=0.0)
    l8.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    l4 = bnb.nn.Linear4bit(384, 1536, compute_dtype=torch.float32, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    l8.bias = l4.bias = bias
    modules = {
        "fp32 nn.Linear": linear,
        "declora int8 QuantizedLinear": QuantizedLinear(linear, "int8", "declora"),
        "bitsandbytes Linear8bitLt": l8.to("cpu"),
        "declora nf4 QuantizedLinear (declora decode)": QuantizedLinear(linear, "nf4", "declora"),
        "declora nf4 QuantizedLinear (bitsandbytes decode)": QuantizedLinear(linear, "nf4", "bitsandbytes"),
        "bitsandbytes Linear4bit nf4": l4.to("cpu"),
    }
    rows = []
    for name, module in modules.items():

        def step(module=module) -> torch.Tensor:
            x = x0.clone().requires_grad_(True)
            y = module(x)
            y.backward(torch.ones_like(y))
            return y.detach()

        error = ((step() - reference).norm() / reference.norm()).item()
        rows.append({"module": name, "fwd_bwd_ms": cpu_ms(step, reps), "output_rel_error": error})
    return rows


def markdown(result: dict) -> str:
    out = [
        "# Quantized base: declora vs bitsandbytes (CPU, 1 thread, minimum own CPU time)",
        "",
        f"`{result['command']}`  ",
        f"{result['date']}, torch {result['torch']}, bitsandbytes {result['bitsandbytes']}, "
        f"load average at start {result['load']:.2f}.",
        "",
        "## Decoding one weight matrix (ms)",
        "",
        "| shape (out, in) | NF4 declora | NF4 bitsandbytes | int8 declora | int8 bitsandbytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["decode"]:
        out.append(
            f"| {tuple(r['shape'])} | {r['nf4_declora_ms']:.3f} | {r['nf4_bitsandbytes_ms']:.3f} | "
            f"{r['int8_declora_ms']:.3f} | {r['int8_bitsandbytes_ms']:.3f} |"
        )
    out += [
        "",
        "## MiniLM-shaped federation, 8 nodes x 32 tokens, forward + backward",
        "",
        "| base | quant_backend | ms | logits' relative error vs fp32 |",
        "|---|---|---:|---:|",
    ]
    out += [
        f"| {r['base']} | {r['backend']} | {r['fwd_bwd_ms']:.1f} | {r['logit_rel_error']:.2e} |"
        for r in result["model"]
    ]
    out += [
        "",
        "## One 384 -> 1536 layer, 256 tokens, forward + backward",
        "",
        "| module | ms | output relative error vs fp32 |",
        "|---|---:|---:|",
    ]
    out += [
        f"| {r['module']} | {r['fwd_bwd_ms']:.2f} | {r['output_rel_error']:.2e} |" for r in result["modules"]
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import bitsandbytes

    result = {
        "command": "python " + shlex.join(["benchmarks/quant_backend.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "load": os.getloadavg()[0],
        "decode": decode_rows(args.reps),
        "model": model_rows(args.reps),
        "modules": module_rows(args.reps),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_backend.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "quant_backend.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
