"""Which config keys may change when a run resumes, and the check that refuses a change to any other
(or a change that the run's own settings rule out)."""

from __future__ import annotations

from typing import Any

from declora.config import Config, ConfigError, flatten, to_dict

# Keys that may change when a run resumes: they do not change what the finished rounds computed or what the
# checkpoint holds (more rounds, when to evaluate or save, how fast). Anything else is refused on resume.
RESUME_SAFE = (
    "rounds",
    "run_dir",  # a moved folder: the run is where --resume points
    "checkpoint_every",
    "eval.every",
    "eval.patience",  # a run it stopped goes on with more patience (or none)
    "threads",
    "device",  # checkpoints are device-neutral
    "export",
    "tensorboard",
    "log.trackers",  # mirrors of metrics.jsonl
    "log.mlflow_uri",  # where that mirror lives: a moved folder may point back at its old store
    "train.tokens_per_chunk",
    "model.quant_backend",  # who decodes the same NF4 bytes: bit-identical numbers
    "dist.timeout_s",
    "dist.backend",
)


def resume_changes(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every key that differs between two resolved configs."""
    old, cur = flatten(to_dict(saved)), flatten(to_dict(new))
    return {k: (old.get(k), cur[k]) for k in cur if old.get(k) != cur[k]}


def check_resume(saved: Config, new: Config, rounds_done: int | None = None) -> dict[str, tuple[Any, Any]]:
    """The changes a resume makes; refuses (ConfigError) any key outside RESUME_SAFE, with the reason."""
    changes = resume_changes(saved, new)
    unsafe = sorted(k for k in changes if k not in RESUME_SAFE)
    if unsafe:
        k = unsafe[0]
        made = changes[k][0]
        if k == "dist.node_slices" and made is None:
            made = "the even split (node_slices null)"
        raise ConfigError(
            f"{k} cannot change on resume ({changes[k][0]!r} -> {changes[k][1]!r}): the finished "
            f"rounds and the checkpoint were made with {made if isinstance(made, str) else repr(made)}; "
            f"may change on resume: {list(RESUME_SAFE)}"
        )
    if "rounds" in changes and new.privacy.level != "none" and new.privacy.target_epsilon is not None:
        raise ConfigError(
            f"rounds cannot change on resume with privacy.target_epsilon={new.privacy.target_epsilon} "
            f"({changes['rounds'][0]} -> {changes['rounds'][1]}): the noise was solved to spend that budget "
            f"over {changes['rounds'][0]} rounds, and more rounds would spend more than it; start a new run "
            "with the rounds you want"
        )
    if "rounds" in changes and new.train.schedule != "constant":
        raise ConfigError(
            f"rounds cannot change on resume with train.schedule={new.train.schedule} "
            f"({changes['rounds'][0]} -> {changes['rounds'][1]}): the learning rate decays over the run's "
            "rounds, so the rounds done followed another schedule than the longer run's; start a new run "
            "with the rounds you want"
        )
    if "export" in changes and new.export_round == "best":
        old_export, new_export = changes["export"]
        raise ConfigError(
            f"export cannot change on resume with export_round=best ({old_export!r} -> {new_export!r}): "
            f"the best round's adapters were written with export={old_export!r} and its factors are not "
            "kept; rerun with the export you want, or resume without changing export"
        )
    if rounds_done is not None and new.rounds < rounds_done:
        raise ConfigError(f"rounds={new.rounds} is below the {rounds_done} rounds already done")
    return changes
