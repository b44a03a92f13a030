"""Per-node files: each node trains on its own table, a process opens only its nodes' files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from declora.config import ConfigError, load_config
from declora.dist import Solo
from declora.node_data import build_node_data

pytestmark = pytest.mark.unit

LABELS = [["pos", "neg"], ["neg"], ["pos", "neg", "mid"]]  # node 1 sees one label, node 2 a third one


def _node_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, labels in enumerate(LABELS):
        rows = [{"text": f"node {i} row {k}", "label": labels[k % len(labels)]} for k in range(4 + 3 * i)]
        files.append(folder / f"client_{i}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "README.txt").write_text("not a table: .txt is skipped in a node_files folder")
    return files


def _cfg(tmp_path: Path, node_files: object, *extra: str):
    test = tmp_path / "test.csv"
    test.write_text("text,label\nheld a,pos\nheld b,mid\n")
    return load_config(
        None, ["nodes=3", f"data.node_files={json.dumps(node_files)}", f"data.test_file={test}", *extra]
    )


def test_each_node_holds_exactly_its_file(tmp_path):
    files = _node_files(tmp_path / "nodes")
    data = build_node_data(_cfg(tmp_path, str(tmp_path / "nodes")), 3, range(3), Solo())
    assert data.train.label_names == ("mid", "neg", "pos")  # the union over every node, sorted
    for i, part in enumerate(data.parts):
        assert [data.train.texts[j] for j in part] == [f"node {i} row {k}" for k in range(4 + 3 * i)]
    assert [s["size"] for s in data.summary] == [4, 7, 10]
    assert data.summary[1]["label_counts"] == [0, 7, 0] and data.summary[2]["file"] == str(files[2])
    assert data.test.texts == ["held a", "held b"] and data.test.labels.tolist() == [2, 0]


def test_a_process_opens_only_its_own_nodes_files(tmp_path):
    files = _node_files(tmp_path / "nodes")
    for f in files[:2]:
        f.unlink()  # as on a host that holds only node 2's data
    listed = [str(f) for f in files]
    data = build_node_data(_cfg(tmp_path, listed), 3, range(2, 3), Solo())
    assert len(data.parts) == 1 and [data.train.texts[j] for j in data.parts[0]][:2] == [
        "node 2 row 0",
        "node 2 row 1",
    ]
    assert np.array_equal(data.parts[0], np.arange(10))
    assert data.summary == [{"node": 2, "size": 10, "label_counts": [3, 3, 4], "file": listed[2]}]


def test_node_files_errors(tmp_path):
    _node_files(tmp_path / "nodes")
    with pytest.raises(ConfigError, match="data.node_files gives 3 files for nodes=4"):
        build_node_data(_cfg(tmp_path, str(tmp_path / "nodes"), "nodes=4"), 4, range(4), Solo())
    with pytest.raises(ConfigError, match="data.node_files needs data.test_file"):
        load_config(None, [f"data.node_files={tmp_path / 'nodes'}"])
    with pytest.raises(ConfigError, match="is neither a list of files nor a folder"):
        build_node_data(_cfg(tmp_path, str(tmp_path / "absent")), 3, range(3), Solo())


def test_instruction_node_files(tmp_path):
    """task.kind=instruction reads each node's own prompt/response or messages table."""
    folder = tmp_path / "nodes"
    folder.mkdir()
    for i in range(2):
        rows = [{"prompt": f"q{i}.{k}", "response": f"a{i}.{k}"} for k in range(2 + i)]
        (folder / f"client_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    (folder / "client_2.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "held", "response": "out"}) + "\n")
    overrides = ["nodes=3", f"data.node_files={folder}", f"data.test_file={test}"]
    data = build_node_data(
        load_config("configs/smollm2_instructions.yaml", overrides), 3, range(1, 3), Solo()
    )
    mine = [
        [(json.loads(data.train.texts[j])[-1]["content"], data.train.responses[j]) for j in p]
        for p in data.parts
    ]
    assert mine == [[("q1.0", "a1.0"), ("q1.1", "a1.1"), ("q1.2", "a1.2")], [("q2", "a2")]]
    assert [s["size"] for s in data.summary] == [3, 1] and data.test.responses == ["out"]


