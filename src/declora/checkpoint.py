"""Checkpoints: every node-stacked tensor, the optimizer moments and the run's counters.

Each rank (one in a one-process run) writes its shard, ``state/round_R.rank_K.safetensors`` with its
counters in ``round_R.rank_K.json``, each atomically (temporary file, then rename). After a barrier,
when every shard of round R is on disk, rank 0 writes ``latest.json`` (atomically, last): a round is
saved by every rank or, for resuming, by none. A rank keeps its last two shards (the one latest.json
names may be the older while rank 0 is still writing), so a run killed at any moment resumes.

Checkpoints are device-neutral: tensors are written from the CPU and read onto the run's device, so a
run saved on a GPU resumes on the CPU (``device=cpu``) and the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from declora.config import ConfigError
from declora.experiment import Experiment
from declora.runfolder import (
    atomic_write,
    atomic_write_text,
    crash_point,
    read_checkpoint_json,
    remove_stray_temporaries,
    resume_command,
    save_tensors,
    shard_name,
    shard_rounds,
)

LATEST = "latest.json"


def _stateful(exp: Experiment) -> list[tuple[str, Any]]:
    """Parts with state of their own (state_dict / load_state_dict), by checkpoint prefix."""
    owners: dict[str, object] = {"algorithm": exp.algorithm, "exchange": exp.exchange, "privacy": exp.privacy}
    owners["lr_schedule"] = exp.lr_schedule
    owners["stragglers"] = exp.stragglers
    return [(k, v) for k, v in owners.items() if v is not None and hasattr(v, "state_dict")]


def save_checkpoint(exp: Experiment, round_done: int, wall_s: float) -> Path:
    group, state_dir = exp.group, exp.run_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach() for k, v in exp.fed.tensors().items()}
    tensors.update({f"optim/{k}": v for k, v in exp.optimizer.state_dict().items()})
    tensors.update({f"codec/{k}": v for k, v in exp.exchange.codec.state_dict().items()})
    for prefix, owner in _stateful(exp):
        state = owner.state_dict()
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):  # a registered algorithm's state_dict, say
                raise ConfigError(
                    f"{prefix} {type(owner).__name__}.state_dict()[{k!r}] is a {type(v).__name__}; a "
                    "checkpoint holds tensors only (wrap a number as torch.tensor(value))"
                )
        tensors.update({f"{prefix}/{k}": v for k, v in state.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}  # device-neutral
    name = shard_name(round_done, group.rank)
    atomic_write(state_dir / f"{name}.safetensors", lambda p: save_tensors(tensors, p), "ckpt.tensors")
    counters = {"round": round_done, "streams": exp.streams.state(), "ledger": exp.exchange.ledger.state()}
    atomic_write_text(state_dir / f"{name}.json", json.dumps(counters, indent=1), "ckpt.counters")
    group.barrier()  # every rank's shard of this round is complete
    if group.is_main:
        remove_stray_temporaries(state_dir)  # what a kill inside an earlier save left
        meta = {"round": round_done, "wall_s": wall_s, "node_slices": list(group.layout.counts)}
        atomic_write_text(state_dir / LATEST, json.dumps(meta, indent=1), "ckpt.latest")
    crash_point("ckpt.committed")
    _prune(state_dir, group.rank, round_done)
    return state_dir / f"{name}.safetensors"


def _prune(state_dir: Path, rank: int, round_done: int) -> None:
    """Keep this rank's shard of ``round_done`` and its newest older one (the last committed round)."""
    rounds = shard_rounds(state_dir, rank)
    older = [r for r in rounds if r < round_done]
    keep = {round_done, max(older)} if older else {round_done}
    for r in rounds - keep:
        for suffix in ("safetensors", "json"):
            (state_dir / f"{shard_name(r, rank)}.{suffix}").unlink(missing_ok=True)


def _read_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorsError for a bad header or length
        raise ConfigError(f"checkpoint file {path} is corrupt or truncated ({err})") from err


