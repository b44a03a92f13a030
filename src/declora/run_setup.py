"""What ``declora run`` runs: its config and run folder (a new run from a file and overrides, or the
folder's own config on --resume, each checked before any work), and under torchrun the process group,
whose ranks agree to run rank 0's config. Like the command line, it prints its errors: one line each."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from declora.config import Config, ConfigError, flatten, load_config, parse_override, to_dict
from declora.console import say_error
from declora.resume_rules import check_resume

if TYPE_CHECKING:
    from declora.dist import Solo

# configs/default.yaml of the working directory, else of the source checkout (editable installs).
DEFAULT_CONFIGS = (Path("configs/default.yaml"), Path(__file__).resolve().parents[2] / "configs/default.yaml")


def config_path(arg: str | None) -> Path:
    """The config file a command reads: the one given, else the default experiment's."""
    if arg is not None:
        return Path(arg)
    found = next((p for p in DEFAULT_CONFIGS if p.is_file()), None)
    if found is None:  # an installed (not editable) declora: the built-in defaults are another experiment
        raise ConfigError(
            "no config given, and configs/default.yaml (the default experiment) is neither in the current "
            "directory nor in declora's source checkout: give a config file, e.g. declora run my.yaml"
        )
    return found


def run_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """The run's config and folder, checked before any work: a new run needs an empty folder (or
    --overwrite); a resume takes its folder's config.yaml and only RESUME_SAFE overrides."""
    if args.resume:
        return _resumed_config(args)
    from declora.experiment import default_run_dir
    from declora.ignored import without_unread_defaults
    from declora.runfolder import check_new_run

    cfg = load_config(config_path(args.config), args.overrides)
    if args.config is None:  # the fallback config: its keys this run ignores were not the user's
        cfg = without_unread_defaults(cfg, [parse_override(text)[0] for text in args.overrides])
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    check_new_run(run_dir, args.overwrite)
    return cfg, run_dir


def _resumed_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """--resume DIR: the folder's saved config with the overrides a resume allows, after every check
    that the folder can go on (not in use, checkpoint kept, log complete, inputs where they were)."""
    from declora.checkpoint import refuse_multi_process_checkpoint_alone
    from declora.dist import launched
    from declora.inputs import check_started_in
    from declora.patience import check_patience_left
    from declora.report import read_metrics
    from declora.runfolder import (
        check_checkpoint_kept,
        check_last_round_evaluated,
        check_log_covers,
        check_not_in_use,
        check_writable,
        start_record,
    )
    from declora.trackers import check_tracker_runs, reading_saved_config

    run_dir = Path(args.resume)
    if args.config is not None:
        raise ConfigError(
            f"--resume {run_dir} takes its config from {run_dir / 'config.yaml'}; a config file "
            f"({args.config}) is not allowed with it (key=value overrides are, where safe)"
        )
    if args.overwrite:
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        raise ConfigError(f"--resume {run_dir}: {what}; give the folder of the run to continue")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a declora run folder?")
    check_not_in_use(run_dir)
    started_in = start_record(run_dir).get("cwd")
    try:
        with reading_saved_config():  # only compared with: cfg below is checked after the overrides
            saved = load_config(run_dir / "config.yaml")
    except ConfigError as err:  # a folder of another declora version, an edited file, a moved input
        elsewhere = started_in and Path(started_in).resolve() != Path.cwd().resolve()
        where = f" (the run started in {started_in}: relative paths are opened from there)"
        saved_at = str(run_dir / "config.yaml")  # named once: a YAML error names the file already
        named = str(err) if str(err).startswith(saved_at) else f"{saved_at}: {err}"
        raise ConfigError(f"{named}{where if elsewhere else ''}") from err
    for key, value in (parse_override(text) for text in args.overrides):  # before a new plugin is imported
        if key == "plugins" and tuple(value or ()) != saved.plugins:
            raise ConfigError(f"plugins cannot change on resume ({list(saved.plugins)!r} -> {value!r})")
        if key == "run_dir" and (value is None or Path(str(value)).resolve() != run_dir.resolve()):
            raise ConfigError(
                f"run_dir={value} with --resume {run_dir}: a resumed run goes on in the folder --resume "
                "names; to continue a copy, copy the folder and resume the copy"
            )
    check_checkpoint_kept(run_dir, saved.checkpoint_every, saved.rounds)
    if not launched():  # before the model loads (a torchrun launch compares layouts once its group is up)
        refuse_multi_process_checkpoint_alone(run_dir)
    cfg = load_config(run_dir / "config.yaml", args.overrides)
    if cfg.run_dir is not None and Path(cfg.run_dir).resolve() != run_dir.resolve():
        # a moved folder: the run is where --resume points, recorded as an absolute path so that the
        # adapters' load snippet works from anywhere (the same folder keeps the path it was given)
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir.resolve()))
    done = _rounds_done(run_dir)
    check_log_covers(run_dir, done)
    check_resume(saved, cfg, rounds_done=done)
    check_last_round_evaluated(run_dir, done, cfg.rounds)
    metrics = run_dir / "metrics.jsonl"
    if done and metrics.is_file():  # a run early stopping ended would stop again at once
        check_patience_left(cfg, [r for r in read_metrics(metrics) if r.get("round", 0) <= done], run_dir)
    check_tracker_runs(cfg, run_dir)
    check_started_in(saved, started_in)  # before any work (the engine checks again, and warns of
    # inputs changed since the start: declora.inputs)
    check_writable(run_dir)
    return cfg, run_dir


