"""A user's own algorithm, registered from a plugin file or from Python, runs like a shipped one: by name
on the command line, with its own options, resumed to the uninterrupted run's numbers; a bad plugin or
option is one line before any work."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml
from helpers import metrics_records, tiny_run_overrides

from declora import plugins
from declora.algorithms import ALGORITHMS, SHIPPED, register
from declora.cli import main
from declora.config import ConfigError, load_config
from declora.engine import MEASURED, run
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "periodic_gossip.py"
USE = [f"plugins=[{EXAMPLE}]", "algorithm.name=periodic_gossip"]


@pytest.fixture(autouse=True)
def registry():
    """Each test starts from the shipped registry (an earlier test of the session may have imported a
    plugin: they register for the process) and leaves the registry as it found it."""
    algorithms, files, modules = dict(ALGORITHMS), dict(plugins._FILES), set(sys.modules)
    sources = dict(plugins._SOURCES)
    for name in set(ALGORITHMS) - SHIPPED:
        del ALGORITHMS[name]
    plugins._FILES.clear()
    plugins._SOURCES.clear()
    yield
    ALGORITHMS.clear()
    ALGORITHMS.update(algorithms)
    plugins._FILES.clear()
    plugins._FILES.update(files)
    plugins._SOURCES.clear()
    plugins._SOURCES.update(sources)
    for name in set(sys.modules) - modules:
        if name.startswith("declora_plugin_"):
            del sys.modules[name]


# label-skewed nodes on the complete graph: a gossip round leaves them equal, a round without drifts them
SKEWED = ("nodes=3", "rounds=4", "partition.kind=dirichlet", "partition.alpha=0.3", "partition.min_size=4")
SKEWED += ("topology.graph=complete", "train.local_steps=2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bert, restore_threads):
    return tiny_run_overrides(tmp_path_factory, tiny_bert, 48, *SKEWED)


def _evals(run_dir: Path) -> list[dict]:
    evals = (r for r in metrics_records(run_dir) if r["event"] == "eval")
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in evals]


def test_a_plugin_algorithm_runs_by_name_gossips_when_it_says_and_resumes(tiny, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["run", *tiny, *USE, f"run_dir={whole}"]) == 0
    evals = _evals(whole)
    # every=2 (its default): rounds 2 and 4 gossip on the complete graph (every node the exact mean),
    # rounds 1 and 3 send nothing and the label-skewed nodes drift apart
    assert [r["bytes_round"] > 0 for r in evals] == [False, True, False, True]
    assert evals[0]["consensus_A"] > 1e-6 and evals[2]["consensus_A"] > 1e-6
    assert evals[1]["consensus_A"] < 1e-10 and evals[3]["consensus_A"] < 1e-10
    assert load_config(whole / "config.yaml").plugins == (str(EXAMPLE),)  # the folder says what ran

    assert main(["run", *tiny, *USE, "rounds=2", f"run_dir={resumed}"]) == 0
    assert main(["run", "--resume", str(resumed), "rounds=4"]) == 0  # config.yaml's plugins imported
    assert _evals(resumed) == evals


def test_options_reach_the_algorithm_and_a_bad_one_stops_the_run_before_any_work(tiny, tmp_path, capsys):
    assert main(["run", *tiny, *USE, "algorithm.options.every=3", f"run_dir={tmp_path / 'a'}"]) == 0
    assert [r["bytes_round"] > 0 for r in _evals(tmp_path / "a")] == [False, False, True, False]
    capsys.readouterr()
    assert main(["run", *tiny, *USE, "algorithm.options.evry=3", f"run_dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "declora: error: algorithm.name=periodic_gossip: takes algorithm.options.every, an integer >= 1, "
        "alone; got {'evry': 3}"
    )
    assert not (tmp_path / "b").exists()
    # a shipped method ignores it, as any other key it does not read (a grid's shared settings may
    # serve only some of its methods): said at the start of the run
    from declora.ignored import ignored_settings

    assert ignored_settings(load_config(None, ["algorithm.options.every=3"])) == [
        "algorithm.options={'every': 3} has no effect in this run; it applies to registered (plugin) "
        "algorithms"
    ]


def test_a_bad_plugin_is_one_line_naming_it(tmp_path, capsys):
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('half-written plugin')\n")
    shadowing = tmp_path / "shadowing.py"
    shadowing.write_text("from declora.algorithms import register\nregister('dec_lora', dict)\n")
    lacking = tmp_path / "lacking.py"
    lacking.write_text(
        "from declora.algorithms import register\n"
        "class Lacking:\n    def plan(self, t): ...\n"
        "register('lacking', Lacking)\n"
    )
    quitting = tmp_path / "quitting.py"
    quitting.write_text("import sys\nsys.exit('plugin bails')\n")
    cases = {
        f"plugins=[{tmp_path / 'missing.py'}]": "is not a file",
        f"plugins=[{lacking}]": "Lacking has no communicate, server_tensors (declora.algorithms.base",
        f"plugins=[{quitting}]": "failed: SystemExit: plugin bails",
        "plugins=[no_such_module_here]": "no module named 'no_such_module_here' on the Python path",
        f"plugins=[{raising}]": "failed: RuntimeError: half-written plugin",
        f"plugins=[{shadowing}]": "failed: ValueError: algorithm name 'dec_lora' is declora's own",
        "algorithm.name=periodic_gossip": "(or register your own: plugins=[module or .py file]",
    }
    for override, message in cases.items():
        capsys.readouterr()
        assert main(["run", override, f"run_dir={tmp_path / 'run'}"]) == 2, override
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (override, err)
    assert not (tmp_path / "run").exists()


def test_a_plugin_file_named_as_a_module_is_pointed_to(tmp_path, monkeypatch, capsys):
    # The declora command's Python path does not hold the current directory, where plugins are written.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    (tmp_path / "mine.py").write_text("x = 1\n")
    assert main(["run", "plugins=[mine]", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("there is mine.py: give plugins=[mine.py]")


def test_what_a_registered_algorithm_cannot_use_is_refused():
    for extra, message in {
        "robust.aggregator=median": "the registered algorithm periodic_gossip cannot use it",
        "stragglers.asynchronous=true": "asynchrony replaces plain gossip",
        "privacy.noise_multiplier=1.0": "registered algorithm periodic_gossip",
        "eval.headline=acc_server": r"a registered algorithm .periodic_gossip. cannot rank by a \*_server",
    }.items():
        more = ["privacy.level=node", "privacy.clip=1.0"] if extra.startswith("privacy") else []
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*USE, "nodes=3", extra, *more])


def test_register_refuses_a_taken_or_malformed_name_and_accepts_the_same_twice():
    from declora.algorithms.local import LocalOnly

    class Mine(LocalOnly):
        pass

    register("mine", Mine)
    register("mine", Mine)  # a module imported twice
    with pytest.raises(ValueError, match="already registered"):
        register("mine", dict)
    with pytest.raises(ValueError, match="declora's own"):
        register("fedavg", Mine)
    with pytest.raises(ValueError, match="identifier"):
        register("my-algo", Mine)


def test_python_callers_register_and_run_without_plugins(tiny, tmp_path):
    """The docs' snippet: register in-process, then load_config / build_experiment / run."""
    from declora.algorithms.local import LocalOnly

    class Silent(LocalOnly):  # local training only, under a name of the user's
        name = "silent"

    register("silent", Silent)
    records = run(
        build_experiment(load_config(None, [*tiny, "algorithm.name=silent", f"run_dir={tmp_path}"]))
    )
    assert len(records) == 4 and all(r["bytes_round"] == 0 for r in records)


