"""A user's own algorithm, registered from a plugin file or from Python, runs like a shipped one: by name
on the command line, with its own options, resumed to the uninterrupted run's numbers; a bad plugin or
option is one line before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_tiny_data

from declora import plugins
from declora.algorithms import ALGORITHMS, register
from declora.cli import main
from declora.config import ConfigError, load_config
from declora.engine import MEASURED, run
from declora.experiment import build_experiment

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "periodic_gossip.py"
USE = [f"plugins=[{EXAMPLE}]", "algorithm.name=periodic_gossip"]


@pytest.fixture(autouse=True)
def registry():
    """Each test starts from the shipped registry and leaves it so (a plugin registers for the process)."""
    algorithms, files, modules = dict(ALGORITHMS), dict(plugins._FILES), set(sys.modules)
    yield
    ALGORITHMS.clear()
    ALGORITHMS.update(algorithms)
    plugins._FILES.clear()
    plugins._FILES.update(files)
    for name in set(sys.modules) - modules:
        if name.startswith("declora_plugin_"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bert, restore_threads):
    data = write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.jsonl", 48)
    return [
        f"model.name={tiny_bert}",
        *("model.rank=2", "model.max_length=16", "nodes=3", "rounds=4", f"data.dataset={data}"),
        *("partition.kind=dirichlet", "partition.alpha=0.3", "partition.min_size=4"),
        *("topology.graph=complete", "train.batch_size=4", "train.local_steps=2", "eval.every=1"),
        *("eval.node_examples=4", "checkpoint_every=1", "export=consensus", "threads=1"),
    ]


def _evals(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in lines if r["event"] == "eval"]


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
    with pytest.raises(ConfigError, match=r"algorithm.options=\{'every': 3\} is for registered .* dec_lora"):
        load_config(None, ["algorithm.options.every=3"])  # a shipped method would ignore it


def test_a_bad_plugin_is_one_line_naming_it(tmp_path, capsys):
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('half-written plugin')\n")
    shadowing = tmp_path / "shadowing.py"
    shadowing.write_text("from declora.algorithms import register\nregister('dec_lora', dict)\n")
    cases = {
        f"plugins=[{tmp_path / 'missing.py'}]": "is not a file",
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


def test_what_a_registered_algorithm_cannot_use_is_refused():
    for extra, message in {
        "robust.aggregator=median": "needs a plain gossip or a server aggregate",
        "stragglers.asynchronous=true": "asynchrony replaces plain gossip",
        "privacy.noise_multiplier=1.0": "registered algorithm periodic_gossip",
    }.items():
        more = ["privacy.level=node", "privacy.clip=1.0"] if extra.startswith("privacy") else []
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*USE, "nodes=3", extra, *more])


def test_register_refuses_a_taken_or_malformed_name_and_accepts_the_same_twice():
    class Mine:
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
