"""A corpus of malformed inputs, through the real CLI in-process (``declora.cli.main``).

Every case must end in exit code 2 with ONE line on stderr that names the culprit (key, file, line or
value), and must leave every run folder exactly as it was (hashed before and after). Config, data, model
and adapter cases run into a fresh ``run_dir`` that must not even be created; checkpoint and resume cases
corrupt a copy of a finished tiny run, which must not change.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import folder_digest, write_tiny_data
from safetensors.torch import load_file, save_file

from declora.cli import main

pytestmark = pytest.mark.integration


@dataclass
class Ctx:
    root: Path
    bert: Path
    data: Path
    done: Path  # a finished 2-round run (its adapters seed the adapter cases)
    target: Path  # the run folder this case must leave untouched (or not create)

    def tiny(self) -> list[str]:
        return [
            f"model.name={self.bert}",
            "model.rank=4",
            "model.max_length=32",
            "nodes=2",
            "rounds=2",
            f"data.dataset={self.data}",
            "data.test_fraction=0.25",
            "partition.min_size=4",
            "train.batch_size=4",
            "train.local_steps=1",
            "eval.every=1",
            "eval.node_examples=8",
            "checkpoint_every=1",
            "threads=1",
        ]

    def new_run(self, *extra: str) -> list[str]:
        self.target = self.root / "new_run"
        return ["run", *self.tiny(), *extra, f"run_dir={self.target}"]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def copy_done(self) -> Path:
        self.target = self.root / "resumed"
        shutil.copytree(self.done, self.target)
        return self.target

    def adapter(self, edit: Callable[[dict, dict], None] | None = None) -> Path:
        """A copy of the finished run's consensus adapter, its (config, tensors) edited."""
        folder = self.root / "adapter"
        shutil.copytree(self.done / "adapters" / "consensus", folder)
        if edit is not None:
            config = json.loads((folder / "adapter_config.json").read_text())
            tensors = load_file(str(folder / "adapter_model.safetensors"))
            edit(config, tensors)
            (folder / "adapter_config.json").write_text(json.dumps(config))
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    def model(self, edit: Callable[[Path], None]) -> Path:
        folder = self.root / "model"
        shutil.copytree(self.bert, folder)
        edit(folder)
        return folder


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


SHARD = "round_000002.rank_0"  # the last checkpoint of the finished run the resume cases edit


def _last_shard(run: Path, suffix: str) -> Path:
    return sorted((run / "state").glob(f"round_*.rank_0.{suffix}"))[-1]


