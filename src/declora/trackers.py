"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow.

``log.trackers: [tensorboard, wandb, mlflow]`` (the older top-level ``tensorboard: true`` still adds
TensorBoard). Each declora run is one tracker run (a resumed run continues it), its hyperparameters are
the resolved config, and every round it gets the numeric metrics of the round record under the
families of ``tag_of`` (``accuracy/acc_avg_factors``, ...). metrics.jsonl stays the
record; the trackers mirror it. Only rank 0 of a multi-process run tracks.

W&B runs in the mode ``log.wandb_mode`` names, else ``$WANDB_MODE``, else offline (``wandb sync
RUN_DIR/wandb/offline-run-*`` uploads one later); MLflow writes to a local file store, by default
``mlruns`` beside the run folder. Each is an optional extra: ``pip install 'declora[trackers]'``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from declora.config import Config, to_dict
from declora.runfolder import atomic_write_text, read_resumes

SENT_ROUND = "trackers_round"  # RUN_DIR file: the last round the trackers were sent
MLFLOW_RUN_ID = "mlflow_run_id"  # RUN_DIR file naming the MLflow run that a resume continues
WandbMode = Literal["online", "offline", "disabled", "shared"]  # wandb.init(mode=...)


# Scalars worth a curve, grouped so that a tracker shows one panel per family.
GROUPS = {
    "acc_": "accuracy",
    "consensus_": "consensus",
    "cross_term": "consensus",
    "bytes_": "bytes",
    "train_loss": "train",
    "wall_s": "time",
    "tokens_per_s": "time",
    "peak_mem_mb": "memory",
    "peak_gpu_mem_mb": "memory",
}


def tag_of(key: str) -> str | None:
    return next((f"{group}/{key}" for prefix, group in GROUPS.items() if key.startswith(prefix)), None)


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The round record's finite numbers, by tracker tag (a key outside the families goes under run/)."""
    out = {}
    for key, value in record.items():
        if key in ("round", "event") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[tag_of(key) or f"run/{key}"] = float(value)
    return out


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted keys (``train.lr``), values as text: what MLflow records."""
    out: dict[str, str] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = str(value)

    walk(to_dict(cfg), "")
    return out


def _missing(name: str, package: str) -> ImportError:
    return ImportError(
        f"log.trackers includes {name}: pip install 'declora[trackers]' (or pip install {package})"
    )


class TensorBoard:
    """Event files in RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR/tensorboard``)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch imports tensorboard lazily
            raise _missing("tensorboard", "tensorboard") from err
        resumed = any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not resumed:  # a resume's changes are in resumes.jsonl; the config text is the run's start
            config = "\n".join(f"    {k}: {v}" for k, v in flat_params(cfg).items())  # indented: monospace
            self.writer.add_text("config", config, 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run folder: its id is derived from the folder, so a resume continues it."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", "wandb") from err
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        # wandb checks the mode itself: WANDB_MODE may hold any string.
        mode = cast(WandbMode, cfg.log.wandb_mode or os.environ.get("WANDB_MODE") or "offline")
        self.run = wandb.init(
            project=cfg.log.project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=to_dict(cfg),
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """One MLflow run per run folder (its id kept in RUN_DIR/mlflow_run_id, so a resume continues it)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow", "mlflow-skinny") from err
        uri = cfg.log.mlflow_uri or (run_dir.resolve().parent / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store behind this switch (no database needed)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.log.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.log.project)
        )
        id_file = run_dir / MLFLOW_RUN_ID
        self.logged_until = 0  # the last step already in the run: a resume repeats the rounds after the
        # checkpoint (with the same numbers), which MLflow would hold twice
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            keys = self.client.get_run(self.run_id).data.metrics
            steps = [m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)]
            self.logged_until = max(steps, default=0)
            resumes = read_resumes(run_dir)  # params cannot change: what a resume changed goes in as tags
            for key, change in (resumes[-1]["changes"] if resumes else {}).items():
                self.client.set_tag(self.run_id, f"resumed.{key}", str(change["new"])[:5000])
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            id_file.write_text(self.run_id)
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.logged_until:
            return

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, Callable[[Config, Path], Tracker]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "mlflow": MLflow,
}


# tracker -> (the module it imports, what to pip install)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}


def missing_packages(cfg: Config) -> str | None:
    """The first configured tracker whose package is not installed, as an error message (None: all are)."""
    import importlib.util

    for name in tracker_names(cfg):
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            key = "tensorboard=true" if name == "tensorboard" and cfg.tensorboard else "log.trackers"
            return (
                f"{key} asks for {name}, which is not installed: pip install 'declora[trackers]' "
                f"(or pip install {package})"
            )
    return None


def tracker_names(cfg: Config) -> list[str]:
    names = list(dict.fromkeys(cfg.log.trackers))
    if cfg.tensorboard and "tensorboard" not in names:  # the older switch
        names.insert(0, "tensorboard")
    return names


class Trackers:
    """Every configured tracker, fed the same scalars. A resume repeats the rounds after its checkpoint
    (with the same numbers): RUN_DIR/trackers_round keeps the last round sent, and those up to it are
    not sent twice."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = [TRACKERS[name](cfg, run_dir) for name in tracker_names(cfg)]
        self.sent = run_dir / SENT_ROUND
        self.logged_until = int(self.sent.read_text()) if self.sent.is_file() else 0

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        if step <= self.logged_until:
            return
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step)
        atomic_write_text(self.sent, str(step), "trackers")

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