def test_a_folders_files_are_nodes_in_natural_order(tmp_path):
    from declora.node_data import node_file_list

    folder = tmp_path / "nodes"
    folder.mkdir()
    for i in (10, 2, 1):  # as strings node_10 would sort before node_2
        (folder / f"node_{i}.csv").write_text("text,label\na,0\n")
    (folder / "node_0.CSV.gz").write_bytes(gzip.compress(b"text,label\na,0\n"))  # any case, compressed
    test = tmp_path / "test.csv"
    test.write_text("text,label\nb,0\n")
    cfg = load_config(None, ["nodes=4", f"data.node_files={folder}", f"data.test_file={test}"])
    assert [Path(f).name for f in node_file_list(cfg)] == [
        "node_0.CSV.gz",
        "node_1.csv",
        "node_2.csv",
        "node_10.csv",
    ]


def test_a_nodes_train_limit_is_drawn_from_eval_seed_not_the_training_seed(tmp_path):
    _node_files(tmp_path / "nodes")

    def kept(*extra: str) -> list[list[str]]:
        cfg = _cfg(tmp_path, str(tmp_path / "nodes"), "data.train_limit=3", *extra)
        data = build_node_data(cfg, 3, range(3), Solo())
        return [sorted(data.train.texts[j] for j in part) for part in data.parts]

    first = kept("seed=0")
    assert [len(rows) for rows in first] == [3, 3, 3]
    assert kept("seed=1") == first  # paired training seeds train on the same rows
    assert any(a != b for a, b in zip(kept("eval.seed=1"), first, strict=True))


