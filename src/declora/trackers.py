"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow.

``log.trackers: [tensorboard, wandb, mlflow]`` (the older top-level ``tensorboard: true`` still adds
TensorBoard). Each declora run is one tracker run (a resumed run continues it), its hyperparameters are
the resolved config, and every round it gets the numeric metrics of the round record under the
families of ``tag_of`` (``accuracy/acc_avg_factors``, ...). metrics.jsonl stays the
record; the trackers mirror it. Only rank 0 of a multi-process run tracks.

W&B runs in the mode ``log.wandb_mode`` names, else ``$WANDB_MODE``, else offline (``wandb sync
RUN_DIR/wandb/offline-run-*`` uploads one later); MLflow writes to a local file store, by default
``mlruns`` beside the run folder. Each is an optional extra: ``pip install 'declora[trackers]'``.
The run folder names the tracker runs it continues (RUN_DIR/wandb_run_id, RUN_DIR/mlflow_run_id), so a
moved folder continues them too. What would make a tracker fail at its start (a package not installed,
a bad ``$WANDB_MODE``, W&B online without credentials) is refused when the config is checked, before
any run folder is made or changed (``setup_problem``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, cast
from urllib.parse import urlparse
from urllib.request import url2pathname

from declora.allowed import TWO_LABEL_METRICS
from declora.config import Config, ConfigError, to_dict
from declora.runfolder import atomic_write_text, read_resumes

WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name
SENT_ROUND = "trackers_round"  # RUN_DIR file: the last round the trackers were sent
MLFLOW_RUN_ID = "mlflow_run_id"  # RUN_DIR file naming the MLflow run that a resume continues
WANDB_RUN_ID = "wandb_run_id"  # RUN_DIR file naming the W&B run that a resume continues
RUN_IDS = (MLFLOW_RUN_ID, WANDB_RUN_ID)  # what a run restarted from round 0 keeps, to go on in the same runs
WandbMode = Literal["online", "offline", "disabled", "shared"]  # wandb.init(mode=...)


# Scalars worth a curve, grouped so that a tracker shows one panel per family.
GROUPS = {
    "acc_": "accuracy",
    **dict.fromkeys(TWO_LABEL_METRICS, "accuracy"),
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
    """One W&B run per run folder (its id kept in RUN_DIR/wandb_run_id, so a resume continues it)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", "wandb") from err
        self.run = wandb.init(
            project=cfg.log.project,
            name=run_dir.name,
            id=wandb_run_id(run_dir),
            resume="allow",
            reinit="create_new",  # beside a W&B run the caller has open, which the default would finish
            dir=str(run_dir),
            mode=wandb_mode(cfg),
            config=to_dict(cfg),
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode(cfg: Config) -> WandbMode:
    """log.wandb_mode, else $WANDB_MODE, else offline (setup_problem has checked $WANDB_MODE)."""
    return cast(WandbMode, cfg.log.wandb_mode or os.environ.get("WANDB_MODE") or "offline")


# A W&B run's local files: RUN_DIR/wandb/[offline-]run-YYYYMMDD_HHMMSS-ID[-N]/run-ID.wandb
_LOCAL_RUN = re.compile(r"(?:offline-)?run-(?P<time>\d{8}_\d{6})-.+/run-(?P<id>.+)\.wandb")


def wandb_run_id(run_dir: Path) -> str:
    """The id of the W&B run this folder continues, kept in RUN_DIR/wandb_run_id from its first start.
    A new folder gets a new id (not one derived from its path: a folder moved, or overwritten by
    another run, would split or mix W&B runs)."""
    id_file = run_dir / WANDB_RUN_ID
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = _older_wandb_run(run_dir) or secrets.token_hex(8)
    atomic_write_text(id_file, run_id, "trackers")
    return run_id


def _older_wandb_run(run_dir: Path) -> str | None:
    """The W&B run of a folder an older declora made (no wandb_run_id; the id was a hash of the folder's
    path, lost once the folder moves): read from its local run folders, the first if there are several."""
    files = (run_dir / "wandb").glob("*run-*/run-*.wandb")
    runs = [m for p in files if (m := _LOCAL_RUN.fullmatch(f"{p.parent.name}/{p.name}"))]
    return min(runs, key=lambda m: m["time"])["id"] if runs else None


def _experiment_id(client: Any, name: str) -> str:
    """The MLflow experiment ``name``'s id, created if missing. Cells of ``declora compare --jobs`` share
    one store: another may create the experiment between this one's look and its create."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:  # not the race: the store's own error
            raise
        return found.experiment_id


class MLflow:
    """One MLflow run per run folder (its id kept in RUN_DIR/mlflow_run_id, so a resume continues it)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow", "mlflow-skinny") from err
        self.client = MlflowClient(tracking_uri=mlflow_uri(cfg, run_dir))
        experiment_id = _experiment_id(self.client, cfg.log.project)
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


def _as_uri(uri: str) -> str:
    """A folder path (what MLflow's docs show for a local store) as the file: URI it stands for."""
    scheme = urlparse(uri).scheme
    return Path(uri).expanduser().resolve().as_uri() if len(scheme) <= 1 else uri  # "C:/..": a drive


def mlflow_uri(cfg: Config, run_dir: Path) -> str:
    uri = (
        _as_uri(cfg.log.mlflow_uri) if cfg.log.mlflow_uri else (run_dir.resolve().parent / "mlruns").as_uri()
    )
    if uri.startswith("file:"):  # MLflow 3 keeps the file store behind this switch (no database needed)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def check_tracker_runs(cfg: Config, run_dir: Path) -> None:
    """Before a resume changes its folder: the MLflow run it continues is in the store it logs to (a
    moved folder leaves its default store, mlruns beside it, behind). Refused, not continued as a new
    MLflow run with a warning: that run would hold only the rounds after the resume, splitting the run's
    history over two stores with a line in a log to say so. The error says how to get either."""
    id_file = run_dir / MLFLOW_RUN_ID
    if "mlflow" not in tracker_names(cfg) or not id_file.is_file():
        return
    run_id, uri = id_file.read_text().strip(), mlflow_uri(cfg, run_dir)
    if _mlflow_has_run(uri, run_id):
        return
    where, fix = (
        ("log.mlflow_uri", "restore that run there")
        if cfg.log.mlflow_uri
        else (
            "log.mlflow_uri=null: mlruns beside the run folder, which did not move with it",
            f"point log.mlflow_uri at the old store or move that mlruns into {run_dir.resolve().parent}",
        )
    )
    raise ConfigError(
        f"--resume {run_dir}: the MLflow run {run_id} it continues ({MLFLOW_RUN_ID}) is not in the store "
        f"{uri} ({where}): {fix}, resume without mlflow in log.trackers (metrics.jsonl keeps every "
        f"round), or delete {id_file} to start a new MLflow run"
    )


def _mlflow_has_run(uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:") and not Path(url2pathname(urlparse(uri).path)).is_dir():
        return False  # no store there (and opening one would create it)
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


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


_CHECK_SETUP = contextvars.ContextVar("declora_check_tracker_setup", default=True)


@contextlib.contextmanager
def reading_saved_config() -> Iterator[None]:
    """Configs loaded inside are only compared with (a resume's saved config.yaml), never run: their
    trackers' setup is not checked. The config a resume runs is, after its overrides, so
    ``--resume DIR log.trackers=[]`` goes on where a tracker's package is missing."""
    token = _CHECK_SETUP.set(False)
    try:
        yield
    finally:
        _CHECK_SETUP.reset(token)


def setup_problem(cfg: Config) -> str | None:
    """What would make a configured tracker fail at its start, as a one-line error (None: nothing): a
    package not installed, a $WANDB_MODE that is not a mode, W&B online without credentials. The config
    check (validation.validate) calls it, so the run is refused before its folder is made or changed."""
    if not _CHECK_SETUP.get():
        return None
    if missing := _missing_package(cfg):
        return missing
    if "mlflow" in tracker_names(cfg) and (problem := _mlflow_problem(cfg)):
        return problem
    return _wandb_problem(cfg) if "wandb" in tracker_names(cfg) else None


def _mlflow_problem(cfg: Config) -> str | None:
    """A log.mlflow_uri whose scheme the installed MLflow has no store for (sqlite: and the other
    databases need the full mlflow package, not mlflow-skinny), or a tracking server that does not
    answer (MLflow would retry for minutes before failing)."""
    if not cfg.log.mlflow_uri:
        return None
    if urlparse(cfg.log.mlflow_uri).scheme in ("http", "https"):
        return _server_problem(cfg.log.mlflow_uri)
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as stores
    except ImportError:  # an MLflow whose store registry moved: its own start decides
        return None
    try:
        stores.get_store_builder(_as_uri(cfg.log.mlflow_uri))
    except Exception:  # noqa: BLE001 - MLflow's unsupported-URI errors differ between versions
        schemes = sorted(k for k in getattr(stores, "_registry", {}) if k)  # a private table: may move
        return (
            f"log.mlflow_uri={cfg.log.mlflow_uri!r}: the installed MLflow has no store for its scheme; "
            f"use a folder path or one of {schemes} (a database such as sqlite: needs pip install mlflow)"
        )
    return None


def _server_problem(uri: str, timeout_s: float = 10.0) -> str | None:
    """An MLflow tracking server that cannot be reached: asked once for its /health page. Any HTTP answer
    (an error status from a proxy or a login too) is a server there, for MLflow to talk to."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()  # noqa: S310 (http(s) only)
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:  # refused, no such host, a timeout, a malformed URI
        reason = getattr(err, "reason", None) or err
        return (
            f"log.mlflow_uri={uri!r}: no MLflow tracking server answers there ({reason}); start it, fix the "
            "URI, or leave log.mlflow_uri out for a local store beside the run folder"
        )
    return None


def _missing_package(cfg: Config) -> str | None:
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


def _wandb_problem(cfg: Config) -> str | None:
    from declora.allowed import CHOICES

    bad = sorted(set(cfg.log.project) & set(WANDB_FORBIDDEN))
    if bad or len(cfg.log.project) > 128:  # W&B refuses these in wandb.init, after the run folder is made
        why = f"cannot contain {bad}" if bad else f"has {len(cfg.log.project)} characters, more than 128"
        hint = " (the entity goes in WANDB_ENTITY, not in the project's name)" if "/" in bad else ""
        return f"log.project={cfg.log.project!r}: a W&B project name {why}{hint}"
    modes = [mode for mode in CHOICES["log.wandb_mode"] if mode is not None]
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in modes:  # wandb reads it even when log.wandb_mode names the mode
        return f"WANDB_MODE={env!r} (in the environment) is not allowed; choose one of {modes}, or unset it"
    if wandb_mode(cfg) != "online":
        return None
    key = "log.wandb_mode=online" if cfg.log.wandb_mode else "WANDB_MODE=online"
    return _wandb_credentials_problem(key)


def _wandb_credentials_problem(key: str) -> str | None:
    """Online W&B without credentials fails in wandb.init (no terminal to ask on), after the run folder
    is made. They are looked up as wandb.init does, without the network: $WANDB_API_KEY or
    $WANDB_IDENTITY_TOKEN_FILE, a .netrc entry for its host, its settings file."""
    from wandb.errors import AuthenticationError

    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        find = wbauth.authenticate_session
    except (ImportError, AttributeError):  # a wandb whose lookup moved: its own start decides, unguessed
        return None
    try:
        auth = find(host=host, source="declora", prompt=False, update_session=False)
    except AuthenticationError as err:  # a key of the wrong form, or both variables set
        return f"{key}: W&B credentials: {' '.join(str(err).split())}"
    if auth is not None:
        return None
    return (
        f"{key} needs W&B credentials for {host.url}, and none are set: set WANDB_API_KEY or run "
        "`wandb login`; or use log.wandb_mode=offline (wandb sync RUN_DIR/wandb/offline-run-* uploads later)"
    )


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
