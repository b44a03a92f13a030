"""Grids: expansion, skip of finished cells, resume of half-finished ones, table numbers, figures."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_grid_file
from helpers import tiny_grid_file as _grid_file
from scipy import stats

from declora.compare import (
    cell_state,
    expand,
    group_cells,
    load_grid,
    pair_groups,
    run_grid,
)
from declora.compare_table import comparison_rows, format_paired, write_comparison
from declora.config import ConfigError

pytestmark = pytest.mark.integration


def test_expand_is_the_product_of_axes_and_seeds(tmp_path, tiny_bert):
    cells = expand(load_grid(_grid_file(tmp_path, tiny_bert)))
    assert [(c.method, c.seed) for c in cells] == [
        ("algorithm.name=dec_lora", 0),
        ("algorithm.name=dec_lora", 1),
        ("algorithm.name=local", 0),
        ("algorithm.name=local", 1),
    ]
    assert len({c.run_dir for c in cells}) == 4


def test_a_grids_base_is_read_beside_the_grid_file_from_any_folder(tmp_path, monkeypatch):
    from pathlib import Path

    shipped = Path("configs/grids/smoke.yaml").resolve()
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert load_grid(shipped).base == str(shipped.parent / "../smoke.yaml")
    (tmp_path / "grid.yaml").write_text("base: nowhere.yaml\ngrid: {seed: [0]}\n")
    with pytest.raises(ConfigError, match=r"^base: 'nowhere.yaml' in grid file '.*grid.yaml' does not exist"):
        load_grid(tmp_path / "grid.yaml")


def test_a_typo_in_any_cell_stops_the_grid(tmp_path, tiny_bert):
    path = _grid_file(tmp_path, tiny_bert, grid={"algorithm.name": ["dec_lora", "dec-lora"]})
    with pytest.raises(ConfigError, match="dec-lora"):
        expand(load_grid(path))


def test_finished_cells_are_skipped_and_half_finished_resume(tmp_path, tiny_bert):
    grid = load_grid(_grid_file(tmp_path, tiny_bert, seeds=[0]))
    from declora.config import load_config
    from declora.engine import run
    from declora.experiment import build_experiment

    first = expand(grid)[0]
    exp = build_experiment(load_config(grid.base, first.overrides))

    def crash(record):
        if record["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(exp, on_round=crash)
    assert cell_state(first) == "partial"
    seen = []
    run_grid(grid, on_cell=lambda k, total, cell, state: seen.append(state))
    assert seen == ["partial", "new"]
    seen.clear()
    run_grid(grid, on_cell=lambda k, total, cell, state: seen.append(state))
    assert seen == ["done", "done"]
    rounds = [json.loads(x)["round"] for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 0, 1, 2]  # start, partition, then each round exactly once


def test_a_finished_grid_rerun_with_other_threads_is_skipped_and_left_as_it_was(tmp_path, tiny_bert):
    grid = load_grid(_grid_file(tmp_path, tiny_bert, ["export=consensus"], seeds=[0]))
    run_grid(grid)
    before = {p: p.read_bytes() for p in (tmp_path / "grid").rglob("*") if p.is_file()}
    faster = load_grid(_grid_file(tmp_path, tiny_bert, ["export=consensus", "threads=2"], seeds=[0]))
    seen = []
    run_grid(faster, on_cell=lambda k, total, cell, state: seen.append(state))
    assert seen == ["done", "done"]
    after = {p: p.read_bytes() for p in (tmp_path / "grid").rglob("*") if p.is_file()}
    assert after == before  # no config, resume log or adapter rewritten


def test_a_finished_cell_asked_for_another_export_resumes_to_write_it(tmp_path, tiny_bert):
    grid = load_grid(_grid_file(tmp_path, tiny_bert, seeds=[0]))  # export=none
    run_grid(grid)
    wider = load_grid(_grid_file(tmp_path, tiny_bert, ["export=all"], seeds=[0]))
    seen = []
    run_grid(wider, on_cell=lambda k, total, cell, state: seen.append(state))
    assert seen == ["partial", "partial"]
    for cell in expand(wider):
        card = json.loads((cell.run_dir / "adapters" / "node_002" / "declora_adapter.json").read_text())
        assert card["round"] == 2 and "acc_node_mean" in card["metrics"]


def _fake_run(folder, accs, bytes_per_round, wall, key="acc_avg_factors"):
    folder.mkdir(parents=True)
    lines = [{"event": "start", "round": 0}]
    for t, acc in enumerate(accs, 1):
        lines.append(
            {
                "event": "eval",
                "round": t,
                key: acc,
                "bytes_total": t * bytes_per_round,
                "wall_s": wall * t,
                "consensus_BA": 1.0 / t,
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_table_numbers_equal_a_hand_computation(tmp_path):
    a = _fake_run(tmp_path / "a", [0.5, 0.7, 0.6], 1_000_000, 2.0)
    b = _fake_run(tmp_path / "b", [0.6, 0.65, 0.8], 2_000_000, 3.0)
    rows = comparison_rows({"m": [a, b]}, "acc_avg_factors", target=0.65)
    row = rows[0]
    assert row["runs"] == 2
    assert row["best"] == pytest.approx((0.7 + 0.8) / 2) and row["best_std"] == pytest.approx(0.05)
    assert row["final"] == pytest.approx((0.6 + 0.8) / 2) and row["final_std"] == pytest.approx(0.1)
    assert row["bytes_total"] == pytest.approx((3e6 + 6e6) / 2)
    assert row["bytes_to_target"] == pytest.approx((2e6 + 4e6) / 2)  # a reaches 0.65 at round 2, b at round 2
    assert row["wall_s"] == pytest.approx((6.0 + 9.0) / 2)
    never = comparison_rows({"m": [a]}, "acc_avg_factors", target=0.99)[0]
    assert math.isnan(never["bytes_to_target"])


def test_with_validation_rows_the_table_gives_the_test_value_of_the_round_they_chose(tmp_path):
    a = _fake_run(tmp_path / "a", [0.5, 0.7, 0.6], 1_000_000, 2.0)
    b = _fake_run(tmp_path / "b", [0.6, 0.65, 0.8], 2_000_000, 3.0)
    for folder, val in ((a, [0.55, 0.6, 0.65]), (b, [0.7, 0.6, 0.65])):  # a chooses round 3, b round 1
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        for line, v in zip(lines[1:], val, strict=True):
            line["val_acc_avg_factors"] = v
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    row = comparison_rows({"m": [a, b]}, "acc_avg_factors", target=None)[0]
    assert row["chosen"] == pytest.approx((0.6 + 0.6) / 2) and row["best"] == pytest.approx((0.7 + 0.8) / 2)
    table = write_comparison({"m": [a, b]}, tmp_path / "out", "acc_avg_factors", None)
    assert "| wall s | chosen |" in table and "| 7.5 | 60.00 ± 0.00 |" in table
    assert "chosen: acc_avg_factors at the round its validation rows chose" in table
    plain = write_comparison(
        {"m": [_fake_run(tmp_path / "c", [0.5], 1, 1.0)]}, tmp_path / "o2", "acc_avg_factors", None
    )
    assert "chosen" not in plain  # no validation rows, no column


def test_perplexity_table_numbers_equal_a_hand_computation(tmp_path):
    # Lower is better: best is each run's lowest, the target is reached at the first value <= it.
    a = _fake_run(tmp_path / "a", [30.0, 12.0, 15.0], 1_000_000, 2.0, key="ppl_avg_factors")
    b = _fake_run(tmp_path / "b", [25.0, 20.0, 10.0], 2_000_000, 3.0, key="ppl_avg_factors")
    row = comparison_rows({"m": [a, b]}, "ppl_avg_factors", target=20.0)[0]
    assert row["runs"] == 2
    assert row["best"] == pytest.approx((12.0 + 10.0) / 2) and row["best_std"] == pytest.approx(1.0)
    assert row["final"] == pytest.approx((15.0 + 10.0) / 2) and row["final_std"] == pytest.approx(2.5)
    assert row["bytes_total"] == pytest.approx((3e6 + 6e6) / 2)
    assert row["bytes_to_target"] == pytest.approx((2e6 + 4e6) / 2)  # a: 12 <= 20 at round 2, b: 20 at 2
    assert row["wall_s"] == pytest.approx((6.0 + 9.0) / 2)
    early = comparison_rows({"m": [a]}, "ppl_avg_factors", target=30.0)[0]
    assert early["bytes_to_target"] == pytest.approx(1e6)  # at the target counts (<=), round 1
    assert math.isnan(comparison_rows({"m": [a]}, "ppl_avg_factors", target=5.0)[0]["bytes_to_target"])
    table = write_comparison({"m": [a, b]}, tmp_path / "out", "ppl_avg_factors", 20.0)
    assert table.startswith("Perplexity: ppl_avg_factors, best = lowest")
    assert "| m | 2 | 11.00 ± 1.00 | 12.50 ± 2.50 | 4.50 | 3.00 |" in table  # as they are, not in %


def test_a_privacy_utility_comparison_shows_the_epsilon_each_method_spent(tmp_path):
    plain = _fake_run(tmp_path / "plain", [0.5, 0.7], 10, 1.0)
    private = [_fake_run(tmp_path / f"dp{k}", [0.4, 0.6], 10, 1.0) for k in (0, 1)]
    for folder, spent in zip(private, (7.9, 8.1), strict=True):  # a round record carries the epsilon
        with (folder / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"event": "round", "round": 2, "privacy_epsilon_max": spent}) + "\n")
    table = write_comparison({"plain": [plain], "dp": private}, tmp_path / "out", "acc_avg_factors", None)
    assert "| wall s | ε spent |" in table
    assert re.search(r"\| plain \| 1 \|.*\| not private \|", table)
    assert re.search(r"\| dp \| 2 \|.*\| 8.00 ± 0.10 \|", table)
    assert "ε spent" not in write_comparison({"plain": [plain]}, tmp_path / "out2", "acc_avg_factors", None)
    header = (tmp_path / "out" / "comparison.csv").read_text().splitlines()[0]
    columns = header.split(",")  # new columns after the old ones, which keep their places
    assert columns[14:] == ["reached", "diverged", "epsilon", "epsilon_std", "chosen", "chosen_std"]


def test_comparison_files_are_written(tmp_path):
    runs = {
        "x": [_fake_run(tmp_path / "a", [0.5, 0.7], 10, 1.0)],
        "y": [_fake_run(tmp_path / "b", [0.4, 0.8], 20, 1.0)],
    }
    table = write_comparison(runs, tmp_path / "out", "acc_avg_factors", 0.6)
    assert "| x | 1 | 70.00 | 70.00 |" in table  # one run: no spread shown, and the table says why
    assert "One run per method: no spread, and no paired comparison" in table
    png = (tmp_path / "out" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "out" / "comparison.csv").read_text().startswith("method,runs,of,unfinished,best")


def test_runs_without_the_metric_and_the_target_are_shown_not_dropped(tmp_path):
    reached = _fake_run(tmp_path / "a", [0.5, 0.7], 1_000_000, 1.0)  # reaches 0.6 at round 2: 2 MB
    missed = _fake_run(tmp_path / "b", [0.5, 0.55], 1_000_000, 1.0)
    server = _fake_run(tmp_path / "c", [0.5, 0.7], 1_000_000, 1.0, key="acc_server")
    runs = {"half": [reached, missed], "gossip": [server, tmp_path / "a"]}
    table = write_comparison(runs, tmp_path / "out", "acc_avg_factors", 0.6)
    assert "population std" in table
    assert "| half | 2 | 62.50 ± 7.50 | 62.50 ± 7.50 | 2.00 | 2.00 (1 of 2 runs) |" in table
    assert "| gossip | 1 of 2 |" in table and "are left out" in table
    only_server = write_comparison({"s": [server]}, tmp_path / "o2", "acc_avg_factors", None)
    assert "| s | 0 of 1 | no evaluation of acc_avg_factors | – |" in only_server
    no_target = write_comparison({"half": [reached, missed]}, tmp_path / "o3", "acc_avg_factors", None)
    assert "| 2.00 | n/a |" in no_target
    # a run that logged 2 of the 4 rounds its config asked for is counted as not finished
    (missed / "metrics.jsonl").write_text(
        json.dumps({"event": "start", "round": 0, "config": {"rounds": 4}})
        + "\n"
        + (missed / "metrics.jsonl").read_text()
    )
    marked = write_comparison({"half": [reached, missed]}, tmp_path / "o4", "acc_avg_factors", None)
    assert "| half | 2 (1 not finished) |" in marked and "enters with its last evaluation" in marked


def test_a_grid_whose_metric_a_cell_never_logs_is_refused_before_any_run(tmp_path, tiny_bert):
    grid = load_grid(_grid_file(tmp_path, tiny_bert, metric="acc_server"))
    with pytest.raises(
        ConfigError, match=r"grid cell algorithm\.name=dec_lora: metric='acc_server': .*no server"
    ):
        expand(grid)
    assert not (tmp_path / "grid").exists()


def test_a_grid_built_in_python_gets_the_grid_files_checks_before_any_run(tmp_path):
    """One place checks a grid's seeds, metric and target, whether the grid is a file or a Grid."""
    import numpy as np

    from declora.compare import Grid

    with pytest.raises(ConfigError, match=r"^Grid: metric='acc_node_man' is not a metric that runs log"):
        Grid(base=None, out=tmp_path, metric="acc_node_man")
    with pytest.raises(
        ConfigError, match=r"^Grid: target_accuracy=80: acc_avg_factors is a fraction .* 0\.8$"
    ):
        Grid(base=None, out=tmp_path, target_accuracy=80)
    with pytest.raises(ConfigError, match=r"^Grid: seeds=\[0, 0\] repeats a seed"):
        Grid(base=None, out=tmp_path, seeds=[0, 0])
    file = tmp_path / "grid.yaml"
    file.write_text("metric: acc_node_man\n")
    with pytest.raises(ConfigError, match=rf"^grid file {file}: metric='acc_node_man' is not a metric"):
        load_grid(file)
    # numpy values, as a sweep builds them, are the Python numbers they hold
    grid = Grid(base=None, out=tmp_path, seeds=np.arange(2), axes={"train.lr": np.array([1e-3, 2e-3])})
    assert grid.seeds == (0, 1) and [c.method for c in expand(grid)][::2] == [
        "train.lr=0.001",
        "train.lr=0.002",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["grid.yaml"]  # nothing ran


def test_a_cells_config_error_names_the_cell(tmp_path, tiny_bert):
    path = _grid_file(
        tmp_path, tiny_bert, ["attack.nodes=[0]"], grid={"attack.kind": ["none", "sign_flip"]}, seeds=[0]
    )
    with pytest.raises(
        ConfigError, match=r"^grid cell attack\.kind=none: attack\.nodes=.* needs an attack\.kind"
    ):
        expand(load_grid(path))


def test_report_of_runs_none_of_which_logged_the_metric_is_an_error(tmp_path, capsys):
    from declora.cli import main

    a = _fake_run(tmp_path / "a", [0.5, 0.7], 10, 1.0)
    b = _fake_run(tmp_path / "b", [0.4, 0.8], 20, 1.0)
    for d in (a, b):
        (d / "config.yaml").write_text("seed: 0\n")
    code = main(["report", str(a), str(b), "--metric", "acc_server", "--out", str(tmp_path / "rep")])
    assert code == 2 and "--metric acc_server: none of the runs logged it" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_grid_groups_by_method(tmp_path, tiny_bert):
    cells = expand(load_grid(_grid_file(tmp_path, tiny_bert)))
    groups = group_cells(cells)
    assert list(groups) == ["algorithm.name=dec_lora", "algorithm.name=local"]
    assert all(len(v) == 2 for v in groups.values())


def test_compare_cli_and_multi_run_report(tmp_path, tiny_bert, capsys):
    from declora.cli import main

    path = _grid_file(tmp_path, tiny_bert, more_overrides=["tensorboard=true"], seeds=[0])
    assert main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] algorithm.name=dec_lora seed=0: running" in out and "| algorithm.name=local | 1 |" in out
    cells = expand(load_grid(path))
    assert (cells[0].run_dir / "tensorboard").is_dir()
    assert main(["report", *(str(c.run_dir) for c in cells), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "comparison.png").is_file()
    import shutil  # two folders of the same name (runs of two grids, say): one row each, by their paths

    twin = tmp_path / "other" / cells[0].run_dir.name
    shutil.copytree(cells[0].run_dir, twin)
    capsys.readouterr()
    assert main(["report", str(cells[0].run_dir), str(twin), "--out", str(tmp_path / "rep2")]) == 0
    table = capsys.readouterr().out.split("## comparison")[1]
    assert f"| {cells[0].run_dir} |" in table and f"| {twin} |" in table


ROOT = Path(__file__).resolve().parents[2]
SHIPPED_GRIDS = sorted((ROOT / "configs/grids").glob("*.yaml")) + sorted(
    (ROOT / "configs/fidelity").glob("C*.yaml")
)


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=lambda p: p.stem)
def test_shipped_grids_expand_to_valid_configs(path, monkeypatch):
    # Every cell of every shipped grid validates (expand checks each cell's config) before any work.
    monkeypatch.chdir(ROOT)  # grids may name their base relative to the repository
    grid = load_grid(path)
    cells = expand(grid)
    per_seed = math.prod(len(v) for v in grid.axes.values())
    assert len(cells) == per_seed * len(grid.seeds) and len({c.run_dir for c in cells}) == len(cells)


