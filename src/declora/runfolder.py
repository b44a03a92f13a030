"""Run folders are never lost: atomic rewrites, the new-run check, the resume history, crash points.

A new run refuses a non-empty folder unless ``--overwrite``; and even then the folder is emptied only
after every check has passed (``run_start.start_new_run``). Every file that is rewritten (config.yaml,
metrics.jsonl on resume, report.md, checkpoints) goes through ``atomic_write``: a temporary file beside
it, then ``os.replace``, so a kill or a full disk leaves either the old file or the new one, never half
of one. Each resume appends one line to ``resumes.jsonl`` (time, round resumed from, the keys it changed).
A process writing a run folder holds a lock on ``RUN_DIR/.lock`` (``hold_run_folder``): a second run,
resume or overwrite of the same folder is refused while the first runs, instead of mixing their rounds.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from declora.config import ConfigError

RESUMES = "resumes.jsonl"
LOCK = ".lock"  # held (flock) by the process writing the folder; the file stays, the lock goes with it
# What a declora run writes at the top of its folder: --overwrite only empties a folder that holds one of
# these, never some other directory a run_dir typo points at.
RUN_MARKERS = ("config.yaml", "config.yaml.tmp", "metrics.jsonl", "state")
CRASH_ENV = "DECLORA_CRASH_AT"  # tests: "POINT" or "POINT:K" (the K-th time POINT is reached)


class CrashPoint(BaseException):  # noqa: N818  (not an error: a simulated kill, so no handler catches it)
    """Raised at an injected crash point (tests): the process stops there, files stay as they are."""


_reached: dict[str, int] = {}


def crash_point(name: str, partial: Callable[[], Any] | None = None) -> None:
    """Tests only: stop here when DECLORA_CRASH_AT names this point (``partial`` first writes half of
    what comes next: a torn write). DECLORA_CRASH_MODE=kill sends SIGKILL instead of raising; =lag
    sleeps 3 s there and goes on (a slow rank, for races between ranks)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, k = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(k or 1):
        return
    if partial is not None:
        partial()
    if os.environ.get("DECLORA_CRASH_MODE") == "lag":
        time.sleep(3.0)
        return
    if os.environ.get("DECLORA_CRASH_MODE") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise CrashPoint(f"{name}:{_reached[name]}")


def reset_crash_counts() -> None:
    _reached.clear()


def atomic_write(path: Path, write: Callable[[Path], Any], point: str = "write") -> None:
    """``write(tmp)`` then rename onto ``path``. An OSError (disk full, read-only) removes the temporary
    file and leaves ``path`` as it was; a kill may leave only the ``.tmp`` (ignored, overwritten later)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except OSError as err:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this: keep the first error
            tmp.unlink(missing_ok=True)
        raise OSError(
            err.errno, f"cannot write {path} ({err.strerror}); its previous version is kept"
        ) from err
    crash_point(point)  # the new content is complete in .tmp, the old one still in place
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the file mode every other file gets (the umask's): save_file itself
    creates its file readable by its owner only, so others who may read the run folder could not."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as err:  # safetensors' own SafetensorError for its I/O failures: an OSError like any
        if isinstance(err, OSError) or type(err).__name__ != "SafetensorError":
            raise
        code = re.search(r"os error (\d+)", str(err))
        errno_ = int(code.group(1)) if code else errno.EIO
        raise OSError(errno_, f"{os.strerror(errno_)} (safetensors: {err})") from err
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str, point: str = "write") -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), point)


def replace_folder(path: Path, write: Callable[[Path], Any], point: str = "folder") -> None:
    """``write(tmp)`` into a fresh ``PATH.tmp`` folder, then swap it in for ``path``.

    A folder cannot be renamed over a non-empty one, so the old one steps aside as ``PATH.old`` first;
    ``restore_folder`` puts it back if a kill lands between the two renames. Until the swap, ``path``
    holds the previous complete version; after it, the new one.
    """
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            err.errno, f"cannot write {path} ({err.strerror}); its previous version is kept"
        ) from err
    crash_point(point)  # the new folder is complete in .tmp, the old one still in place
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    crash_point(point + "_swap")  # the old folder set aside, the new one not yet in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def replaced_whole(path: Path) -> bool:
    """``path`` is a folder written by ``replace_folder`` to its end: in place, with no swap left half
    done (a kill inside one leaves ``PATH.tmp`` or ``PATH.old``)."""
    pending = any(path.with_name(path.name + suffix).exists() for suffix in (".tmp", ".old"))
    return path.is_dir() and not pending


def restore_folder(path: Path) -> None:
    """Undo a swap that a kill interrupted: the set-aside complete folder goes back in place."""
    old = path.with_name(path.name + ".old")
    if old.exists() and not path.exists():
        os.replace(old, path)


def _entries(run_dir: Path) -> list[Path]:
    """What is in the folder, but this launch's per-rank logs (multi-process runs open them first) and
    the lock file."""
    return [p for p in run_dir.iterdir() if not re.fullmatch(r"rank_\d+\.log", p.name) and p.name != LOCK]


class FolderInUse(ConfigError):
    """Another process holds the folder's lock."""


