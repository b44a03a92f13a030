"""A folder replaced as a whole (the exported adapters): old or new, never a mix, also across a kill."""

from __future__ import annotations

import pytest

from declora.runfolder import CRASH_ENV, CrashPoint, replace_folder, reset_crash_counts, restore_folder

pytestmark = pytest.mark.unit


def _write(version: str):
    def write(into):
        for name in ("consensus", "node_000"):
            (into / name).mkdir(parents=True)
            (into / name / "weights").write_text(version)

    return write


def _versions(path):
    return sorted((path / name / "weights").read_text() for name in ("consensus", "node_000"))


def test_the_new_folder_replaces_the_old_one_whole(tmp_path):
    folder = tmp_path / "adapters"
    replace_folder(folder, _write("v1"))
    (folder / "stale_file").write_text("from v1")
    replace_folder(folder, _write("v2"))
    assert _versions(folder) == ["v2", "v2"]
    assert not (folder / "stale_file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


@pytest.mark.parametrize("point", ["export", "export_swap"])
def test_a_kill_during_the_swap_leaves_the_previous_complete_folder(tmp_path, monkeypatch, point):
    folder = tmp_path / "adapters"
    replace_folder(folder, _write("v1"), "export")
    reset_crash_counts()
    monkeypatch.setenv(CRASH_ENV, point)
    with pytest.raises(CrashPoint):
        replace_folder(folder, _write("v2"), "export")
    monkeypatch.delenv(CRASH_ENV)
    reset_crash_counts()
    restore_folder(folder)  # what a resume does first
    assert _versions(folder) == ["v1", "v1"]


def test_a_failed_write_keeps_the_old_folder_and_removes_the_partial_one(tmp_path):
    folder = tmp_path / "adapters"
    replace_folder(folder, _write("v1"))

    def full_disk(into):
        (into / "consensus").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="previous version is kept"):
        replace_folder(folder, full_disk)
    assert _versions(folder) == ["v1", "v1"]
    assert not (tmp_path / "adapters.tmp").exists()


def test_a_tensor_file_that_cannot_be_written_is_an_oserror_and_leaves_the_old_one(tmp_path):
    # safetensors reports its I/O failures with its own exception type, which nothing catches as a
    # disk problem: declora turns it into an OSError (one line on the command line, exit 1).
    import resource
    import signal

    import torch

    from declora.runfolder import atomic_write, save_tensors

    path = tmp_path / "state.safetensors"
    save_tensors({"x": torch.ones(4)}, path)
    old = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(OSError, match=r"cannot write .*state.safetensors \(File too large"):
            atomic_write(path, lambda p: save_tensors({"x": torch.zeros(10_000)}, p))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_failed_write_in_a_read_only_folder_keeps_its_own_message(tmp_path, monkeypatch):
    # Cleaning up the temporary file fails too there (EROFS, even for a missing file): the message about
    # the file that could not be written must survive it.
    import errno
    from pathlib import Path

    from declora.runfolder import atomic_write

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError, match=r"cannot write .*report.md \(Read-only file system\)"):
        atomic_write(tmp_path / "report.md", read_only)