@pytest.mark.parametrize("task", ["seq", "instruction"])
def test_one_node_pools_the_rows_the_nodes_train_on_under_a_train_limit(tmp_path, task):
    """Centralized training is the reference of the same data: with data.train_limit its one node trains
    on the union of what the three nodes train on (9 rows), not on 3 rows of the pooled files."""
    folder = tmp_path / "nodes"
    if task == "seq":
        _node_files(folder)
        cfg = _cfg(tmp_path, str(folder), "data.train_limit=3")
    else:
        folder.mkdir()
        for i in range(3):
            rows = [{"prompt": f"q{i}.{k}", "response": f"a{i}.{k}"} for k in range(4 + 3 * i)]
            (folder / f"client_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        held = tmp_path / "test.jsonl"
        held.write_text(json.dumps({"prompt": "held", "response": "out"}) + "\n")
        overrides = [f"data.node_files={folder}", f"data.test_file={held}", "data.train_limit=3", "nodes=3"]
        cfg = load_config("configs/smollm2_instructions.yaml", overrides)

    def trained(nodes: int) -> list[str]:  # nodes=1: a single-node algorithm's run (centralized)
        data = build_node_data(cfg, nodes, range(nodes), Solo())
        answers = data.train.responses or data.train.texts
        return sorted(answers[j] for part in data.parts for j in part)

    assert len(trained(3)) == 9 and trained(1) == trained(3)


def test_a_test_file_that_is_a_nodes_training_file_is_refused(tmp_path):
    files = _node_files(tmp_path / "nodes")
    cfg = load_config(
        None, ["nodes=3", f"data.node_files={tmp_path / 'nodes'}", f"data.test_file={files[1]}"]
    )
    with pytest.raises(ConfigError) as err:
        build_node_data(cfg, 3, range(3), Solo())
    assert str(err.value).startswith(
        "the held-out examples (data.test_file / data.test_split: split 'train' of"
    )
    assert str(err.value).endswith(
        "client_1.jsonl') are training rows (data.node_files, data.split); name another split or file"
    )


def test_class_ids_in_one_node_file_and_names_in_another_are_refused(tmp_path):
    """0/1 in one file and neg in another trained three classes, neg apart from the 0 it stands for."""
    ids, names = tmp_path / "ids.jsonl", tmp_path / "names.csv"
    ids.write_text("".join(json.dumps({"text": f"t {k}", "label": k % 2}) + "\n" for k in range(6)))
    names.write_text("text,label\n" + "".join(f"w {k},neg\n" for k in range(6)))
    cfg = _cfg(tmp_path, [str(ids), str(names), str(ids)])
    with pytest.raises(
        ConfigError,
        match=r"labels are class ids \['0', '1'\] in some files \(e.g. .*ids.jsonl\) "
        r"and class names \['neg'\] in others \(e.g. .*names.csv\)",
    ):
        build_node_data(cfg, 3, range(3), Solo())


def test_a_file_given_to_two_nodes_is_warned_about(tmp_path, caplog):
    files = _node_files(tmp_path / "nodes")
    with caplog.at_level("WARNING", logger="declora.node_data"):
        build_node_data(_cfg(tmp_path, [str(files[0]), str(files[2]), str(files[0])]), 3, range(3), Solo())
    assert f"gives ['{files[0]}'] to more than one node: those nodes train" in caplog.text


def test_data_dataset_beside_node_files_is_warned_unread_and_not_an_input(tmp_path):
    from declora.ignored import ignored_settings
    from declora.inputs import input_paths

    files = _node_files(tmp_path / "nodes")
    cfg = _cfg(tmp_path, [str(f) for f in files], "data.dataset=unused.jsonl")
    assert any(
        s.startswith("data.dataset='unused.jsonl' has no effect in this run") for s in ignored_settings(cfg)
    )
    assert "data.dataset" not in input_paths(cfg)  # never read, so neither fingerprinted nor warned changed
    assert "data.dataset" in input_paths(load_config(None, ["data.dataset=unused.jsonl"]))


def test_a_single_label_over_node_files_names_the_files_not_the_unread_dataset(tmp_path):
    from declora.experiment import check_labels

    cfg = _cfg(tmp_path, ["a.jsonl", "b.jsonl", "c.jsonl"])
    with pytest.raises(
        ConfigError, match=r"^data.node_files=\('a.jsonl', 'b.jsonl', 'c.jsonl'\) has a single label"
    ):
        check_labels(cfg, ("pos",))
    with pytest.raises(ConfigError, match=r"^data.dataset='rotten_tomatoes' has a single label"):
        check_labels(load_config(None, []), ("pos",))


def test_a_score_column_is_refused_as_classes_but_ratings_and_class_ids_are_not():
    from declora.experiment import check_labels
    from declora.user_data import label_order

    cfg = load_config(None, [])
    scores = label_order([f"{x / 10:.1f}" for x in range(11)])  # 0.0 to 1.0: eleven values, not all whole
    with pytest.raises(
        ConfigError,
        match=r"^data.dataset='rotten_tomatoes' has 11 distinct labels that are "
        r"numbers, not all whole \(0.0 to 1.0\): a score to regress on",
    ):
        check_labels(cfg, scores)
    check_labels(load_config(None, ["allow_degenerate=true"]), scores)  # each value a class, as asked
    check_labels(cfg, label_order([str(x / 2) for x in range(1, 11)]))  # half-star ratings: ten classes
    check_labels(cfg, label_order([str(x) for x in range(20)]))  # twenty class ids
    check_labels(cfg, label_order([f"{x / 10:.1f} stars" for x in range(11)]))  # class names


@pytest.mark.parametrize(
    ("kind", "extra", "unused"),
    [
        ("proportions", ["partition.proportions=[[0.9,0.1],[0.9,0.1],[0.1,0.9],[0.5,0.5]]"], True),
        ("column", ["partition.column=user", "partition.max_per_node=5"], True),
        ("dirichlet", [], False),
    ],
)
def test_a_single_node_run_trains_on_the_union_of_the_nodes_rows(tmp_path, kind, extra, unused):
    """Centralized is the reference of the nodes' data: where the partition leaves rows to no node (a
    label mix that the scarce label caps; a per-node cap), it trains on the rows the nodes hold, not on
    rows no node has; elsewhere on every row, as before."""
    table = tmp_path / "train.csv"
    rows = [f"review {k},{int(k % 3 == 0)},u{k % 6}" for k in range(120)]  # a third positive, 6 users
    table.write_text("text,label,user\n" + "\n".join(rows) + "\n")
    cfg = load_config(
        None,
        ["nodes=4", f"data.dataset={table}", f"partition.kind={kind}", *extra],
    )
    nodes = build_node_data(cfg, 4, range(4), Solo())
    union = np.sort(np.concatenate(nodes.parts))
    alone = build_node_data(cfg, 1, range(1), Solo())
    assert np.array_equal(alone.train.labels, nodes.train.labels)  # the same table, the same split
    if unused:
        assert len(union) < len(nodes.train)  # the premise: some rows belong to no node
        assert np.array_equal(alone.parts[0], union)
        assert alone.summary[0]["size"] == len(union)
    else:
        assert np.array_equal(alone.parts[0], np.arange(len(nodes.train)))
