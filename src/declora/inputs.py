"""The files a run reads (model, data, graph files), and whether a resume reads the same ones.

A resume opens the paths of its config.yaml again. A relative path is opened from the working directory,
so a resume started elsewhere could open another file of the same name: that is refused, naming the
folder to resume from. A file edited between the start and the resume (its size or modification time
differs from what the start record kept) is warned about: the rounds after the checkpoint then train on
the file as it is now.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from declora.assets import hub_cached, hub_dataset
from declora.config import Config, ConfigError

log = logging.getLogger(__name__)


def input_paths(cfg: Config) -> dict[str, str]:
    """Every input path of the config, by key (a shipped model or corpus name is kept too: it names no
    file here, and is skipped where a path must exist)."""
    m, d, t = cfg.model, cfg.data, cfg.topology
    nodes = d.node_files if isinstance(d.node_files, tuple) else (d.node_files,)
    given = {
        "model.name": m.name,
        "model.init_adapter": m.init_adapter,
        "data.dataset": d.dataset if not d.node_files else None,  # node_files replace it: not read
        "data.test_file": d.test_file,
        **{f"data.node_files[{i}]" if len(nodes) > 1 else "data.node_files": f for i, f in enumerate(nodes)},
        "topology.edge_list": t.edge_list,
        "topology.weight_file": t.weight_file,
        **{f"plugins[{i}]": f for i, f in enumerate(cfg.plugins) if f.endswith(".py")},
    }
    return {k: v for k, v in given.items() if v is not None}


def check_started_in(cfg: Config, started_in: str | None) -> None:
    """Refuse a resume from another working directory where a relative input path names another file."""
    if started_in is None or Path(started_in).resolve() == Path.cwd().resolve():
        return
    for key, value in input_paths(cfg).items():
        path = Path(value).expanduser()
        there = Path(started_in) / path
        if not path.is_absolute() and there.exists() and there.resolve() != path.resolve():
            raise ConfigError(
                f"{key}={value!r} is relative, and the run opened it in {started_in}; from here "
                f"({Path.cwd()}) it names another file. Resume from {started_in} (cd there), so that the "
                "run goes on with the inputs it started with"
            )


def fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """Each existing input's resolved path, size in bytes and last modification (a folder: the sum of its
    files' sizes and the latest of their times): cheap to take, and it changes when the input does."""
    out = {}
    for key, value in input_paths(cfg).items():
        path = Path(value).expanduser()
        if not path.exists() and key in ("model.name", "model.init_adapter"):  # a hub id: its cached snapshot
            marker = "config.json" if key == "model.name" else "adapter_config.json"
            path = hub_cached(value, marker) or path
        if not path.exists() and key == "data.dataset":  # a hub dataset's cached files
            path = hub_dataset(value) or path
        if not path.exists():  # a shipped name ("minilm", "rotten_tomatoes")
            continue
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        stats = [f.stat() for f in files]
        newest = max((s.st_mtime for s in stats), default=0.0)
        out[key] = {
            "path": str(path.resolve()),
            "bytes": sum(s.st_size for s in stats),
            "modified": datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds"),
        }
    return out


def warn_changed(recorded: dict[str, dict[str, Any]] | None, cfg: Config) -> None:
    """Warn, per input, when it is not as the run's start found it."""
    now = fingerprints(cfg)
    for key, before in (recorded or {}).items():
        after = now.get(key)
        if after is not None and after != before:
            log.warning(
                "%s (%s) changed since the run started (%s bytes, modified %s; now %s bytes, modified %s): "
                "the resumed rounds use it as it is now",
                key,
                after["path"],
                before["bytes"],
                before["modified"],
                after["bytes"],
                after["modified"],
            )