def _in_use(run_dir: Path) -> ConfigError:
    return FolderInUse(
        f"run folder {str(run_dir)!r} is in use by another declora process (it holds {LOCK} there): wait "
        "for it to finish or stop it; two processes writing one run folder would mix their rounds"
    )


_held: set[Path] = set()  # the run folders this process holds


class RunLock:
    """This process's hold on a run folder (``hold_run_folder``); ``close`` lets it go."""

    def __init__(self, run_dir: Path, handle: Any) -> None:
        self.run_dir, self.handle = run_dir.resolve(), handle
        _held.add(self.run_dir)

    def close(self) -> None:
        _held.discard(self.run_dir)
        self.handle.close()  # closing the file releases the flock


def hold_run_folder(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process (made if missing) until ``close`` or the end of the process,
    however it ends; a ConfigError if another process holds it."""
    try:  # the checks before found the parent writable; /proc, or a root user on some mounts, disagree here
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK, "a", encoding="utf-8")  # noqa: SIM115 (held open: it is the lock)
    except OSError as err:
        raise ConfigError(f"folder {str(run_dir)!r} cannot be made or written: {err.strerror}") from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _in_use(run_dir) from None
    return RunLock(run_dir, handle)  # the file stays empty: a run that holds it changes nothing in it


def remove_stray_temporaries(folder: Path) -> None:
    """safetensors writes a checkpoint through its own ``.tmpXXXXXX`` file: a kill in that write leaves it
    behind, as big as a checkpoint. Called while this process holds the run folder, so no other writer
    can own one."""
    for stray in folder.glob(".tmp*"):
        with contextlib.suppress(OSError):
            stray.unlink()


def in_use(run_dir: Path) -> bool:
    """Whether another process is writing ``run_dir`` (it holds the lock)."""
    path = run_dir / LOCK
    if not path.is_file() or run_dir.resolve() in _held:
        return False
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def check_not_in_use(run_dir: Path) -> None:
    """Before any work: refuse a folder another process is writing (its lock is held)."""
    if in_use(run_dir):
        raise _in_use(run_dir)


def is_run_folder(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def resume_command(run_dir: str | Path) -> str:
    """The command that continues ``run_dir``: launched as its last checkpoint was saved (a checkpoint of
    k > 1 processes resumes under torchrun with k; a checkpoint cannot be resharded)."""
    try:
        slices = json.loads((Path(run_dir) / "state" / "latest.json").read_text())["node_slices"]
    except (OSError, ValueError, KeyError, TypeError):  # no checkpoint yet: one process starts it again
        slices = []
    k = len(slices) if isinstance(slices, list) else 1
    if k > 1:
        return f"torchrun --nproc-per-node {k} -m declora run --resume {run_dir}"
    return f"declora run --resume {run_dir}"


def shard_name(round_done: int, rank: int) -> str:
    """A checkpoint shard's file stem in ``state/`` (declora.checkpoint writes it)."""
    return f"round_{round_done:06d}.rank_{rank}"


def shard_rounds(state_dir: Path, rank: int | None = None) -> set[int]:
    """The rounds of the shards in ``state_dir`` (of ``rank``'s only, if given)."""
    who = r"\d+" if rank is None else str(rank)
    pattern = re.compile(rf"round_(\d+)\.rank_{who}\.(safetensors|json)$")
    if not state_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in state_dir.iterdir() if (m := pattern.match(p.name))}


def read_checkpoint_json(path: Path) -> Any:
    """A checkpoint's JSON file; missing, truncated or corrupt ones are errors naming the file."""
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"checkpoint file {path} is corrupt or truncated ({err})") from err


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """Before any work: a new run may write ``run_dir`` (empty, or a run folder with ``overwrite``)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r} is a file, not a folder")
    if run_dir.is_dir():
        check_not_in_use(run_dir)
    if run_dir.is_dir() and _entries(run_dir):
        if not is_run_folder(run_dir):  # neither --resume nor --overwrite would take it
            raise ConfigError(
                f"run folder {str(run_dir)!r} is not empty and is not a declora run folder (no "
                f"{' / '.join(RUN_MARKERS)}): declora writes only into its own run folders; choose another "
                "run_dir"
            )
        if not overwrite:
            raise ConfigError(
                f"run folder {str(run_dir)!r} is not empty; continue it with --resume {run_dir}, "
                "replace it with --overwrite (in Python: run(..., resume=True) or overwrite=True), or choose "
                "another run_dir"
            )
    check_writable(run_dir)


def check_writable(run_dir: Path) -> None:
    """The folder (or the nearest existing parent it would be made in) must be writable."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run folder {str(run_dir)!r}: {str(existing)!r} is not writable")