def test_command_line_overrides_reach_every_cell(tmp_path, tiny_bert):
    grid = load_grid(_grid_file(tmp_path, tiny_bert), ("rounds=1", "train.lr=0.01"), str(tmp_path / "o"))
    cells = expand(grid)
    from declora.config import load_config

    for cell in cells:
        cfg = load_config(grid.base, cell.overrides)
        assert (cfg.rounds, cfg.train.lr) == (1, 0.01)
        assert cell.run_dir.parent == tmp_path / "o"
    with pytest.raises(ConfigError, match="algorithm.name is set per cell"):
        load_grid(_grid_file(tmp_path, tiny_bert), ("algorithm.name=fedavg",))


def test_every_round_of_a_running_cell_reaches_on_round(tmp_path, tiny_bert):
    grid = load_grid(_grid_file(tmp_path, tiny_bert, seeds=[0], grid={"algorithm.name": ["local"]}))
    rounds: list[int] = []
    run_grid(grid, on_round=lambda record: rounds.append(record["round"]))
    assert rounds == [1, 2]
    run_grid(grid, on_round=lambda record: rounds.append(record["round"]))  # finished: skipped, silent
    assert rounds == [1, 2]


def test_compare_command_overrides_every_cell_and_shows_each_cells_rounds(tmp_path, tiny_bert, capsys):
    from declora.cli import main

    path = _grid_file(tmp_path, tiny_bert, seeds=[0])
    assert main(["compare", str(path), "rounds=1", "--out", str(tmp_path / "quick")]) == 0
    out, err = capsys.readouterr()
    assert "[1/2] algorithm.name=dec_lora seed=0: running" in out and "[2/2]" in out
    assert err.count("round 1/1: loss") == 2  # each running cell's rounds (as lines: stderr is no terminal)
    for cell in ("algorithm.name=dec_lora_seed=0", "algorithm.name=local_seed=0"):
        evals = [
            json.loads(x) for x in (tmp_path / "quick" / cell / "metrics.jsonl").read_text().splitlines()
        ]
        assert max(r["round"] for r in evals) == 1  # rounds=1 reached every cell


