"""A user's table read through HF datasets: every file kind gives the same examples; splits and errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from declora.config import ConfigError, DataConfig
from declora.data import load_dataset

pytestmark = pytest.mark.unit

ROWS = [
    {"review": f"text number {i}", "stars": ["neg", "pos", "mid"][i % 3], "user": f"u{i % 4}"}
    for i in range(30)
]


def _write(kind: str, folder: Path, rows=ROWS) -> Path:
    import datasets
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    path = folder / f"data.{kind}"
    if kind in ("csv", "tsv"):
        with path.open("w", encoding="utf-8-sig", newline="") as f:  # a byte-order mark, as Excel writes
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif kind == "arrow":  # the Arrow IPC stream format datasets itself writes
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "arrow_file":  # the Arrow IPC file format (Feather v2) pyarrow and pandas write
        import pyarrow.feather as feather

        path = folder / "data.arrow"
        feather.write_feather(table, str(path))
    elif kind == "saved":
        path = folder / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


KINDS = ["csv", "tsv", "json", "jsonl", "parquet", "arrow", "arrow_file", "saved"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_kind_gives_the_same_examples(tmp_path, kind):
    cfg = DataConfig(dataset=str(_write(kind, tmp_path)), text_column="review", label_column="stars")
    train, test = load_dataset(cfg, seed=0)
    assert train.label_names == ("mid", "neg", "pos")  # sorted label values
    assert len(train) + len(test) == 30 and len(test) == 6  # stratified 20 %: 2 per label
    reference = {f"text number {i}": ["neg", "pos", "mid"][i % 3] for i in range(30)}
    for ds in (train, test):
        assert {
            t: ds.label_names[y] for t, y in zip(ds.texts, ds.labels, strict=True)
        }.items() <= reference.items()
    again, _ = load_dataset(cfg, seed=0)
    assert again.texts == train.texts


def test_byte_order_mark_does_not_rename_the_first_column(tmp_path):
    path = _write("csv", tmp_path)
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    cfg = DataConfig(dataset=str(path), text_column="review", label_column="stars")
    assert load_dataset(cfg, seed=0)[0].texts[0].startswith("text number")


def test_named_splits_and_class_label_names_of_a_saved_dataset_dict(tmp_path):
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])}
    )
    make = lambda n, tag: datasets.Dataset.from_dict(  # noqa: E731
        {"text": [f"{tag} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features
    )
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": make(20, "tr"), "validation": make(6, "va"), "test": make(4, "te")}
    ).save_to_disk(str(folder))
    train, test = load_dataset(DataConfig(dataset=str(folder)), seed=0)
    assert train.label_names == ("no", "yes")  # from the ClassLabel, not from the values
    assert len(train) == 20 and test.texts == [f"te {i}" for i in range(4)]  # the source's own test split
    _, val = load_dataset(DataConfig(dataset=str(folder), test_split="validation"), seed=0)
    assert val.texts == [f"va {i}" for i in range(6)] and val.labels.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(
        ConfigError, match=r"data.split='dev' is not a split .* \['test', 'train', 'validation'\]"
    ):
        load_dataset(DataConfig(dataset=str(folder), split="dev"), seed=0)


def test_test_file_of_another_kind(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train_path = _write("parquet", tmp_path / "a")
    test_path = _write("jsonl", tmp_path / "b", ROWS[:5])
    cfg = DataConfig(
        dataset=str(train_path), test_file=str(test_path), text_column="review", label_column="stars"
    )
    train, test = load_dataset(cfg, seed=0)
    assert len(train) == 30 and test.texts == [r["review"] for r in ROWS[:5]]
    assert [test.label_names[y] for y in test.labels] == [r["stars"] for r in ROWS[:5]]


def test_clear_errors(tmp_path):
    path = _write("parquet", tmp_path)
    with pytest.raises(
        ConfigError, match=r"data.text_column='text' is not a column .* found \['review', 'stars', 'user'\]"
    ):
        load_dataset(DataConfig(dataset=str(path), label_column="stars"), seed=0)
    with pytest.raises(ConfigError, match="data.dataset='nope.xlsx' is neither"):
        load_dataset(DataConfig(dataset="nope.xlsx"), seed=0)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="is neither"):
        load_dataset(DataConfig(dataset=str(tmp_path / "plain")), seed=0)
    gaps = [dict(r) for r in ROWS]
    gaps[3]["review"] = None
    (tmp_path / "g").mkdir()
    with pytest.raises(ValueError, match=r"\.jsonl:4: no value in column 'review'"):  # row 3 is line 4
        load_dataset(
            DataConfig(
                dataset=str(_write("jsonl", tmp_path / "g", gaps)), text_column="review", label_column="stars"
            ),
            seed=0,
        )


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_words_pandas_calls_missing_are_text_and_an_empty_cell_is_missing(tmp_path, kind):
    words = ["None", "NA", "null", "nan", "N/A"]
    rows = [dict(r) for r in ROWS]
    for i, word in enumerate(words):
        rows[i]["review"] = word
    rows[5]["stars"] = "NA"  # a label named NA is a class, not a gap
    cfg = DataConfig(dataset=str(_write(kind, tmp_path, rows)), text_column="review", label_column="stars")
    train, test = load_dataset(cfg, seed=0)
    assert set(words) <= set(train.texts) | set(test.texts)
    assert "NA" in train.label_names
    rows[7]["review"] = ""
    (tmp_path / "gap").mkdir()
    gapped = _write(kind, tmp_path / "gap", rows)
    gap = DataConfig(dataset=str(gapped), text_column="review", label_column="stars")
    with pytest.raises(ValueError, match=rf"\.{kind}:9: no value in column 'review'"):
        load_dataset(gap, seed=0)


@pytest.mark.parametrize(
    ("stars", "odd", "kind"),
    [(["0", "1"], "nan", "a word among class ids"), (["neg", "pos"], "3", "an id among class names")],
)
def test_a_label_column_mixing_ids_and_words_is_refused_at_its_line(tmp_path, stars, odd, kind):
    rows = [dict(r, stars=stars[i % 2]) for i, r in enumerate(ROWS)]
    rows[11]["stars"] = odd
    cfg = DataConfig(dataset=str(_write("csv", tmp_path, rows)), text_column="review", label_column="stars")
    with pytest.raises(ValueError, match=rf"data\.csv:13: label '{odd}' in column 'stars' .* is {kind}"):
        load_dataset(cfg, seed=0)


def test_client_column_is_read_as_indices(tmp_path):
    cfg = DataConfig(dataset=str(_write("csv", tmp_path)), text_column="review", label_column="stars")
    train, test = load_dataset(cfg, seed=0, client_column="user")
    index = {int(t.split()[-1]): c for t, c in zip(train.texts, train.clients, strict=True)}
    assert all(index[i] == i % 4 for i in index)  # "u0".."u3" -> 0..3
    assert isinstance(train.clients, np.ndarray)


def test_a_missing_relative_data_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(dataset="configs/data/none.jsonl")
    with pytest.raises(
        FileNotFoundError, match=rf"does not exist \(relative to the current directory {tmp_path}\)"
    ):
        load_dataset(cfg, seed=0)


def test_a_missing_held_out_file_is_named_by_its_key(tmp_path):
    train_file = _write("jsonl", tmp_path, [{"text": f"t {i}", "label": i % 2} for i in range(12)])
    cfg = DataConfig(dataset=str(train_file), test_file=str(tmp_path / "none.csv"))
    with pytest.raises(FileNotFoundError, match=r"^data.test_file='.*none.csv' does not exist$"):
        load_dataset(cfg, seed=0)


def test_a_validation_split_left_unused_is_warned_about(tmp_path, caplog):
    folder = _dataset_dict(tmp_path / "dd", train=10, validation=4)
    _, test = load_dataset(DataConfig(dataset=str(folder)), seed=0)
    assert len(test) == 2  # the rule: a seeded 0.2 of the training rows
    assert "has a 'validation' split but no 'test' one" in caplog.text
    assert "data.test_split=validation scores that split" in caplog.text
    caplog.clear()
    _, test = load_dataset(DataConfig(dataset=str(folder), test_split="validation"), seed=0)
    assert len(test) == 4 and "validation" not in caplog.text


def _dataset_dict(folder: Path, **splits: int) -> Path:
    import datasets

    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [f"{name} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
                features=datasets.Features(
                    {"text": datasets.Value("string"), "label": datasets.Value("int64")}
                ),
            )
            for name, n in splits.items()
        }
    ).save_to_disk(str(folder))
    return folder


def test_a_test_file_that_is_a_dataset_dict_holds_out_its_test_split(tmp_path):
    train_file = _write("jsonl", tmp_path, [{"text": f"t {i}", "label": i % 2} for i in range(12)])
    held = _dataset_dict(tmp_path / "dd", train=10, test=4)
    _, test = load_dataset(DataConfig(dataset=str(train_file), test_file=str(held)), seed=0)
    assert test.texts == [f"test {i}" for i in range(4)]  # as data.dataset=FOLDER holds out, not its train
    _, val = load_dataset(
        DataConfig(dataset=str(train_file), test_file=str(held), test_split="train"), seed=0
    )
    assert len(val) == 10  # a split named is taken as named


@pytest.mark.parametrize(
    "held",
    [
        {"test_split": "train"},  # the training split of the same folder
        {"test_file": "SAME"},  # the training file itself
        {"test_file": "SAME_RELATIVE", "test_split": "train"},  # the same file by another path
    ],
    ids=["test_split", "test_file", "test_file_relative"],
)
def test_held_out_rows_that_are_the_training_rows_are_refused(tmp_path, monkeypatch, held):
    monkeypatch.chdir(tmp_path)
    folder = _dataset_dict(tmp_path / "dd", train=10, validation=4)
    same = {"SAME": str(folder), "SAME_RELATIVE": "./dd/../dd"}
    cfg = DataConfig(dataset=str(folder), **{k: same.get(v, v) for k, v in held.items()})
    with pytest.raises(ConfigError, match=r"the held-out examples .* split 'train' of .* are training rows"):
        load_dataset(cfg, seed=0)
    _, test = load_dataset(DataConfig(dataset=str(folder), test_split="validation"), seed=0)
    assert len(test) == 4


def test_a_saved_split_without_rows_is_one_clear_error(tmp_path):
    folder = _dataset_dict(tmp_path / "dd", train=10, validation=0)  # even a split the run does not use
    with pytest.raises(
        ValueError, match=r"split 'validation' of .*dd' holds no rows, and datasets cannot load"
    ):
        load_dataset(DataConfig(dataset=str(folder)), seed=0)


def test_a_cell_holding_a_list_is_refused_naming_the_column(tmp_path):
    words = [{"text": ["good", "film"], "label": 1}, {"text": ["bad"], "label": 0}] * 5
    path = _write("parquet", tmp_path, words)
    with pytest.raises(ValueError, match=r"row 0 of .*: a list \['good', 'film'\], not one value .*'text'"):
        load_dataset(DataConfig(dataset=str(path)), seed=0)
    columns = tmp_path / "columns.json"  # a JSON object of columns (DataFrame.to_json's default) is one row
    columns.write_text(
        json.dumps({"text": [f"t {i}" for i in range(10)], "label": [i % 2 for i in range(10)]})
    )
    with pytest.raises(ValueError, match=r"columns.json:1: a list \['t 0', .*\.\.\., not one value"):
        load_dataset(DataConfig(dataset=str(columns)), seed=0)


def test_float_labels_of_whole_numbers_are_integers_in_numeric_order(tmp_path):
    rows = [{"text": f"t {i}", "label": float([1, 2, 10][i % 3])} for i in range(12)]
    train, _ = load_dataset(DataConfig(dataset=str(_write("parquet", tmp_path, rows)), test_fraction=0.25), 0)
    assert train.label_names == ("1", "2", "10")
    halves = [{"text": f"t {i}", "label": [0.5, 1.5, 10.0][i % 3]} for i in range(12)]
    (tmp_path / "h").mkdir()
    train, _ = load_dataset(
        DataConfig(dataset=str(_write("parquet", tmp_path / "h", halves)), test_fraction=0.25), 0
    )
    assert train.label_names == ("0.5", "1.5", "10.0")  # not all whole: as written, in numeric order


def test_a_parquet_file_without_rows_says_so(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), path)
    with pytest.raises(ValueError, match=r"empty.parquet' holds no rows$"):
        load_dataset(DataConfig(dataset=str(path)), seed=0)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake.parquet' cannot be read: "):
        load_dataset(DataConfig(dataset=str(tmp_path / "fake.parquet")), seed=0)


def test_a_cache_datasets_cannot_write_is_named_not_the_data_file(tmp_path, monkeypatch):
    # A read-only HOME (or HF_HOME) stops datasets while it caches a good CSV: the message must send the
    # user to the cache, not to the file.
    import datasets

    from declora.tables import splits_of

    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood film,1\nbad film,0\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", blocker / "cache")  # a folder under a file
    with pytest.raises(OSError, match=r"datasets cannot write its cache .*HF_DATASETS_CACHE \(or HF_HOME\)"):
        splits_of(data)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".GZ"])
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_compressed_text_table_gives_the_examples_of_the_plain_one(tmp_path, kind, suffix):
    import bz2
    import gzip
    import lzma

    plain = _write(kind, tmp_path)
    packed = plain.with_name(plain.name + suffix)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix.lower()]
    with opener(packed, "wb") as f:
        f.write(plain.read_bytes())
    read = [
        load_dataset(DataConfig(dataset=str(p), text_column="review", label_column="stars"), seed=0)
        for p in (plain, packed)
    ]
    assert read[0][0].texts == read[1][0].texts and read[0][1].texts == read[1][1].texts
    assert read[1][0].label_names == ("mid", "neg", "pos")


def test_a_compressed_table_keeps_its_line_exact_errors(tmp_path):
    import gzip

    gaps = [dict(r) for r in ROWS]
    gaps[3]["review"] = None
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in gaps))
    cfg = DataConfig(dataset=str(path), text_column="review", label_column="stars")
    with pytest.raises(ValueError, match=r"data\.jsonl\.gz:4: no value in column 'review'"):
        load_dataset(cfg, seed=0)
    with gzip.open(path, "wt") as f:
        f.write('{"review": "a", "stars": "neg"}\n{"review": oops}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl\.gz:2: not a JSON line"):
        load_dataset(cfg, seed=0)


def test_a_damaged_archive_and_a_compressed_parquet_file_are_refused_by_name(tmp_path):
    damaged = tmp_path / "rows.csv.gz"
    damaged.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"data file '.*rows.csv.gz' is not a readable .gz archive"):
        load_dataset(DataConfig(dataset=str(damaged)), seed=0)
    packed = tmp_path / "rows.parquet.gz"
    packed.write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"a .parquet file is read uncompressed .* may come as .gz / .bz2 / .xz"
    ):
        load_dataset(DataConfig(dataset=str(packed)), seed=0)
