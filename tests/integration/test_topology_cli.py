"""``declora topology``: what it prints for static and random schedules, the picture, and bad names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from declora.algorithms.alternating import auto_interval, build_clock
from declora.cli import main
from declora.config import load_config
from declora.schedules import build_schedule

pytestmark = pytest.mark.integration
DEFAULT = str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")


def _printed(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def test_static_ring_prints_the_graph_w_row_gap_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "ring.png"
    assert main(["topology", DEFAULT, "nodes=6", "topology.graph=ring", "--out", str(out)]) == 0
    shown = _printed(capsys.readouterr().out)
    assert shown["nodes"] == "6" and shown["edges"] == "6"
    assert shown["degrees"] == "[2, 2, 2, 2, 2, 2]" and shown["is_static"] == "True"
    assert shown["row0"] == "[0.3333333333, 0.3333333333, 0.0, 0.0, 0.0, 0.3333333333]"  # no float noise
    row = [float(x) for x in shown["row0"].strip("[]").split(",")]
    assert row == pytest.approx([1 / 3, 1 / 3, 0, 0, 0, 1 / 3])  # MH on a ring: 1/3 self, left, right
    # Ring eigenvalues 1/3 + 2/3 cos(2 pi k / 6): the second largest modulus is 2/3, so the gap is 1/3.
    assert float(shown["spectral_gap"]) == pytest.approx(1 / 3)
    assert shown["tad_lora auto T"].split()[0] == str(math.ceil(3.0 / math.sqrt(1 - 4 / 9)))  # rho = (2/3)^2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_dynamic_er_prints_rho_with_its_error_and_the_interval_tad_lora_picks(tmp_path, capsys):
    overrides = ["nodes=10", "topology.schedule=dynamic_er", "topology.p=0.1"]
    assert main(["topology", DEFAULT, *overrides, "--out", str(tmp_path / "er.png")]) == 0
    shown = _printed(capsys.readouterr().out)
    rho, stderr = float(shown["rho"]), float(shown["rho_stderr"])
    assert 0 < rho < 1 and 0 < stderr < 0.1 * (1 - rho)
    assert shown["is_static"] == "False" and "spectral_gap" not in shown
    auto_t = int(shown["tad_lora auto T"].split()[0])
    cfg = load_config(DEFAULT, [*overrides, "algorithm.name=tad_lora", "algorithm.switch_interval=auto"])
    clock, tad_rho = build_clock(cfg.algorithm, build_schedule(cfg.topology, 10, cfg.seed), "tad_lora", True)
    assert tad_rho == pytest.approx(rho) and clock.interval == auto_t  # what a TAD-LoRA run would use
    assert auto_t == auto_interval(rho, cfg.algorithm.auto_c, cfg.algorithm.auto_max)
    assert (tmp_path / "er.png").stat().st_size > 0


def test_sparser_random_graphs_contract_less_and_get_longer_phases(tmp_path, capsys):
    rhos, intervals = [], []
    for p in (0.5, 0.02):
        overrides = ["nodes=10", "topology.schedule=dynamic_er", f"topology.p={p}"]
        assert main(["topology", DEFAULT, *overrides, "--out", str(tmp_path / f"{p}.png")]) == 0
        shown = _printed(capsys.readouterr().out)
        rhos.append(float(shown["rho"]))
        intervals.append(int(shown["tad_lora auto T"].split()[0]))
    assert rhos[0] < rhos[1] and intervals[0] < intervals[1]


@pytest.mark.parametrize(
    ("override", "allowed"),
    [("topology.graph=rng", "'ring'"), ("topology.schedule=dynamic", "'dynamic_er'")],
)
def test_unknown_graph_or_schedule_exits_2_and_lists_the_allowed(override, allowed, tmp_path, capsys):
    assert main(["topology", DEFAULT, override, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert override.split("=")[1] in err and allowed in err and "choose one of" in err
    assert not (tmp_path / "x.png").exists()


def test_a_straggler_deadline_is_part_of_the_graph_it_describes(tmp_path, capsys):
    """A node that misses the deadline is offline that round: the topology the run mixes over, and the
    interval TAD-LoRA picks for it, are those of that schedule, not of the ring alone."""
    from declora.stragglers import Stragglers

    late = ["nodes=4", "stragglers.speeds=[1,1,1,1.5]", "stragglers.jitter=0.3", "stragglers.deadline=1.3"]
    overrides = [*late, "train.local_steps=1", "algorithm.name=tad_lora", "algorithm.switch_interval=auto"]
    assert main(["topology", DEFAULT, *overrides, "--out", str(tmp_path / "late.png")]) == 0
    shown = _printed(capsys.readouterr().out)
    cfg = load_config(DEFAULT, overrides)
    run_schedule = build_schedule(cfg.topology, 4, cfg.seed, Stragglers(cfg, 4).late)  # as build_experiment
    clock, rho = build_clock(cfg.algorithm, run_schedule, "tad_lora", True)
    assert shown["is_static"] == "False" and float(shown["rho"]) == pytest.approx(rho) and rho > 0.5
    assert int(shown["tad_lora auto T"].split()[0]) == clock.interval > 4  # the ring alone: rho 1/9, T 4


def test_a_graph_key_this_graph_does_not_read_is_named_as_declora_run_names_it(tmp_path, capsys, caplog):
    edges = tmp_path / "ring4.txt"
    edges.write_text("0 1\n1 2\n2 3\n3 0\n")
    argv = ["topology", DEFAULT, "nodes=6", f"topology.edge_list={edges}", "--out", str(tmp_path / "t.png")]
    assert main(argv) == 0
    assert _printed(capsys.readouterr().out)["edges"] == "6"  # the config's ring, not the file's
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("topology.edge_list=") and "has no effect" in m for m in said), said