def test_paired_table_pairs_runs_by_seed(tmp_path):
    # Two methods, three seeds each, listed in different orders: differences are taken seed by seed.
    finals = {"ref": {0: 0.70, 1: 0.60, 2: 0.65}, "new": {2: 0.70, 0: 0.74, 1: 0.63}}
    runs = {}
    for method, by_seed in finals.items():
        runs[method] = []
        for seed, acc in by_seed.items():
            folder = _fake_run(tmp_path / f"{method}{seed}", [0.5, acc], 1_000_000, 1.0)
            (folder / "config.yaml").write_text(f"seed: {seed}\n")
            runs[method].append(folder)
    table = write_comparison(runs, tmp_path / "out", "acc_avg_factors", None)
    assert "Paired by seed against **ref**" in table
    # per seed 0, 1, 2: +4, +3, +5 points; mean 4, SE 1/sqrt(3); interval 4 -/+ 4.30 * 0.577
    assert "| new | 3 | +4.00, +3.00, +5.00 | +4.00 ± 0.58 | +1.52 to +6.48 | yes |" in table
    assert "Paired by seed" not in write_comparison(
        {"ref": runs["ref"]}, tmp_path / "o2", "acc_avg_factors", None
    )
    # the same +6.25 points on both seeds (a coarse test set): no spread, so no interval and no verdict
    same = {}
    for method, accs in {"ref": [0.5, 0.5], "same": [0.5625, 0.5625]}.items():
        same[method] = []
        for seed, acc in enumerate(accs):
            folder = _fake_run(tmp_path / f"eq_{method}{seed}", [0.5, acc], 1_000_000, 1.0)
            (folder / "config.yaml").write_text(f"seed: {seed}\n")
            same[method].append(folder)
    table = write_comparison(same, tmp_path / "o3", "acc_avg_factors", None)
    assert "| same | 2 | +6.25, +6.25 | +6.25 ± 0.00 | none (no spread between seeds) | undecided |" in table


