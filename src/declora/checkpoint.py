"""Checkpoints: every node-stacked tensor, the optimizer moments and the run's counters.

Written atomically (temporary file, then rename), tensors first and the JSON that names them last, so
a run killed at any moment leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from declora.experiment import Experiment

LATEST = "latest.json"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(exp: Experiment, round_done: int, wall_s: float) -> Path:
    state_dir = exp.run_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in exp.fed.tensors().items()}
    tensors.update({f"optim/{k}": v.contiguous() for k, v in exp.optimizer.state_dict().items()})
    tensors.update({f"codec/{k}": v.contiguous() for k, v in exp.exchange.codec.state_dict().items()})
    algo_state = getattr(exp.algorithm, "state_dict", None)
    if algo_state is not None:
        tensors.update({f"algorithm/{k}": v.contiguous() for k, v in algo_state().items()})
    name = f"round_{round_done:06d}.safetensors"
    _atomic_write(state_dir / name, lambda p: save_file(tensors, str(p)))
    meta = {
        "round": round_done,
        "tensors": name,
        "wall_s": wall_s,
        "streams": exp.streams.state(),
        "ledger": exp.exchange.ledger.state(),
    }
    _atomic_write(state_dir / LATEST, lambda p: p.write_text(json.dumps(meta, indent=1)))
    for old in state_dir.glob("round_*.safetensors"):
        if old.name != name:
            old.unlink()
    return state_dir / name


def load_checkpoint(exp: Experiment) -> tuple[int, float]:
    """Restore the last complete checkpoint of ``exp.run_dir``; returns (rounds done, wall seconds)."""
    latest = exp.run_dir / "state" / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"no checkpoint in {exp.run_dir}: {latest} is missing (nothing to resume)")
    meta = json.loads(latest.read_text())
    tensors = load_file(str(exp.run_dir / "state" / meta["tensors"]))
    with torch.no_grad():
        for k, v in exp.fed.tensors().items():
            v.copy_(tensors[f"model/{k}"])
    exp.optimizer.load_state_dict(
        {k[len("optim/") :]: v for k, v in tensors.items() if k.startswith("optim/")}
    )
    exp.exchange.codec.load_state_dict(
        {k[len("codec/") :]: v for k, v in tensors.items() if k.startswith("codec/")}
    )
    algo_load = getattr(exp.algorithm, "load_state_dict", None)
    if algo_load is not None:
        algo_load({k[len("algorithm/") :]: v for k, v in tensors.items() if k.startswith("algorithm/")})
    exp.streams.load_state(meta["streams"])
    exp.exchange.ledger.load_state(meta["ledger"])
    return int(meta["round"]), float(meta["wall_s"])