def test_a_compare_grid_sweeps_a_plugin_option(tiny, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "out"),
                "overrides": [*tiny, *USE, "rounds=2", "export=none"],
                "grid": {"algorithm.options.every": [1, 2]},
                "seeds": [0],
                "metric": "acc_avg_factors",
            }
        )
    )
    assert main(["compare", str(grid)]) == 0
    sent = {}
    for every in (1, 2):
        (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and f"every={every}" in p.name]
        sent[every] = [r["bytes_round"] > 0 for r in _evals(folder)]
    assert sent == {1: [True, True], 2: [False, True]}


def test_a_registered_algorithm_may_read_any_algorithm_or_server_key():
    """Only it knows what it reads: no 'has no effect' warning, no 'has no server' refusal."""
    from declora.ignored import ignored_settings

    cfg = load_config(None, [*USE, "algorithm.mu=0.5", "server.fraction=0.5"])
    assert ignored_settings(cfg) == []
    assert ignored_settings(load_config(None, ["algorithm.mu=0.5"])) != []  # dec_lora: warned
    with pytest.raises(ConfigError, match="which has no server"):
        load_config(None, ["server.fraction=0.5"])


def test_a_check_config_that_fails_itself_is_one_line(tmp_path, capsys):
    buggy = tmp_path / "buggy.py"
    buggy.write_text(
        "from declora.algorithms import register\n"
        "from declora.algorithms.local import LocalOnly\n"
        "class Buggy(LocalOnly):\n"
        "    @staticmethod\n"
        "    def check_config(cfg):\n"
        "        return cfg.algorithm.options['every'] + 1\n"
        "register('buggy', Buggy)\n"
    )
    assert main(["run", f"plugins=[{buggy}]", "algorithm.name=buggy", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "declora: error: algorithm.name=buggy: its check_config raised KeyError: 'every'"


def test_a_plugin_resume_refuses_other_plugins_and_names_where_relative_paths_are_opened(
    tiny, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(EXAMPLE.read_text())
    start = ["run", *tiny, "plugins=[mine.py]", "algorithm.name=periodic_gossip", "run_dir=run", "rounds=2"]
    assert main(start) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    copy = tmp_path / "copy.py"
    copy.write_text(EXAMPLE.read_text())
    capsys.readouterr()
    assert main(["run", "--resume", "run", f"plugins=[{copy}]", "rounds=3"]) == 2
    assert "plugins cannot change on resume (['mine.py'] ->" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--resume", str(tmp_path / "run"), "rounds=3"]) == 2
    err = capsys.readouterr().err
    assert "'mine.py' is not a file" in err and f"the run started in {tmp_path}" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_a_server_model_plugin_cannot_upload_top_k_of_its_states(tiny, tmp_path):
    server = tmp_path / "server_b.py"
    server.write_text(
        "from dataclasses import dataclass\n"
        "from typing import Any\n"
        "from declora.algorithms import register\n"
        "from declora.algorithms.server import ServerModel\n"
        "@dataclass\n"
        "class ServerB:\n"
        "    fed: Any\n"
        "    cfg: Any = None\n"
        "    schedule: Any = None\n"
        "    name: str = 'server_b'\n"
        "    single_node: bool = False\n"
        "    def __post_init__(self):\n"
        "        self.server = ServerModel(self.fed, self.cfg, self.schedule)\n"
        "    def plan(self, t): ...\n"
        "    def communicate(self, ctx): self.server.aggregate(ctx, ('B',))\n"
        "    def server_tensors(self, fed): return None\n"
        "register('server_b', ServerB)\n"
    )
    cfg = load_config(None, [*tiny, f"plugins=[{server}]", "algorithm.name=server_b", "comm.codec=topk"])
    with pytest.raises(ConfigError, match="its ServerModel uploads whole factors"):
        build_experiment(dataclasses.replace(cfg, run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def _run_plugin(tiny, tmp_path: Path, name: str, *lines: str) -> tuple[int, Path]:
    """Run a plugin file of ``lines`` that registers ``name``: the exit code and the run folder."""
    source = tmp_path / f"{name}.py"
    source.write_text("from declora.algorithms import register\n" + "".join(f"{x}\n" for x in lines))
    run = tmp_path / "run"
    return main(["run", *tiny, f"plugins=[{source}]", f"algorithm.name={name}", f"run_dir={run}"]), run


def test_a_non_tensor_in_state_dict_is_named(tiny, tmp_path, capsys):
    code, _ = _run_plugin(
        tiny,
        tmp_path,
        "counting",
        "from declora.algorithms.local import LocalOnly",
        "class Counting(LocalOnly):",
        "    def state_dict(self): return {'rounds': 3}",
        "    def load_state_dict(self, state): ...",
        "register('counting', Counting)",
    )
    # found at the first checkpoint, after rounds ran: one line naming the round, and not exit 2 (bad input)
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "declora: error: round 1 (algorithm counting): algorithm Counting.state_dict()['rounds'] is a int; "
        "a checkpoint holds tensors only (wrap a number as torch.tensor(value))"
    )


def test_a_plugin_that_fails_in_a_round_names_the_round_and_is_not_reported_as_bad_input(
    tiny, tmp_path, capsys
):
    code, run = _run_plugin(
        tiny,
        tmp_path,
        "every_k",
        "from declora.algorithms.dec_lora import DecLoRA",
        "class EveryK(DecLoRA):",
        "    def communicate(self, ctx):",
        "        if ctx.round == 1:",
        "            self.cfg.algorithm.options['every']  # a KeyError: a bug of the plugin's",
        "        super().communicate(ctx)",
        "register('every_k', EveryK)",
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'every'" in err  # a bug: where it is, in full
    assert "declora: raised in round 2 (algorithm every_k); the run folder keeps its last checkpoint" in err
    assert [r["round"] for r in metrics_records(run) if r["event"] in ("round", "eval")] == [1]


def _gossip_file(path: Path, kinds: str) -> Path:
    """A plugin file registering 'mine': Dec-LoRA that gossips ``kinds`` (plus a trained head)."""
    path.write_text(
        "from dataclasses import dataclass\n"
        "from declora.algorithms import register\n"
        "from declora.algorithms.base import trained_kinds\n"
        "from declora.algorithms.dec_lora import DecLoRA\n"
        "from declora.algorithms.mixing import gossip_kinds\n"
        "@dataclass\n"
        "class Mine(DecLoRA):\n"
        f"    def communicate(self, ctx): gossip_kinds(ctx, trained_kinds(self.fed, {kinds}))\n"
        "register('mine', Mine)\n"
    )
    return path


def test_a_plugin_file_edited_in_the_same_process_runs_its_new_code(tiny, tmp_path):
    """The run records the file as it is now, so that file must be what runs (not a cached first import)."""
    plugin = _gossip_file(tmp_path / "mine.py", "('B',)")
    use = [*tiny, "rounds=1", f"plugins=[{plugin}]", "algorithm.name=mine"]
    before = run(build_experiment(load_config(None, [*use, f"run_dir={tmp_path / 'b'}"])))
    _gossip_file(plugin, "('A', 'B')")  # edited within the same session
    after = run(build_experiment(load_config(None, [*use, f"run_dir={tmp_path / 'ab'}"])))
    shipped = run(build_experiment(load_config(None, [*tiny, "rounds=1", f"run_dir={tmp_path / 'dec'}"])))
    assert before[-1]["bytes_total"] < after[-1]["bytes_total"] == shipped[-1]["bytes_total"]
    start = metrics_records(tmp_path / "ab")[0]
    assert start["inputs"]["plugins[0]"]["bytes"] == plugin.stat().st_size


def test_an_edited_plugin_file_that_fails_to_import_keeps_the_last_good_registration(tmp_path):
    plugin = _gossip_file(tmp_path / "mine.py", "('B',)")
    load_config(None, [f"plugins=[{plugin}]", "algorithm.name=mine"])
    good = ALGORITHMS["mine"]
    plugin.write_text(plugin.read_text() + "raise RuntimeError('half-saved')\n")
    with pytest.raises(ConfigError, match="failed: RuntimeError: half-saved"):
        load_config(None, [f"plugins=[{plugin}]", "algorithm.name=mine"])
    assert ALGORITHMS["mine"] is good


def test_a_module_imported_by_name_and_also_named_in_plugins_is_one_definition(tmp_path, monkeypatch):
    plugin = _gossip_file(tmp_path / "mine_module.py", "('B',)")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mine_module  # the notebook's own import, then plugins so that the command line can resume

    assert ALGORITHMS["mine"] is mine_module.Mine
    assert load_config(None, [f"plugins=[{plugin}]", "algorithm.name=mine"]).algorithm.name == "mine"
    other = _gossip_file(tmp_path / "other.py", "('A',)")  # another file's class under the same name
    with pytest.raises(ConfigError, match="algorithm name 'mine' is already registered by"):
        load_config(None, [f"plugins=[{other}]"])
    del sys.modules["mine_module"]


def test_interface_mistakes_are_one_line_before_the_run_folder(tiny, tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(
        "from declora.algorithms import register\n"
        "class Half:\n"
        "    single_node = False\n"
        "    def __init__(self, fed): self.fed = fed\n"
        "    def communicate(self, ctx): pass\n"
        "    def server_tensors(self, fed): return None\n"
        "register('half', lambda fed, cfg=None, schedule=None: Half(fed))\n"
    )
    no_cfg = tmp_path / "no_cfg.py"
    no_cfg.write_text(
        factory.read_text()
        .replace("class Half:", "class Half:\n    def plan(self, t): ...")
        .replace("lambda fed, cfg=None, schedule=None: Half(fed)", "Half")
    )
    cases = {
        factory: (
            "half",
            "declora: error: algorithm.name=half: the Half its constructor returned has no plan "
            "(declora.algorithms.base.Algorithm lists what an algorithm needs)",
        ),
        no_cfg: (
            "half",
            "declora: error: plugins: importing " + repr(str(no_cfg)) + " failed: ValueError: algorithm "
            "'half': Half(fed) cannot be called as Half(fed, cfg=cfg, schedule=schedule) (got an unexpected "
            "keyword argument 'cfg'); give it cfg=None and schedule=None keywords",
        ),
    }
    for plugin, (name, message) in cases.items():
        plugins._FILES.clear()
        ALGORITHMS.pop(name, None)
        capsys.readouterr()
        args = ["run", *tiny, f"plugins=[{plugin}]", f"algorithm.name={name}", f"run_dir={tmp_path / 'run'}"]
        assert main(args) == 2, plugin
        assert capsys.readouterr().err.strip() == message
        assert not (tmp_path / "run").exists()


def test_a_plan_that_returns_no_round_plan_is_named(tiny, tmp_path):
    """What plan returns is only seen when it runs: then named, not an AttributeError in the engine."""
    from declora.algorithms.local import LocalOnly

    class Kinds(LocalOnly):
        def plan(self, t):
            return ("A", "B")

    register("kinds", Kinds)
    exp = build_experiment(load_config(None, [*tiny, "algorithm.name=kinds", f"run_dir={tmp_path}"]))
    with pytest.raises(TypeError, match=r"^algorithm.name=kinds: plan\(0\) returned a tuple; it must return"):
        run(exp)


def _docs_block(marker: str) -> str:
    text = (EXAMPLE.parents[1] / "docs" / "extending.md").read_text()
    (block,) = [
        b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python") and marker in b
    ]
    return block


def test_the_docs_fedavg_gives_the_shipped_fedavgs_numbers_under_client_sampling(tiny, tmp_path):
    """docs/extending.md's server example, run as a plugin file: the sampled nodes alone train."""
    plugin = tmp_path / "my_fedavg.py"
    plugin.write_text(_docs_block("class MyFedAvg"))
    sampled = [*tiny, "server.fraction=0.5", "rounds=3"]  # 2 of 3 nodes a round
    assert main(["run", *sampled, "algorithm.name=fedavg", f"run_dir={tmp_path / 'shipped'}"]) == 0
    mine = ["algorithm.name=my_fedavg", f"plugins=[{plugin}]", f"run_dir={tmp_path / 'docs'}"]
    assert main(["run", *sampled, *mine]) == 0
    assert _evals(tmp_path / "docs") == _evals(tmp_path / "shipped")
    train = [r["train_tokens"] for r in metrics_records(tmp_path / "docs") if "train_tokens" in r]
    assert train and train == [
        r["train_tokens"] for r in metrics_records(tmp_path / "shipped") if "train_tokens" in r
    ]


def test_the_docs_say_the_name_attribute_is_not_read_and_the_registered_name_is_shown(tiny, tmp_path):
    """The start line and config.yaml name the registered name; the class's own ``name`` is never read."""
    text = (EXAMPLE.parents[1] / "docs" / "extending.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `name: str`")]
    assert "not read" in row and "registered" in row
    from declora.algorithms.local import LocalOnly

    @dataclasses.dataclass
    class Labelled(LocalOnly):
        name: str = "SOMETHING_ELSE"

    register("labelled", Labelled)
    run(
        build_experiment(
            load_config(None, [*tiny, "rounds=1", "algorithm.name=labelled", f"run_dir={tmp_path}"])
        )
    )
    assert load_config(tmp_path / "config.yaml").algorithm.name == "labelled"
    assert "SOMETHING_ELSE" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_plugin_that_registers_nothing_is_warned_about_once(tmp_path, caplog):
    from declora.config import load_config

    empty = tmp_path / "registers_nothing.py"
    empty.write_text("VALUE = 1\n")
    with caplog.at_level("WARNING", logger="declora.plugins"):
        load_config(None, [f"plugins=[{empty}]"])
        load_config(None, [f"plugins=[{empty}]"])  # validated again: said once
        load_config(None, ["plugins=[json]"])  # a module that is no plugin at all
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"plugins: {str(empty)!r} registered no algorithm (a plugin registers its algorithms when it is "
        "imported: docs/extending.md)",
        "plugins: 'json' registered no algorithm (a plugin registers its algorithms when it is imported: "
        "docs/extending.md)",
    ], said


def test_a_plugin_an_earlier_run_imported_must_be_listed_by_a_later_config(tiny, tmp_path):
    """Else the later run's config.yaml (plugins: []) could be neither resumed nor run by a new process."""
    run(build_experiment(load_config(None, [*tiny, *USE, "rounds=1", f"run_dir={tmp_path / 'a'}"])))
    with pytest.raises(
        ConfigError,
        match=r"algorithm.name='periodic_gossip' comes from the plugin .*periodic_gossip.py"
        r"', which an earlier run of this process imported but this config does not list",
    ):
        load_config(None, [*tiny, "algorithm.name=periodic_gossip", f"run_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "b").exists()
    other_name = EXAMPLE.parent / ".." / "examples" / "periodic_gossip.py"  # the same file named another way
    load_config(None, [*tiny, f"plugins=[{other_name}]", "algorithm.name=periodic_gossip"])