def test_every_fidelity_contrast_names_cells_of_its_grids(monkeypatch):
    # A misspelt method in benchmarks/fidelity.py would silently drop a claim's verdict from the page.
    import importlib.util

    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks/fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    methods = {
        f.stem.split("_")[0]: set(group_cells(expand(load_grid(f))))
        for f in ROOT.glob("configs/fidelity/C*.yaml")
    }
    assert set(fidelity.CONTRASTS) <= set(methods)
    for claim, contrasts in fidelity.CONTRASTS.items():
        for _, a, b, *_ in contrasts:
            for spec_ in (a, b):
                grid, _, method = spec_.rpartition(":")
                assert method in methods[grid or claim], (claim, spec_)


def _fidelity_module(monkeypatch):
    import importlib.util

    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks/fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    return fidelity


def _fake_runs(root: Path, finals: dict[int, dict[str, float]]) -> list[Path]:
    """One run folder per seed whose last evaluation holds ``finals[seed]``."""
    dirs = []
    for seed, values in finals.items():
        d = root / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
        (d / "metrics.jsonl").write_text(json.dumps({"event": "eval", "round": 40, **values}) + "\n")
        dirs.append(d)
    return dirs


def test_fidelity_contrast_table_converts_margins_and_decides_by_the_interval(monkeypatch, tmp_path):
    # C4 on made-up runs: accuracies in [0, 1] shown in points, bytes in MB; the margins are in those units.
    fidelity = _fidelity_module(monkeypatch)
    fs = {
        s: {"acc_server": 0.80 + d, "bytes_total": 76_200_000} for s, d in ((0, 0.01), (1, 0.02), (2, 0.03))
    }
    het = {s: {"acc_server": 0.80, "bytes_total": 76_192_000} for s in (0, 1, 2)}
    flex = {
        s: {"acc_server": 0.80 - d, "bytes_total": 90_000_000} for s, d in ((0, 0.05), (1, 0.06), (2, 0.07))
    }
    runs = {
        "C4": {
            "algorithm.name=fslora": _fake_runs(tmp_path / "fs", fs),
            "algorithm.name=hetlora": _fake_runs(tmp_path / "het", het),
            "algorithm.name=flexlora": _fake_runs(tmp_path / "flex", flex),
        }
    }
    lines = fidelity.contrast_table("C4", runs).splitlines()
    assert "verdict, 2 corrected together" in lines[0]  # the bytes are exact: no chance to correct
    # FSLoRA − HetLoRA: +1, +2, +3 points: mean 2, SE 0.58, t(2) = 4.30: -0.48 to +4.48, undecided
    assert "| +1.00, +2.00, +3.00 | +2.00 ± 0.58 | -0.48 to +4.48 | **undecided** | undecided |" in lines[2]
    # FSLoRA − FlexLoRA: +6, +8, +10 points: +3.03 to +12.97 at 95 %; the two accuracy contrasts
    # corrected together (t at 1 − 0.025/2 = 6.21): +0.83 to +15.17, still above 0
    assert "| +8.00 ± 1.15 | +3.03 to +12.97 | **holds** | holds |" in lines[3]
    # the bytes: 0.008 MB on every seed, exact, inside the ±0.1 MB margin
    assert "| +0.01 ± 0.00 | +0.01 to +0.01 | **holds** | holds |" in lines[4]


