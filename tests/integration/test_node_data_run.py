"""Natural partitions end to end: ``partition.kind=column`` and ``data.node_files`` through the CLI."""

from __future__ import annotations

import json

import pytest
from helpers import WORDS

from declora.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


def _rows(n: int, tag: str, users: int = 6) -> list[dict]:
    return [
        {
            "text": " ".join(WORDS[(i * k) % 10] for k in range(1, 5)) + f" {tag}",
            "label": i % 2,
            "user": f"u{i % users}",
        }
        for i in range(n)
    ]


def _run(tiny_bert, run_dir, *extra) -> list[dict]:
    base = [f"model.name={tiny_bert}", "model.rank=2", "model.max_length=16", "nodes=3", "rounds=1"]
    base += ["train.batch_size=4", "train.local_steps=1", "eval.node_examples=8", "export=none", "threads=1"]
    assert main(["run", *base, f"run_dir={run_dir}", *extra]) == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_column_partition_gives_each_node_whole_users(tiny_bert, tmp_path):
    data = tmp_path / "reviews.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows(60, "x")), data)
    records = _run(
        tiny_bert, tmp_path / "run", f"data.dataset={data}", "partition.kind=column", "partition.column=user"
    )
    nodes = next(r for r in records if r["event"] == "partition")["nodes"]
    assert [n["clients"] for n in nodes] == [2, 2, 2]  # 6 users merged onto 3 nodes, none split
    assert sum(n["size"] for n in nodes) == 48  # 60 rows less the 20 % held out
    assert any(r["event"] == "eval" for r in records)


def test_node_files_folder_trains_each_node_on_its_file(tiny_bert, tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    for i, n in enumerate([8, 12, 16]):
        (folder / f"node_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, f"n{i}")))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in _rows(10, "t")))
    records = _run(tiny_bert, tmp_path / "run", f"data.node_files={folder}", f"data.test_file={test}")
    nodes = next(r for r in records if r["event"] == "partition")["nodes"]
    assert [n["size"] for n in nodes] == [8, 12, 16]
    assert [n["file"] for n in nodes] == [str(folder / f"node_{i}.jsonl") for i in range(3)]