def check_layout(exp: Experiment, required: bool = True) -> dict[str, Any] | None:
    """The last complete checkpoint's latest.json, refused (on every rank alike) when it is not
    declora's, saved by another split of the nodes over processes, or (``required``) missing. Checked
    before a resumed rank opens its log in the run folder, so that a refused launch adds nothing to it,
    and again when loading."""
    group, latest = exp.group, exp.run_dir / "state" / LATEST
    meta = group.broadcast(read_checkpoint_json(latest) if group.is_main and latest.is_file() else None)
    if meta is None and not required:
        return None
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {exp.run_dir}: {latest} is missing (nothing to resume)")
    needed = ("round", "wall_s", "node_slices")
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("round"), int)
        or any(k not in meta for k in needed)
    ):
        raise ConfigError(f"checkpoint {latest}: not a declora latest.json (need {', '.join(needed)})")
    refuse_other_layout(exp.run_dir, tuple(meta["node_slices"]), group.layout.counts)
    return meta


def refuse_other_layout(run_dir: Path, saved: tuple[int, ...], counts: tuple[int, ...]) -> None:
    """A checkpoint is resumed by the split of the nodes over processes that saved it."""
    if saved != counts:
        k = len(saved)  # the run's dist.node_slices, if it set them, come back from its config.yaml
        raise ConfigError(
            f"{run_dir} was saved by {k} process{'es' if k > 1 else ''} (node slices {list(saved)}); "
            f"this launch has {len(counts)} ({list(counts)}), and a checkpoint cannot be resharded: "
            f"relaunch it as it ran, `{resume_command(run_dir)}`"
        )


def refuse_multi_process_checkpoint_alone(run_dir: Path) -> None:
    """A one-process resume of a folder saved by several processes, refused before the model loads
    (a multi-process launch checks its own layout once its group is up: check_layout)."""
    latest = run_dir / "state" / LATEST
    try:
        saved = tuple(json.loads(latest.read_text())["node_slices"])
        nodes = sum(saved)
    except (OSError, ValueError, KeyError, TypeError):
        return  # none yet, or unreadable: the load says so
    if len(saved) > 1:
        refuse_other_layout(run_dir, saved, (nodes,))


def load_checkpoint(exp: Experiment) -> tuple[int, float]:
    """Restore the last complete checkpoint of ``exp.run_dir``; returns (rounds done, wall seconds)."""
    group, state_dir = exp.group, exp.run_dir / "state"
    meta = check_layout(exp)
    assert meta is not None  # required
    name = shard_name(int(meta["round"]), group.rank)
    if group.layout.counts == (1,) and not (state_dir / f"{name}.safetensors").is_file():
        name = shard_name(int(meta["round"]), 0)  # one node: every rank's shard is the same replica
    tensors = _read_tensors(state_dir / f"{name}.safetensors", exp.fed.device)
    counters = read_checkpoint_json(state_dir / f"{name}.json")
    with torch.no_grad():
        for key, v in exp.fed.tensors().items():
            saved_v = tensors.get(f"model/{key}")
            if saved_v is None or saved_v.shape != v.shape:
                found = None if saved_v is None else tuple(saved_v.shape)
                raise ConfigError(
                    f"checkpoint of {exp.run_dir}: tensor {key} is {found}, the run needs {tuple(v.shape)}"
                )
            v.copy_(saved_v)
    exp.optimizer.load_state_dict(
        {k[len("optim/") :]: v for k, v in tensors.items() if k.startswith("optim/")}
    )
    exp.exchange.codec.load_state_dict(
        {k[len("codec/") :]: v for k, v in tensors.items() if k.startswith("codec/")}
    )
    for prefix, owner in _stateful(exp):
        owner.load_state_dict(
            {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
        )
    exp.streams.load_state(counters["streams"])
    exp.exchange.ledger.load_state(counters["ledger"])
    return int(meta["round"]), float(meta["wall_s"])