def test_a_cell_early_stopping_ended_is_done_and_goes_on_when_the_grid_gives_it_more_patience(
    tmp_path, tiny_bert
):
    from declora.report import patience_stopped_at, read_metrics

    def grid_with(patience):
        more = [
            "rounds=6",
            "data.train_limit=null",
            "data.validation_fraction=0.25",
            f"eval.patience={patience}",
        ]
        one = {"algorithm.name": ["dec_lora"]}
        return load_grid(_grid_file(tmp_path, tiny_bert, more, seeds=[0], grid=one))

    run_grid(grid_with(1))
    cell = expand(grid_with(1))[0]
    stopped = patience_stopped_at(read_metrics(cell.run_dir / "metrics.jsonl"))
    assert stopped is not None and stopped < 6  # the premise: it stopped early on this seed
    assert cell_state(cell) == "done"  # finished: the grid does not resume it
    cell = expand(grid_with("null"))[0]
    assert cell_state(cell) == "partial"  # more patience: the grid goes on with it
    run_grid(grid_with("null"))
    assert cell_state(cell) == "done"
    assert patience_stopped_at(read_metrics(cell.run_dir / "metrics.jsonl")) is None


def test_a_cell_killed_in_its_export_is_not_finished_even_with_a_report(tmp_path, tiny_bert):
    # A kill during the export leaves adapters.tmp; `declora report` on the cell then writes report.md.
    # The cell must still resume (and write its adapters), not be skipped for good without them.
    from declora.report import write_report

    grid = load_grid(_grid_file(tmp_path, tiny_bert, ["export=consensus"], seeds=[0]))
    run_grid(grid)
    cell = expand(grid)[0]
    assert cell_state(cell) == "done"
    adapters = cell.run_dir / "adapters"
    adapters.rename(cell.run_dir / "adapters.tmp")  # as a kill inside replace_folder's write leaves it
    write_report(cell.run_dir)
    assert cell_state(cell) == "partial"
    run_grid(grid)
    assert cell_state(cell) == "done" and (adapters / "consensus" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"grid": {"algorithm.name": ["dec_lora", "dec_lora"]}},
            r"algorithm\.name=dec_lora and algorithm\.name=dec_lora are one run",
        ),
        ({"grid": {"train.lr": [0.001, "1e-3"]}}, r"train\.lr=0\.001 and train\.lr=1e-3 are one run"),
        ({"grid": {"seed": [0, 1]}}, r"^grid\.seed: each cell's seed comes from the grid's seeds list"),
        ({"grid": {"run_dir": ["a", "b"]}}, r"^grid\.run_dir: each cell's folder is named by the grid"),
        ({"seeds": []}, r"seeds is empty"),
        (
            {"metric": "acc_honest_min"},
            r"metric=acc_honest_min: the honest nodes' metrics are logged under an attack only",
        ),
        ({"out": 3}, r"out must be a path, got 3"),
        ({"out": ""}, r"out must be a path, got ''"),  # would write into the current folder
        ({"base": ["a"]}, r"base must be a path, got \['a'\]"),
    ],
    ids=[
        "repeated_value",
        "same_value_spelt_twice",
        "seed_axis",
        "run_dir_axis",
        "no_seeds",
        "honest_without_attack",
        "out_a_number",
        "out_empty",
        "base_a_list",
    ],
)
def test_a_grid_that_would_mislabel_or_double_count_its_runs_is_refused_before_any_run(
    tmp_path, tiny_bert, extra, message
):
    with pytest.raises(ConfigError, match=message):
        expand(load_grid(_grid_file(tmp_path, tiny_bert, **extra)))
    assert not (tmp_path / "grid").exists()


