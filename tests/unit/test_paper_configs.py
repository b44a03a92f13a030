"""The paper-protocol configs (configs/papers/): each loads, names a registered algorithm and a headline
metric that algorithm reports, states its command, and comes with a small variant; the report marks the
headline metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from declora.algorithms import ALGORITHMS
from declora.allowed import CHOICES
from declora.config import load_config
from declora.report import format_table, summarize, write_report

pytestmark = pytest.mark.unit

PAPERS = Path(__file__).resolve().parents[2] / "configs" / "papers"
CONFIGS = sorted(PAPERS.glob("*.yaml"))
# Algorithms with a server model (acc_server): their server_tensors is not the protocol's "return None".
SERVER_ALGORITHMS = frozenset(
    {"fedavg", "ffa_lora", "rolora", "fslora", "flexlora", "hetlora", "fedprox", "scaffold", "fedex_lora"}
    | {"flora", "fed_sb"}
)
EVERY_ALGORITHM_REPORTS = frozenset({"acc_node_mean", "acc_avg_factors", "acc_avg_product"})


class _Touched(Exception):
    """Raised by the probe federation: server_tensors looked at the nodes' tensors."""


class _ProbeFederation:
    def tensors(self, *args: object, **kwargs: object) -> dict:
        raise _Touched


def _has_server(name: str) -> bool:
    """True when server_tensors builds a model: it touches the federation or its own server state
    instead of returning None straight away."""
    cls = ALGORITHMS[name]
    try:
        return cls.server_tensors(object.__new__(cls), _ProbeFederation()) is not None
    except (_Touched, AttributeError):
        return True


def test_there_are_paper_configs_and_each_full_one_has_a_small_variant() -> None:
    names = {p.stem for p in CONFIGS}
    full = {n for n in names if not n.endswith("_small")}
    assert {"dec_lora_ring10", "adf_lora_labelskew", "tad_lora_dynamic_er", "fslora_mixed"} <= full
    assert {"decaf_ring", "decaf_complete"} <= full
    assert {f"{n}_small" for n in full} == names - full


def test_the_server_list_matches_the_registry() -> None:
    assert {name for name in ALGORITHMS if _has_server(name)} == SERVER_ALGORITHMS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_loads_and_its_headline_is_reported(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.algorithm.name in ALGORITHMS
    assert cfg.eval.headline in CHOICES["eval.headline"]
    server = {"acc_server"} if cfg.algorithm.name in SERVER_ALGORITHMS else set()
    reported = EVERY_ALGORITHM_REPORTS | server
    assert cfg.eval.headline in reported, f"{cfg.algorithm.name} does not report {cfg.eval.headline}"
    # every key is spelled out in the file (no silent reliance on a default for the headline)
    assert yaml.safe_load(path.read_text())["eval"]["headline"] == cfg.eval.headline


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_header_names_the_paper_and_its_command(path: Path) -> None:
    text = path.read_text()
    header = text[: text.index("\nnodes:")]
    assert all(line.startswith("#") for line in header.splitlines()), "the header is one comment block"
    assert "arXiv 25" in header or "arXiv 26" in header
    assert f"declora run configs/papers/{path.name}" in header
    assert max(len(line) for line in text.splitlines()) <= 110


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.endswith("_small")], ids=lambda p: p.stem)
def test_small_variant_keeps_the_protocol(path: Path) -> None:
    full, small = load_config(path), load_config(path.with_name(f"{path.stem}_small.yaml"))
    for section, key in (
        ("algorithm", "name"),
        ("eval", "headline"),
        ("topology", "schedule"),
        ("partition", "kind"),
        ("model", "rslora"),
    ):
        assert getattr(getattr(small, section), key) == getattr(getattr(full, section), key), (section, key)
    assert small.nodes == full.nodes
    if small.model.head != full.model.head:  # allowed, but the small file must say why
        assert "the classifier head is TRAINED" in path.with_name(f"{path.stem}_small.yaml").read_text()
    assert small.model.name == "minilm"


def _records(headline: str | None) -> list[dict]:
    config = {"eval": {"headline": headline}} if headline else {}
    return [
        {"event": "start", "config": config},
        {"event": "eval", "round": 1, "acc_node_mean": 0.6, "acc_node_std": 0.1, "acc_avg_factors": 0.7},
        {"event": "eval", "round": 2, "acc_node_mean": 0.5, "acc_node_std": 0.2, "acc_avg_factors": 0.65},
    ]


def test_table_marks_the_headline_given_or_logged() -> None:
    table = format_table(summarize(_records(None), headline="acc_node_mean"))
    first = table.splitlines()[0]
    assert first.startswith("headline (acc_node_mean): final 50.00 ± 20.00%, best 60.00 ± 10.00% at round 1")
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")]
    assert "acc_node_mean *" in rows and "acc_avg_factors" in rows
    logged = format_table(summarize(_records("acc_avg_factors"))).splitlines()[0]
    assert logged.startswith("headline (acc_avg_factors): final 65.00%, best 70.00% at round 1")
    assert "headline" not in format_table(summarize(_records(None)))


def test_headline_that_was_not_logged_is_said_so() -> None:
    table = format_table(summarize(_records(None)), headline="acc_server")
    assert table.splitlines()[0] == "headline (acc_server): not logged by this run"


def test_write_report_reads_the_headline_from_config_yaml(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in _records(None)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"eval": {"headline": "acc_node_mean"}}))
    table = write_report(tmp_path)
    assert table.startswith("headline (acc_node_mean):")
    assert table in (tmp_path / "report.md").read_text()