def _jsonl(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


UNKNOWN_LABEL = '{"text": "a", "label": 7}'
GOOD = ['{"text": "good fine", "label": 0}', '{"text": "bad dull", "label": 1}'] * 6

# ---------------------------------------------------------------- the corpus: (id, argv builder, culprit)
Case = tuple[str, Callable[[Ctx], list[str]], str]

CONFIG_VALUES: list[tuple[str, str]] = [
    ("train.lr=0", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=5", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.head_lr=0", "train.head_lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.weight_decay=2", "train.weight_decay"),
    ("train.betas=[0.9,1.0]", "train.betas"),
    ("train.betas=[-0.1,0.9]", "train.betas"),
    ("train.betas=[0.9]", "train.betas"),
    ("train.eps=0", "train.eps"),
    ("train.eps=-1e-8", "train.eps"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ("train.tokens_per_chunk=0", "train.tokens_per_chunk"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.local_unit=minutes", "train.local_unit"),
    ("model.alpha=0", "model.alpha"),
    ("model.alpha=-1", "model.alpha"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"),
    ("model.rank=0", "model.rank"),
    ("model.rank=abc", "model.rank"),
    ("model.rank=1000", "model.rank"),
    ("model.max_length=4096", "model.max_length"),
    ("model.target_modules=[nope]", "model.target_modules"),
    ("model.rslora=maybe", "model.rslora"),
    ("model.init_seed=-5", "model.init_seed"),
    ("model.head=none", "model.head"),
    ("eval.node_examples=0", "eval.node_examples"),
    ("eval.consensus_examples=0", "eval.consensus_examples"),
    ("eval.batch_size=64", "eval.batch_size"),  # not a key: the evaluation chunks by train.tokens_per_chunk
    ("eval.every=-1", "eval.every"),
    ("eval.headline=ppl_avg_factors", "eval.headline"),
    ("threads=0", "threads"),
    ("threads=-2", "threads"),
    ("nodes=0", "nodes"),
    ("nodes=10000000", "nodes"),  # its dense W would take petabytes
    ("nodes=2.5", "nodes"),
    ("rounds=-1", "rounds"),
    ("rounds=99999999999999999999", "rounds"),  # a typo would run for days: counts of work have a cap
    ("train.local_steps=1000000000000", "train.local_steps"),
    ("train.local_unit=epochs train.local_steps=100000", "train.local_steps"),
    ("privacy.level=node privacy.target_epsilon=1e300", "privacy.target_epsilon"),  # opacus' search hung
    ("privacy.level=node privacy.noise_multiplier=1e300", "privacy.noise_multiplier"),
    ("checkpoint_every=0", "checkpoint_every"),
    ("seed=-1", "seed"),
    ("topology.p=0", "topology.p"),
    ("topology.p=1.5", "topology.p"),
    ("topology.rewire=2", "topology.rewire"),
    ("topology.link_failure=1.0", "topology.link_failure"),
    ("topology.node_dropout=1", "topology.node_dropout"),
    ("topology.encounter_prob=0", "topology.encounter_prob"),
    ("topology.period=0", "topology.period"),
    ("topology.graph=moebius", "moebius"),
    ("topology.weights=foo", "foo"),
    ("topology.schedule=sometimes", "sometimes"),
    ("comm.bits=1", "comm.bits"),
    ("comm.bits=16", "comm.bits"),
    ("comm.fraction=0", "comm.fraction"),
    ("comm.fraction=1.5", "comm.fraction"),
    ("comm.block_size=0", "comm.block_size"),
    ("comm.codec=zip", "comm.codec='zip'"),
    ("log.trackers=[tensorboard,tensorboard]", "'tensorboard' twice"),
    ("data.test_fraction=0", "data.test_fraction"),
    ("data.test_fraction=1", "data.test_fraction"),
    ("data.train_limit=0", "data.train_limit"),
    ("data.dataset=notes.xyz", "notes.xyz"),
    ("partition.alpha=0", "partition.alpha"),
    ("partition.shards_per_node=0", "partition.shards_per_node"),
    ("partition.min_size=-1", "partition.min_size"),
    ("partition.kind=zipf", "zipf"),
    ("algorithm.name=nope", "nope"),
    ("algorithm.auto_c=0", "algorithm.auto_c"),
    ("algorithm.server_lr=0", "algorithm.server_lr"),
    ("algorithm.server_weight_decay=-1", "algorithm.server_weight_decay"),
    ("algorithm.switch_interval=0", "algorithm.switch_interval"),
    ("algorithm.clients_per_round=0", "algorithm.clients_per_round"),
    ("dist.timeout_s=0", "dist.timeout_s"),
    ("dist.node_slices=[1,5]", "dist.node_slices"),
    ("dist.backend=mpi", "dist.backend"),
    ("export=some", "export"),
    ("eval.headline=acc_server", "has no server model"),  # dec_lora: no server, the metric is never logged
    ("server.optimizer=adam", "server.optimizer"),  # dec_lora has no server: the setting would be ignored
    ("privacy.target_epsilon=8", "privacy.level=none"),
    (
        "task.kind=instruction data.text_column=review",
        "data.text_column",
    ),  # prompts and responses are read  # a budget with DP off would be silently dropped
    ("foo=1", "foo"),
    ("train.lrr=0.1", "train.lrr"),
    ("topology.graph=regular", "degree"),  # degree 4 with 2 nodes: the graph check, before data/model
    ("train.betas=[0.9,", "train.betas"),  # not YAML
]


def _value_case(override: str, culprit: str) -> Case:
    return (f"config:{override}", lambda c: c.new_run(override), culprit)


CASES: list[Case] = [_value_case(o, k) for o, k in CONFIG_VALUES]
CASES.append(  # instruction data reads prompts and responses: a text column would be ignored
    (
        "config:instruction-text-column",
        lambda c: c.new_run("task.kind=instruction", "model.head=none", "data.text_column=review"),
        "data.text_column='review' has no effect with task.kind=instruction",
    )
)
CASES.append(  # refused before the model loads, not by the algorithm's constructor after it
    (
        "config:auto-interval-not-tad",
        lambda c: c.new_run("algorithm.name=adf_lora", "algorithm.switch_interval=auto"),
        "algorithm.switch_interval='auto' is TAD-LoRA's rule",
    )
)
CASES += [  # a table's settings beside a shipped corpus would be ignored
    (f"config:shipped-{key}", lambda c, o=o: c.new_run("data.dataset=rotten_tomatoes", o), key)
    for key, o in (
        ("data.test_file", "data.test_file=dev.csv"),
        ("data.label_column", "data.label_column=stars"),
        ("data.split", "data.split=validation"),
    )
]
CASES += [
    ("config:no-equals", lambda c: c.new_run("nodes"), "nodes"),
    ("config:empty-key", lambda c: c.new_run("=5"), "=5"),
    (
        "config:duplicate-key",  # YAML itself would keep the last value silently
        lambda c: ["run", str(c.file("dup.yaml", "rounds: 3\nnodes: 2\nrounds: 1\n")), *c.new_run()[1:]],
        "key 'rounds' is given twice (lines 1 and 3)",
    ),
    (
        "config:empty-file",  # would run the built-in defaults, not the default experiment
        lambda c: ["run", str(c.file("empty.yaml", "# nothing yet\n")), *c.new_run()[1:]],
        "holds no settings",
    ),
    (
        "config:yaml-syntax",
        lambda c: ["run", str(c.file("bad.yaml", "nodes: 4\nmodel: [a\n")), *c.new_run()[1:]],
        "bad.yaml",
    ),
    (
        "config:yaml-list",
        lambda c: ["run", str(c.file("list.yaml", "- 1\n- 2\n")), *c.new_run()[1:]],
        "list.yaml",
    ),
    ("config:missing-file", lambda c: ["run", str(c.root / "nope.yaml"), *c.new_run()[1:]], "nope.yaml"),
    (
        "config:not-utf8",
        lambda c: ["run", str(c.file("enc.yaml", b"nodes: \xff\n")), *c.new_run()[1:]],
        "enc.yaml",
    ),
    ("config:section-not-mapping", lambda c: c.new_run("model=3"), "model: expected a mapping"),
    (  # a prompt template's braces, unquoted: YAML syntax, or a mapping where a string belongs
        "config:unquoted-braces",
        lambda c: c.new_run("task.template={text} {label}"),
        """quote it, as in 'task.template="{text} {label}"'""",
    ),
    ("config:braces-a-mapping", lambda c: c.new_run("task.template={text}"), "mapping: quote the string"),
]

DATA: list[tuple[str, str | bytes, str]] = [  # (file name, content, what the message must hold)
    ("broken.jsonl", _jsonl(*GOOD[:2], '{"text": "x", "label":', *GOOD), "broken.jsonl:3"),
    ("list-line.jsonl", _jsonl(*GOOD[:3], "[1, 2]", *GOOD), "list-line.jsonl:4"),
    ("no-label.jsonl", _jsonl(*GOOD[:3], '{"text": "meh"}', *GOOD), "no-label.jsonl:4"),
    ("empty-label.jsonl", _jsonl(*GOOD[:1], '{"text": "meh", "label": ""}', *GOOD), "empty-label.jsonl:2"),
    ("nan-label.jsonl", _jsonl(*GOOD[:4], '{"text": "meh", "label": NaN}', *GOOD), "nan-label.jsonl:5"),
    ("null-text.jsonl", _jsonl(*GOOD[:2], '{"text": null, "label": 1}', *GOOD), "null-text.jsonl:3"),
    ("latin1.jsonl", _jsonl(*GOOD[:5]).encode() + b'{"text": "caf\xe9", "label": 1}\n', "latin1.jsonl:6"),
    ("empty.jsonl", "", "empty.jsonl"),
    ("one-label.jsonl", _jsonl(*GOOD[::2] * 3), "single label"),
    (  # a similarity score from 0 to 1.1, not classes: twelve classes of a silently wrong classifier
        "score-label.csv",
        "text,label\n" + "".join(f"pair {i},{i % 12 / 10}\n" for i in range(60)),
        "12 distinct labels that are numbers, not all whole",
    ),
    ("nan.csv", "text,label\n" + "good,0\nbad,1\n" * 5 + "meh,nan\n", "nan.csv:12"),
    ("latin1.csv", b"text,label\ngood,0\nbad,1\ncaf\xe9,1\n", "latin1.csv:4"),
    ("no-column.csv", "text,target\n" + "good,0\nbad,1\n" * 5, "data.label_column='label' is not a column"),
    ("extra-cells.csv", "text,label\ngood,0\nbad,1,oops\n", "extra-cells.csv:3"),
    ("header-only.csv", "text,label\n", "has a header and no rows"),
    ("twice.csv", "text,text,label\n" + "good,fine,0\nbad,dull,1\n" * 5, "twice.csv:1"),
    ("paragraphs.txt", "a first paragraph\n\nand a second\n", "task.kind=causal_lm"),  # a classifier
    ("empty-cell.csv", "text,label\ngood,0\n,1\n", "empty-cell.csv:3"),
    ("huge.csv", "text,label\n" + "good,0\nbad,1\n" * 3 + "x" * 200_000 + ",1\n", "huge.csv"),
    ("broken.json", '[{"text": "a", "label": 0},\n{"text": ', "broken.json:2"),
    ("huge.jsonl", _jsonl(*GOOD[:3], json.dumps({"text": "x" * 200_000, "label": 1}), *GOOD), "huge.jsonl:4"),
]
CASES += [
    (f"data:{name}", lambda c, n=name, t=text: c.new_run(f"data.dataset={c.file(n, t)}"), want)
    for name, text, want in DATA
]
CASES += [
    ("data:missing-file", lambda c: c.new_run(f"data.dataset={c.root / 'gone.jsonl'}"), "gone.jsonl"),
    (
        "data:test-file-unknown-label",
        lambda c: c.new_run(  # with test_fraction back at its default: a test file holds the held-out rows
            "data.test_fraction=0.2", f"data.test_file={c.file('test.jsonl', _jsonl(UNKNOWN_LABEL))}"
        ),
        "test.jsonl",
    ),
]


def _drop(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


MODELS: list[tuple[str, Callable[[Path], None], str]] = [
    ("no-config", _drop("config.json"), "config.json"),
    ("corrupt-config", lambda f: (f / "config.json").write_text("{not json"), "config.json"),
    ("config-not-object", lambda f: (f / "config.json").write_text("[1]"), "config.json"),
    ("no-weights", _drop("model.safetensors"), "no weights"),
    (
        "pickle-only",
        lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"\x80\x04")),
        "pytorch_model.bin",
    ),
    ("truncated-weights", lambda f: _truncate(f / "model.safetensors"), "model.safetensors"),
    ("garbage-weights", lambda f: (f / "model.safetensors").write_bytes(b"\x05" * 64), "model.safetensors"),
]
CASES += [
    (f"model:{name}", lambda c, e=edit: c.new_run(f"model.name={c.model(e)}"), want)
    for name, edit, want in MODELS
]
CASES.append(("model:missing-folder", lambda c: c.new_run(f"model.name={c.root / 'nomodel'}"), "nomodel"))
CASES += [  # the run's adapter, or the run itself, given as the base model
    (
        "model:an-adapter",
        lambda c: c.new_run(f"model.name={c.done / 'adapters' / 'consensus'}"),
        "is a LoRA adapter, not a base model: give it as model.init_adapter",
    ),
    ("model:a-run-folder", lambda c: c.new_run(f"model.name={c.done}"), "is a run folder, not a base model"),
]
CAUSAL_TASK = ("eval.headline=ppl_avg_factors", "model.head=none", "partition.kind=iid")
CASES += [  # an encoder loads as a causal LM with an untrained LM head: refused, not trained into nonsense
    (
        "model:encoder-for-causal_lm",
        lambda c: c.new_run("task.kind=causal_lm", *CAUSAL_TASK),
        "needs a causal LM",
    ),
    (
        "model:encoder-for-label_words",
        lambda c: c.new_run("task.kind=label_words", "task.label_words=[' no',' yes']", "model.head=none"),
        "needs a causal LM",
    ),
]


def _set(key: str, value: object) -> Callable[[dict, dict], None]:
    return lambda config, tensors: config.__setitem__(key, value)


def _poison(config: dict, tensors: dict) -> None:
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


def _reshape(config: dict, tensors: dict) -> None:
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


def _add_tensor(key: str) -> Callable[[dict, dict], None]:
    return lambda config, tensors: tensors.__setitem__(key, torch.zeros(4, 4))


ADAPTERS: list[tuple[str, Callable[[dict, dict], None], str]] = [
    ("rank", _set("r", 8), "rank"),
    ("rank-as-text", _set("r", "2"), "needs an integer r and a number lora_alpha"),
    ("alpha", _set("lora_alpha", 3.0), "lora_alpha"),
    ("rslora", _set("use_rslora", True), "rslora"),
    ("targets", _set("target_modules", ["query"]), "target"),
    ("nan", _poison, "NaN"),
    ("shape", _reshape, "shape"),
    # PEFT features declora cannot apply: the nodes would start from another model than the adapter
    ("dora", _set("use_dora", True), "use_dora=True (DoRA"),
    ("alpha-pattern", _set("alpha_pattern", {"value": 32}), "alpha_pattern"),
    ("lora-bias", _set("lora_bias", True), "lora_bias"),
    ("bias", _set("bias", "all"), "bias='all'"),
    ("extra-tensor", _add_tensor("base_model.model.lm_head.weight"), "tensors this run would not apply"),
]
CASES += [
    (f"adapter:{name}", lambda c, e=edit: c.new_run(f"model.init_adapter={c.adapter(e)}"), want)
    for name, edit, want in ADAPTERS
]
CASES += [
    ("adapter:missing-folder", lambda c: c.new_run(f"model.init_adapter={c.root / 'noad'}"), "noad"),
    (
        "adapter:no-config",
        lambda c: c.new_run(f"model.init_adapter={_edit(c.adapter(), _drop('adapter_config.json'))}"),
        "adapter_config.json",
    ),
    (
        "adapter:no-weights",
        lambda c: c.new_run(f"model.init_adapter={_edit(c.adapter(), _drop('adapter_model.safetensors'))}"),
        "adapter_model.safetensors is missing",
    ),
    (
        "adapter:truncated",
        lambda c: c.new_run(
            f"model.init_adapter={_edit(c.adapter(), lambda f: _truncate(f / 'adapter_model.safetensors'))}"
        ),
        "adapter_model.safetensors",
    ),
]


def _edit(folder: Path, edit: Callable[[Path], None]) -> Path:
    edit(folder)
    return folder


def _resume(edit: Callable[[Path], None], *extra: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        run = c.copy_done()
        edit(run)
        return ["run", "--resume", str(run), *extra]

    return argv


def _nothing(run: Path) -> None:
    pass


CASES += [
    (
        "ckpt:latest-corrupt",
        _resume(lambda r: (r / "state/latest.json").write_text('{"round": 2,')),
        "latest.json",
    ),
    ("ckpt:latest-empty", _resume(lambda r: (r / "state/latest.json").write_text("")), "latest.json"),
    ("ckpt:latest-not-object", _resume(lambda r: (r / "state/latest.json").write_text("[2]")), "latest.json"),
    (
        "ckpt:shard-truncated",
        _resume(lambda r: _truncate(_last_shard(r, "safetensors"))),
        f"{SHARD}.safetensors is corrupt",
    ),
    (
        "ckpt:shard-missing",
        _resume(lambda r: _last_shard(r, "safetensors").unlink()),
        f"{SHARD}.safetensors is missing",
    ),
    (
        "ckpt:counters-corrupt",
        _resume(lambda r: _last_shard(r, "json").write_text("{oops")),
        f"{SHARD}.json is corrupt",
    ),
    ("ckpt:metrics-corrupt", _resume(lambda r: _corrupt_metrics(r), "rounds=3"), "metrics.jsonl:2"),
    (  # valid JSON, but not a record: a hand edit
        "ckpt:metrics-round-text",
        _resume(lambda r: _edit_metrics(r, 1, '{"event": "round", "round": "two"}'), "rounds=3"),
        "metrics.jsonl:2: a record that has round 'two', not a whole number",
    ),
    (
        "ckpt:metrics-not-object",
        _resume(lambda r: _edit_metrics(r, 1, "[1, 2]"), "rounds=3"),
        "metrics.jsonl:2: a record that is not a JSON object",
    ),
    ("ckpt:config-yaml", _resume(lambda r: (r / "config.yaml").write_text("nodes: [\n")), "config.yaml"),
    (
        "resume:config-file",
        lambda c: ["run", str(c.file("x.yaml", "nodes: 2\n")), "--resume", str(c.copy_done())],
        "x.yaml",
    ),
    ("resume:unsafe-rank", _resume(_nothing, "model.rank=8"), "model.rank"),
    ("resume:unsafe-lr", _resume(_nothing, "train.lr=0.5"), "train.lr"),
    ("resume:unsafe-nodes", _resume(_nothing, "nodes=3"), "nodes"),
    ("resume:fewer-rounds", _resume(_nothing, "rounds=1"), "rounds=1"),
    ("resume:bad-value", _resume(_nothing, "rounds=0"), "rounds"),
    ("resume:with-overwrite", _resume(_nothing, "--overwrite"), "--overwrite"),
    ("resume:not-a-run", lambda c: ["run", "--resume", str(c.root)], "config.yaml"),
]


def _corrupt_metrics(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _edit_metrics(run: Path, index: int, line: str) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[index] = line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _into_done(c: Ctx, *extra: str) -> list[str]:
    c.target = c.copy_done()
    return ["run", *c.tiny(), f"run_dir={c.target}", *extra]


def _into_other(c: Ctx) -> list[str]:
    c.target = c.root / "photos"
    c.target.mkdir()
    (c.target / "holiday.jpg").write_bytes(b"precious")
    return ["run", *c.tiny(), f"run_dir={c.target}", "--overwrite"]


def _into_file(c: Ctx) -> list[str]:
    c.target = c.file("a-file", "x")
    return ["run", *c.tiny(), f"run_dir={c.target}"]


CASES += [
    ("folder:existing-run", _into_done, "--overwrite"),
    ("folder:existing-run-bad-value", lambda c: _into_done(c, "train.lr=0", "--overwrite"), "train.lr"),
    ("folder:not-a-run", _into_other, "photos"),
    ("folder:is-a-file", _into_file, "a-file"),
    # the checks before pass for root (/proc allows it access), the mkdir does not: still one line
    ("folder:cannot-be-made", lambda c: ["run", *c.tiny(), "run_dir=/proc/declora-run"], "cannot be made"),
]


def _grid(c: Ctx, text: str) -> list[str]:
    return ["compare", str(c.file("grid.yaml", text.replace("OUT", str(c.root / "out"))))]


CASES += [
    ("cli:report-missing", lambda c: ["report", str(c.root / "nothing")], "nothing"),
    ("cli:report-not-a-run", lambda c: ["report", str(c.root)], "metrics.jsonl"),
    ("cli:compare-missing", lambda c: ["compare", str(c.root / "g.yaml")], "g.yaml"),
    ("cli:compare-yaml-syntax", lambda c: _grid(c, "grid: [\n"), "grid.yaml"),
    ("cli:compare-not-mapping", lambda c: _grid(c, "- a\n"), "mapping"),
    ("cli:compare-unknown-key", lambda c: _grid(c, "out: OUT\ngrids: {}\n"), "grids"),
    ("cli:compare-empty-axis", lambda c: _grid(c, "out: OUT\ngrid: {nodes: []}\n"), "grid.nodes"),
    ("cli:compare-bad-cell", lambda c: _grid(c, "out: OUT\ngrid: {model.rank: [4, 0]}\n"), "model.rank"),
    ("cli:compare-no-grid", lambda c: ["compare"], "needs a grid file"),
    (
        "cli:compare-a-run-config",
        lambda c: ["compare", str(c.file("run.yaml", "nodes: 2\nrounds: 1\n"))],
        "declora run",
    ),
    ("cli:compare-seeds-not-list", lambda c: _grid(c, "out: OUT\nseeds: 3\n"), "seeds"),
    ("cli:compare-seeds-repeated", lambda c: _grid(c, "out: OUT\nseeds: [0, 0]\n"), "repeats"),
    ("cli:compare-grid-a-list", lambda c: _grid(c, "out: OUT\ngrid: [nodes]\n"), "grid must map"),
    ("cli:compare-overrides-a-string", lambda c: _grid(c, "out: OUT\noverrides: rounds=1\n"), "overrides"),
    ("cli:compare-metric-typo", lambda c: _grid(c, "out: OUT\nmetric: acc_nod_mean\n"), "acc_nod_mean"),
    ("cli:compare-target-text", lambda c: _grid(c, "out: OUT\ntarget_accuracy: high\n"), "high"),
    ("cli:report-metric-typo", lambda c: ["report", str(c.done), "--metric", "acc_nod_mean"], "acc_nod_mean"),
    (
        "cli:report-one-run-out",
        lambda c: ["report", str(c.done), "--out", str(c.root / "cmp")],
        "two or more",
    ),
    (
        "cli:report-out-a-run-folder",  # the comparison's files would land among the run's own
        lambda c: ["report", str(c.done), str(c.done), "--out", str(c.done)],
        "is a run folder",
    ),
    ("cli:compare-empty-grid", lambda c: _grid(c, "# nothing yet\n"), "holds no settings"),
    (  # the cells and tables would land among the run's own files
        "cli:compare-out-a-run-folder",
        lambda c: _grid(c, f"out: {c.done}\ngrid: {{nodes: [2, 3]}}\n"),
        "is a run folder",
    ),
    ("cli:compare-out-a-file", lambda c: _grid(c, f"out: {c.data}\ngrid: {{nodes: [2, 3]}}\n"), "is a file"),
    (
        "cli:compare-override-not-key-value",
        lambda c: _grid(c, "out: OUT\noverrides: [rounds]\n"),
        "grid.yaml",
    ),
    ("cli:topology-out-not-png", lambda c: ["topology", "--out", str(c.root / "w.txt")], "w.txt"),
    (
        "cli:topology-out-no-folder",
        lambda c: ["topology", "--out", str(c.root / "no" / "w.png")],
        "does not exist",
    ),
    ("cli:topology-bad-graph", lambda c: ["topology", "topology.graph=moebius"], "moebius"),
    ("cli:topology-bad-degree", lambda c: ["topology", "topology.graph=regular", "nodes=3"], "degree"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_bert, restore_threads) -> Ctx:
    root = tmp_path_factory.mktemp("corpus")
    ctx = Ctx(root, tiny_bert, write_tiny_data(root / "tiny.jsonl", 40), root / "done", root / "done")
    assert main(["run", *ctx.tiny(), "export=consensus", f"run_dir={ctx.done}"]) == 0
    return ctx


def test_every_case_has_its_own_name():
    assert len({name for name, _, _ in CASES}) == len(CASES)  # pytest would run a repeated id under a suffix


def test_the_readme_counts_the_corpus():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"runs {len(CASES)} malformed inputs" in readme  # a case added or dropped updates README's count


@pytest.mark.parametrize(("name", "argv", "culprit"), CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clear_line(corpus, tmp_path, capsys, name, argv, culprit):
    ctx = Ctx(tmp_path, corpus.bert, corpus.data, corpus.done, tmp_path / "out")
    done_before = folder_digest(corpus.done)
    args = argv(ctx)
    target_before = folder_digest(ctx.target)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("declora: error: ") and "\n" not in err, err
    assert culprit in err, err
    assert folder_digest(ctx.target) == target_before, "the run folder changed"
    assert folder_digest(corpus.done) == done_before