def _rounds_done(run_dir: Path) -> int | None:
    """The round of the last complete checkpoint (None: none yet, or unreadable: the load will say)."""
    import json

    try:
        return int(json.loads((run_dir / "state" / "latest.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def die(message: str) -> None:
    """A multi-process run failed: say so once per rank, then leave without waiting on dead peers (exit 2
    when a peer refused bad input before the run started, as one process would)."""
    from declora.dist import REFUSED

    sys.stderr.write(f"declora: error (rank {os.environ.get('RANK', 0)}): {message}\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(2 if REFUSED in message else 1)


def join_run(args: argparse.Namespace) -> tuple[Config, Path | None, Solo]:
    """Under torchrun, join the process group; rank 0's config is the run's (another host may hold a
    different file, or no run folder to resume from). Every rank must be launched in the same mode (a new
    run, --overwrite or --resume), else all refuse at once; a rank whose own command differs from rank
    0's says which keys it does not get."""
    from declora.config import DistConfig
    from declora.dist import Distributed, Solo, launched

    if not launched():
        return (*run_config(args), Solo())
    cfg, run_dir, error = None, None, None
    try:
        cfg, run_dir = run_config(args)
    except (ConfigError, FileNotFoundError) as err:
        error = str(err)
    device = cfg.device if cfg is not None else "auto"
    group = Distributed(cfg.dist if cfg is not None else DistConfig(), on_fatal=die, device=device)
    with group.guard():
        launches = group.all_gather_object((cfg, run_dir, error, _mode(args)))
    cfg, run_dir, error, _ = launches[0]
    modes = [mode for *_, mode in launches]
    if error is None and len(set(modes)) > 1:
        error = (
            "the ranks were launched in different modes ("
            + ", ".join(f"rank {k}: {mode}" for k, mode in enumerate(modes))
            + "); launch every rank with the same declora command (a resume: --resume RUN_DIR on every host)"
        )
    if error is not None:
        # Every rank refuses alike: one line per host, said by local rank 0. The others leave only once it
        # has said it (leaving first, they had torchrun stop rank 0 before it had: seen in CI); every rank
        # refuses here, so every rank reaches the barrier. os._exit as die does: the group's threads would
        # abort an ordinary exit, and a slow rank's close would let torchrun kill the others.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            say_error(ConfigError(error), 2)
            sys.stderr.flush()
        with suppress(Exception):
            group.barrier()
        logging.shutdown()
        os._exit(2)
    _say_what_differs(group.rank, launches)
    return cfg, run_dir, group


def _mode(args: argparse.Namespace) -> str:
    return "--resume" if args.resume else "--overwrite" if args.overwrite else "a new run"


def _say_what_differs(rank: int, launches: list[Any]) -> None:
    """Rank 0's config is the run's: a rank whose own command line gives other values (or does not
    parse) says so, on its own console and on rank 0's, instead of running rank 0's values silently."""
    ours = {**flatten(to_dict(launches[0][0])), "run_dir": str(launches[0][1])}
    for k, (theirs, their_dir, their_error, _) in enumerate(launches[1:], start=1):
        if their_error is not None:
            what = f"does not parse ({their_error})"
        else:
            given = {**flatten(to_dict(theirs)), "run_dir": str(their_dir)}
            keys = [key for key in given if given[key] != ours.get(key)]
            if not keys:
                continue
            what = "gives " + ", ".join(f"{key}={given[key]!r}" for key in keys[:8])
            what += f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
            what += "; it runs " + ", ".join(f"{key}={ours.get(key)!r}" for key in keys[:8])
        if rank in (0, k):
            sys.stderr.write(
                f"declora: warning: rank {k}'s own command {what}: rank 0's config is the run's\n"
            )
            sys.stderr.flush()