def test_a_seed_in_the_grid_files_overrides_is_refused_as_on_the_command_line(tmp_path, tiny_bert):
    with pytest.raises(
        ConfigError, match=r"^override 'seed=5': each cell's seed comes from the grid's seeds"
    ):
        load_grid(_grid_file(tmp_path, tiny_bert, more_overrides=["seed=5"]))
    with pytest.raises(
        ConfigError, match=r"^override 'seed=5': each cell's seed comes from the grid's seeds"
    ):
        load_grid(_grid_file(tmp_path, tiny_bert), overrides=("seed=5",))


def test_the_paired_table_leaves_out_a_seed_one_method_did_not_finish_and_says_so(tmp_path):
    """A stopped run's last value is of an earlier round than its partner's: no paired difference."""

    ref = _fake_runs(tmp_path / "ref", {s: {"acc_avg_factors": 0.70} for s in (0, 1, 2)})
    other = _fake_runs(
        tmp_path / "other",
        {0: {"acc_avg_factors": 0.72}, 1: {"acc_avg_factors": 0.90}, 2: {"acc_avg_factors": 0.75}},
    )
    (other[1] / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "rounds": 80}))  # stopped at 40 of 80
    table = format_paired({"ref": ref, "other": other}, "acc_avg_factors")
    assert (
        "| other | 2 (seed 1: not finished by both, or not finite) | +2.00, +5.00 | +3.50 ± 1.50 |" in table
    )


def test_a_method_left_out_of_the_paired_table_is_named_and_a_zero_difference_has_no_sign(tmp_path):
    """A method with too few shared finished seeds vanished from the paired table without a word."""

    ref = _fake_runs(tmp_path / "ref", {s: {"acc_avg_factors": 0.70} for s in (0, 1)})
    same = _fake_runs(tmp_path / "same", {0: {"acc_avg_factors": 0.70}, 1: {"acc_avg_factors": 0.70 - 1e-9}})
    alone = _fake_runs(tmp_path / "alone", {0: {"acc_avg_factors": 0.75}})
    table = format_paired({"ref": ref, "same": same, "alone": alone}, "acc_avg_factors")
    assert "| same | 2 | 0.00, 0.00 | 0.00 ± 0.00 |" in table and "-0.00" not in table
    assert table.endswith(
        "Not paired with **ref** (a paired difference needs two seeds both finished): alone "
        "(1 finished seed shared)."
    )
    only_note = format_paired({"ref": ref[:1] + ref[1:], "alone": alone}, "acc_avg_factors")
    assert only_note.startswith("Not paired with **ref**") and "|" not in only_note
    assert (
        format_paired({"ref": ref[:1], "alone": alone}, "acc_avg_factors") == ""
    )  # one run each: the table says


def test_a_method_keeps_its_curve_when_one_of_its_runs_never_evaluated(tmp_path):
    from declora.compare_plots import curves

    evaluated = _fake_run(tmp_path / "a", [0.5, 0.7], 10, 1.0)
    never = tmp_path / "b"
    never.mkdir()
    (never / "metrics.jsonl").write_text(json.dumps({"event": "start", "round": 0}) + "\n")  # stopped at once
    c = curves([evaluated, never], "acc_avg_factors")
    assert c["round"].tolist() == [1, 2] and c["acc"].tolist() == [0.5, 0.7]