def empty_run_folder(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """--overwrite, after every check passed: remove what an earlier run left (but the entries ``keep``)."""
    if not run_dir.is_dir():
        return
    for entry in _entries(run_dir):
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def record_resume(run_dir: Path, round_done: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """One line of resumes.jsonl: when, from which round, and every key the resume changed (old, new)."""
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "from_round": round_done,
        "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()},
    }
    path = run_dir / RESUMES
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(entry) + "\n", "resumes")


def start_record(run_dir: Path) -> dict[str, Any]:
    """The run's start record (the first metrics line); empty when missing or unreadable."""
    try:
        with (Path(run_dir) / "metrics.jsonl").open(encoding="utf-8") as f:
            record = json.loads(f.readline())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("event") == "start" else {}


def read_resumes(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / RESUMES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _round_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's round and eval records; unreadable lines are skipped (the resume names them)."""
    records = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") in ("round", "eval"):
                    records.append(record)
    return records


def logged_rounds(run_dir: Path) -> int:
    """The last round metrics.jsonl logs (0: none)."""
    return max((int(r.get("round", 0)) for r in _round_records(run_dir)), default=0)


def check_log_covers(run_dir: Path, round_done: int | None) -> None:
    """A checkpoint at round R needs metrics.jsonl's start record and one record for each of rounds 1..R:
    a resume appends to that log, so a log cut short or replaced (an editor, a copy of another file) would
    end as a run with no start, or with rounds missing, that reads as whole."""
    if not round_done:  # no checkpoint: the run starts again from round 0 and writes a new log
        return
    path = run_dir / "metrics.jsonl"
    if not start_record(run_dir):
        raise ConfigError(
            f"{path} has no start record (its first line) but the checkpoint is at round {round_done}: the "
            "log was emptied, cut or replaced; restore it, or start the run again with --overwrite"
        )
    logged = {r["round"] for r in _round_records(run_dir) if isinstance(r.get("round"), int)}
    missing = [k for k in range(1, round_done + 1) if k not in logged]
    if missing:
        shown = f"round {missing[0]}" if len(missing) == 1 else f"{len(missing)} rounds from {missing[0]}"
        raise ConfigError(
            f"{path} lacks {shown} of the {round_done} its checkpoint has done: the log was cut or "
            "replaced, and the resumed run would read as whole with them missing; restore it, or start the "
            "run again with --overwrite"
        )


def check_last_round_evaluated(run_dir: Path, rounds_done: int | None, rounds: int) -> None:
    """A resume whose ``rounds`` is the checkpoint's round runs nothing: that round must have been
    evaluated, or the run would end with a report and adapter cards that score an earlier model."""
    if rounds_done is None or rounds != rounds_done:
        return
    if not any(r["event"] == "eval" and r.get("round") == rounds for r in _round_records(run_dir)):
        raise ConfigError(
            f"rounds={rounds} would end the run at its checkpoint's round {rounds}, which was not evaluated: "
            f"the report and the adapters would score an earlier round; ask for rounds={rounds + 1} or more"
        )


def check_checkpoint_kept(
    run_dir: Path, checkpoint_every: int, rounds: int, afresh: str = "start the run afresh with --overwrite"
) -> None:
    """A resume without ``state/latest.json`` starts again from round 0. That is right for a run stopped
    before its first checkpoint, and wrong for one whose checkpoint is gone: it would throw away the rounds
    done. A checkpoint was complete if a round after a checkpoint round was logged (the next round starts
    only once the checkpoint is written), the run finished (its report is written after the last
    checkpoint), an earlier resume went on from one, or a shard is older than the last logged round. A
    shard of the last logged round proves nothing: a kill inside the first checkpoint leaves one."""
    if (run_dir / "state" / "latest.json").is_file():
        return
    logged = logged_rounds(run_dir)
    finished = logged >= rounds and (run_dir / "report.md").is_file()
    resumed = any(r.get("from_round", 0) > 0 for r in read_resumes(run_dir) if isinstance(r, dict))
    if (
        logged > checkpoint_every
        or any(k < logged for k in shard_rounds(run_dir / "state"))
        or finished
        or resumed
    ):
        raise ConfigError(
            f"{run_dir / 'state' / 'latest.json'} is missing, but the run logged {logged} rounds and saved "
            f"a checkpoint: resuming would start it again from round 0; restore the folder's state/ from a "
            f"copy, or {afresh}"
        )