def test_a_diverged_cell_is_a_result_of_the_grid_which_goes_on_and_skips_it_later(
    tmp_path, tiny_bert, capsys, caplog
):
    """A learning rate too high for one cell stopped the whole grid, and every later call ran it again."""
    from safetensors.torch import load_file, save_file

    from declora.cli import main

    seed_run = tmp_path / "seed_run"
    base = yaml.safe_load(_grid_file(tmp_path, tiny_bert).read_text())["overrides"]
    kept = [a for a in base if a not in ("export=none", "rounds=2")]
    assert main(["run", *kept, "rounds=1", "partition.min_size=8", f"run_dir={seed_run}"]) == 0
    good = seed_run / "adapters" / "consensus"
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    for f in good.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in load_file(str(weights)).items()}, str(weights))
    path = _grid_file(tmp_path, tiny_bert, grid={"model.init_adapter": [str(good), str(bad)]}, seeds=[0, 1])
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="declora.compare"):
        assert main(["compare", str(path)]) == 0  # the grid goes on past the two diverged cells
    out = capsys.readouterr().out
    assert caplog.text.count("diverged: round 1: node") == 2, caplog.text
    cells = expand(load_grid(path))
    assert [cell_state(c) for c in cells] == ["done", "done", "diverged", "diverged"]
    row = next(r for r in comparison_rows(group_cells(cells), "acc_avg_factors", None) if r["diverged"])
    assert (row["runs"], row["of"], row["diverged"]) == (0, 2, 2)
    assert "| 0 of 2 (2 diverged) | diverged (NaN or Inf) |" in out and "out of its method's numbers" in out
    assert main(["compare", str(path)]) == 0  # nothing runs again
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2 and out.count("diverged before (NaN or Inf), skipped") == 2


def test_a_table_of_attacked_runs_by_a_metric_over_every_node_names_the_honest_one(tmp_path):
    clean = _fake_run(tmp_path / "clean", [0.6, 0.7], 1_000, 1.0)
    hit = _fake_run(tmp_path / "hit", [0.5, 0.55], 1_000, 1.0)
    lines = (hit / "metrics.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"event": "start", "round": 0, "attackers": [0, 5]})
    (hit / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    table = write_comparison({"clean": [clean], "median": [hit]}, tmp_path / "t", "acc_avg_factors", None)
    assert table.endswith(
        "Under attack: median ran with attacking nodes, and acc_avg_factors counts the attackers' models "
        "too; rank by acc_honest_avg_factors (--metric acc_honest_avg_factors, or a grid's metric: "
        "acc_honest_avg_factors) for what the honest nodes reached."
    )
    assert "Under attack" in (tmp_path / "t" / "comparison.md").read_text()
    # no note: no run attacked, a metric of the honest nodes, or a server's model
    assert "Under attack" not in write_comparison({"clean": [clean]}, tmp_path / "u", "acc_avg_factors", None)
    for metric in ("acc_honest_avg_factors", "acc_server"):
        assert "Under attack" not in write_comparison({"median": [hit]}, tmp_path / metric, metric, None)


def test_pair_within_compares_each_method_with_the_first_of_its_own_group(tmp_path):
    # C2's shape: two graph densities x two methods, two seeds; TAD is paired with LoRA at the same p
    finals = {
        "p=0.5,lora": {0: 0.80, 1: 0.78},
        "p=0.5,tad": {0: 0.75, 1: 0.74},
        "p=0.1,lora": {0: 0.70, 1: 0.72},
        "p=0.1,tad": {0: 0.71, 1: 0.74},
    }
    runs = {
        m: _fake_runs(tmp_path / m, {s: {"acc_avg_factors": v, "bytes_total": 1} for s, v in f.items()})
        for m, f in finals.items()
    }
    groups = {m: m.split(",")[0] for m in finals}
    table = format_paired(runs, "acc_avg_factors", groups)
    first, second = table.split("\n\nWithin ")
    assert first.startswith("Within p=0.5, paired by seed against **p=0.5,lora**")
    assert "| p=0.5,tad | 2 | -5.00, -4.00 | -4.50 ± 0.50 |" in first and "p=0.1" not in first
    assert second.startswith("p=0.1, paired by seed against **p=0.1,lora**")
    assert "| p=0.1,tad | 2 | +1.00, +2.00 | +1.50 ± 0.50 |" in second
    # without groups, every method against the first, as before
    assert format_paired(runs, "acc_avg_factors").count("Paired by seed against **p=0.5,lora**") == 1


def test_pair_within_names_grid_axes_and_leaves_one_to_compare(tmp_path, tiny_bert):
    axes = {"topology.graph": ["ring", "complete"], "algorithm.name": ["dec_lora", "fedavg"]}
    grid = load_grid(tiny_grid_file(tmp_path, tiny_bert, grid=axes, pair_within=["topology.graph"]))
    groups = pair_groups(expand(grid), grid.pair_within)
    assert groups == {  # the file's axes in yaml's (sorted) order
        "algorithm.name=dec_lora,topology.graph=ring": "topology.graph=ring",
        "algorithm.name=dec_lora,topology.graph=complete": "topology.graph=complete",
        "algorithm.name=fedavg,topology.graph=ring": "topology.graph=ring",
        "algorithm.name=fedavg,topology.graph=complete": "topology.graph=complete",
    }
    with pytest.raises(ConfigError, match=r"^pair_within: 'topology.p' is not an axis of the grid; its axes"):
        load_grid(tiny_grid_file(tmp_path, tiny_bert, grid=axes, pair_within=["topology.p"]))
    with pytest.raises(ConfigError, match=r"names every axis: no method would be left to compare"):
        load_grid(tiny_grid_file(tmp_path, tiny_bert, grid=axes, pair_within=list(axes)))
    with pytest.raises(ConfigError, match=r"pair_within must be a list of grid axes"):
        load_grid(tiny_grid_file(tmp_path, tiny_bert, grid=axes, pair_within="topology.graph"))


def test_compare_command_writes_one_paired_table_per_pair_within_value(tmp_path, tiny_bert):
    from declora.cli import main

    axes = {"topology.graph": ["ring", "complete"], "algorithm.name": ["dec_lora", "local"]}
    path = tiny_grid_file(tmp_path, tiny_bert, grid=axes, pair_within=["topology.graph"])
    assert main(["compare", str(path), "rounds=1"]) == 0
    table = (tmp_path / "grid" / "comparison.md").read_text()
    for graph in ("ring", "complete"):  # local against dec_lora on the same graph, never across graphs
        ref = f"algorithm.name=dec_lora,topology.graph={graph}"
        assert f"Within topology.graph={graph}, paired by seed against **{ref}**" in table
        assert f"| algorithm.name=local,topology.graph={graph} | 2 |" in table
    assert "Paired by seed against" not in table  # no table across the groups


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_grid_file_is_refused_as_an_empty_config_is(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"holds no settings \(it is empty or all comments\)"):
        load_grid(path)


def test_a_final_that_is_not_finite_is_left_out_of_both_tables_and_named(tmp_path):
    """An fp32 perplexity past exp(88.7) is logged as Infinity: that run's final is no number to average or
    to difference (it read "+inf ± nan | none (no spread between seeds)", and its method's final averaged
    fewer runs than its best)."""

    logged = {"bytes_total": 100, "wall_s": 1.0}
    ref = _fake_runs(tmp_path / "ref", {s: {"ppl_avg_factors": 30.0 + s, **logged} for s in (0, 1, 2)})
    finals = {0: 28.0, 1: math.inf, 2: 29.5}
    other = _fake_runs(tmp_path / "other", {s: {"ppl_avg_factors": v, **logged} for s, v in finals.items()})
    table = format_paired({"ref": ref, "other": other}, "ppl_avg_factors")
    assert (
        "| other | 2 (seed 1: not finished by both, or not finite) | -2.00, -2.50 | -2.25 ± 0.25 |" in table
    )
    row = {r["method"]: r for r in comparison_rows({"ref": ref, "other": other}, "ppl_avg_factors", None)}
    assert (row["other"]["runs"], row["other"]["of"]) == (2, 3)
    assert row["other"]["final"] == row["other"]["best"] == pytest.approx(28.75)


def test_an_interval_bound_keeps_its_sign_so_it_agrees_with_excludes_0(tmp_path):
    """Bounds of +0.003 and -0.003 points both printed 0.00, beside "yes" on one row and "no" on the other."""

    ref = _fake_runs(tmp_path / "ref", {s: {"acc_avg_factors": 0.5} for s in (0, 1, 2)})
    half = stats.t.ppf(0.975, 2) * 0.007 / math.sqrt(3)  # the interval's half-width for this spread
    rows = {}
    for name, low in (("above", 3e-5), ("below", -3e-5)):
        mean = low + half
        rows[name] = _fake_runs(
            tmp_path / name,
            {
                s: {"acc_avg_factors": 0.5 + mean + d}
                for s, d in zip((0, 1, 2), (-0.007, 0.0, 0.007), strict=True)
            },
        )
    table = format_paired({"ref": ref, **rows}, "acc_avg_factors")
    assert "| +0.00 to " in table.split("| above |")[1].splitlines()[0]
    assert table.split("| above |")[1].splitlines()[0].endswith("| yes |")
    assert "| -0.00 to " in table.split("| below |")[1].splitlines()[0]
    assert table.split("| below |")[1].splitlines()[0].endswith("| no |")


def test_the_fidelity_grid_table_leaves_out_a_diverged_run(monkeypatch, tmp_path):
    """Seeds 0 and 1 finished at 72 and 74 %; seed 2 diverged at round 3 after 30 % at round 2: its last
    evaluation is no final (the table averaged it in, 65.33 ± 10.87 over 3 seeds)."""
    fidelity = _fidelity_module(monkeypatch)
    runs = _fake_runs(tmp_path / "a", {s: {"acc_avg_factors": 0.72 + 0.02 * s} for s in (0, 1)})
    gone = tmp_path / "a" / "seed2"
    gone.mkdir()
    (gone / "config.yaml").write_text(yaml.safe_dump({"seed": 2, "rounds": 40}))
    lines = [{"event": "eval", "round": 2, "acc_avg_factors": 0.30}, {"event": "diverged", "round": 3}]
    (gone / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = fidelity.grid_table({"a": [*runs, gone]}, "acc_avg_factors")
    assert table.splitlines()[-1].endswith("| 2 | 73.00 ± 1.00 | 73.00 ± 1.00 |")  # seeds, best, final
