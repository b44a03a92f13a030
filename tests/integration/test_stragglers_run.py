"""Stragglers on the tiny BERT: neutral speeds change nothing, a deadline silences a node, asynchronous
gossip at staleness 0 is synchronous gossip (also with a robust rule, an attacker or node-level DP), an
asynchronous run resumes exactly, and under asynchrony clipped gossip contains a sign flipper while only
publications spend privacy."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_tensors, crash_after_round, write_tiny_data

from declora import engine
from declora.config import load_config
from declora.experiment import build_experiment

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]
SIMULATED = ("sim_round_s", "sim_s", "late_nodes", "staleness_mean", "staleness_max")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny.jsonl", 48)


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)


def _build(tiny_bert, tiny_data, run_dir, *extra):
    overrides = [
        f"model.name={tiny_bert}",
        f"data.dataset={tiny_data}",
        "model.rank=2",
        "model.max_length=16",
        "nodes=4",
        "partition.kind=iid",
        "rounds=3",
        "train.batch_size=4",
        "train.local_steps=2",
        "eval.every=3",
        "eval.node_examples=8",
        "checkpoint_every=1",
        "export=none",
        "threads=1",
        "topology.graph=complete",
        f"run_dir={run_dir}",
        *extra,
    ]
    return build_experiment(load_config(None, overrides))


def _plain(records):
    return [{k: v for k, v in r.items() if k not in SIMULATED + engine.MEASURED} for r in records]


def test_unit_speeds_change_nothing_but_add_a_clock(tiny_bert, tiny_data, tmp_path):
    plain = _build(tiny_bert, tiny_data, tmp_path / "a")
    timed = _build(
        tiny_bert, tiny_data, tmp_path / "b", "stragglers.speeds=[1,1,1,1]", "stragglers.step_s=0.5"
    )
    a, b = engine.run(plain), engine.run(timed)
    assert _plain(a) == _plain(b)
    assert_same_tensors(plain, timed)
    assert [r["sim_round_s"] for r in b] == [1.0, 1.0, 1.0]  # 2 local steps x 0.5 s at speed 1
    assert b[-1]["sim_s"] == 3.0


def test_a_missed_deadline_silences_the_node(tiny_bert, tiny_data, tmp_path):
    extra = ("stragglers.speeds=[1,1,3,1]", "stragglers.deadline=4", "stragglers.link_s_per_mb=1")
    exp = _build(tiny_bert, tiny_data, tmp_path / "a", *extra)
    before = {k: v.detach().clone() for k, v in exp.fed.tensors().items()}
    records = engine.run(exp)
    edges = exp.exchange.ledger.edges  # the last round's bytes [sender, receiver]
    assert int(edges[2].sum()) == 0 and int(edges[:, 2].sum()) == 0 and int(edges.sum()) > 0
    for k, v in exp.fed.tensors().items():  # node 2 neither trained nor mixed
        assert torch.equal(v.detach()[2], before[k][2]), k
        assert not torch.equal(v.detach()[0], before[k][0]), k
    assert all(r["late_nodes"] == 1 and r["active_nodes"] == 3 for r in records)
    link = records[0]["bytes_node_max"] / 1e6
    assert records[0]["sim_round_s"] == pytest.approx(4.0 + link)  # the deadline, then the busiest link


def test_with_local_epochs_a_nodes_time_and_deadline_follow_its_data(tiny_bert, tiny_data, tmp_path):
    # quantity skew: nodes hold different numbers of rows, so one epoch is a different number of steps
    extra = (
        "train.local_unit=epochs",
        "train.local_steps=1",
        "partition.kind=quantity_skew",
        "partition.alpha=0.5",
        "stragglers.speeds=[1,1,1,1]",
        "stragglers.step_s=0.5",
    )
    exp = _build(tiny_bert, tiny_data, tmp_path / "a", *extra, "rounds=1", "eval.every=1")
    steps = [-(-node["size"] // 4) for node in exp.partition_summary]  # batch 4
    assert len(set(steps)) > 1, steps  # the partition must tell the nodes apart
    record = engine.run(exp)[0]
    assert record["sim_round_s"] == pytest.approx(0.5 * max(steps))  # the node with the most data
    # a deadline between the node sizes: exactly the nodes with more steps sit the round out
    cut = sorted(set(steps))[-2]
    timed = _build(
        tiny_bert,
        tiny_data,
        tmp_path / "b",
        *extra,
        "rounds=1",
        "eval.every=1",
        f"stragglers.deadline={0.5 * cut}",
    )
    record = engine.run(timed)[0]
    assert record["late_nodes"] == sum(k > cut for k in steps)
    assert record["active_nodes"] == sum(k <= cut for k in steps)


def test_a_deadline_no_node_can_meet_is_refused_before_the_run(tiny_bert, tiny_data, tmp_path):
    from declora.config import ConfigError

    with pytest.raises(ConfigError, match=r"stragglers\.deadline=1\.5 is below every node's local work"):
        load_config(None, ["stragglers.deadline=1.5", "train.local_steps=2"])  # 2 steps x 1 s each
    # with epochs the steps follow the data, so the check waits for it (and still runs before training)
    with pytest.raises(ConfigError, match=r"the fastest, node \d: \d+ s = multiplier 1 x \d+ steps"):
        _build(
            tiny_bert,
            tiny_data,
            tmp_path / "e",
            "train.local_unit=epochs",
            "train.local_steps=1",
            "stragglers.deadline=1.5",
        )
    assert not (tmp_path / "e").exists()


def test_a_round_in_which_no_node_trained_logs_no_loss_not_nan(tiny_bert, tiny_data, tmp_path):
    exp = _build(tiny_bert, tiny_data, tmp_path / "a", "topology.node_dropout=0.95", "algorithm.name=fedavg")
    records = engine.run(exp)
    idle = [r for r in records if r["active_nodes"] == 0]
    assert idle, [r["active_nodes"] for r in records]  # seed 0 draws such a round
    assert all(
        r["train_loss"] is None for r in idle
    )  # null in metrics.jsonl, not NaN (which reads as divergence)
    assert all(r["train_loss"] > 0 for r in records if r["active_nodes"])


def test_asynchronous_gossip_where_no_node_is_slow_is_warned_as_synchronous(
    tiny_bert, tiny_data, tmp_path, caplog
):
    quiet = ("stragglers.asynchronous=true", "stragglers.max_staleness=2")
    with caplog.at_level("WARNING", logger="declora.stragglers"):
        _build(tiny_bert, tiny_data, tmp_path / "a", *quiet, "stragglers.speeds=[1,1,3,1]")
        assert "synchronous gossip" not in caplog.text
        _build(tiny_bert, tiny_data, tmp_path / "b", *quiet)
    assert "so every node publishes every round: this is synchronous gossip" in caplog.text


def test_asynchronous_at_staleness_zero_is_synchronous_gossip(tiny_bert, tiny_data, tmp_path):
    sync = _build(tiny_bert, tiny_data, tmp_path / "a", "stragglers.speeds=[1,1,3,1]")
    asyn = _build(
        tiny_bert, tiny_data, tmp_path / "b", "stragglers.speeds=[1,1,3,1]", "stragglers.asynchronous=true"
    )
    a, b = engine.run(sync), engine.run(asyn)
    assert _plain(a) == _plain(b)
    assert_same_tensors(sync, asyn)
    assert all(r["staleness_max"] == 0 for r in b)


GUARDS = {
    "median": ["robust.aggregator=median"],
    "sign_flip": ["attack.kind=sign_flip", "attack.nodes=[1]"],
    "dp": ["privacy.level=node", "privacy.noise_multiplier=0.5", "privacy.clip=0.5"],
}


@pytest.mark.parametrize("guard", GUARDS)
def test_guarded_asynchronous_at_staleness_zero_is_the_synchronous_guarded_run(
    guard, tiny_bert, tiny_data, tmp_path
):
    speeds = "stragglers.speeds=[1,1,3,1]"
    sync = _build(tiny_bert, tiny_data, tmp_path / "a", speeds, *GUARDS[guard])
    asyn = _build(
        tiny_bert, tiny_data, tmp_path / "b", speeds, "stragglers.asynchronous=true", *GUARDS[guard]
    )
    a, b = engine.run(sync), engine.run(asyn)
    assert _plain(a) == _plain(b)
    assert_same_tensors(sync, asyn)


def _honest_distance(a, b, honest=(0, 2, 3)) -> float:
    ta, tb = a.fed.tensors(), b.fed.tensors()
    return (
        sum(float((ta[k].detach()[i] - tb[k].detach()[i]).square().sum()) for k in ta for i in honest) ** 0.5
    )


def test_asynchronous_sign_flipper_is_contained_by_clipped_gossip_and_dp_counts_publications(
    tiny_bert, tiny_data, tmp_path
):
    """Node 2 publishes every third round; node 1 flips the sign of every copy it publishes."""
    asyn = ("stragglers.speeds=[1,1,3,1]", "stragglers.asynchronous=true", "stragglers.max_staleness=2")
    attack = ("attack.kind=sign_flip", "attack.nodes=[1]")
    runs = {
        "clean": (),
        "mean": attack,
        "clipped": (*attack, "robust.aggregator=clipped", "robust.clip_radius=0.05"),
        "private": ("privacy.level=node", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"),
    }
    exps = {
        name: _build(tiny_bert, tiny_data, tmp_path / name, *asyn, *extra) for name, extra in runs.items()
    }
    records = {name: engine.run(exp) for name, exp in exps.items()}
    hit = _honest_distance(exps["clean"], exps["mean"])
    kept = _honest_distance(exps["clean"], exps["clipped"])
    assert hit > 0.1  # the flipped copies reach the honest nodes
    assert kept < hit / 2, (kept, hit)
    assert "acc_honest_mean" in records["clipped"][-1]
    # three rounds: node 2 published once (round 2), every other node three times
    from declora.privacy import epsilon

    once, thrice = epsilon(1.0, 1.0, 1, 1e-5), epsilon(1.0, 1.0, 3, 1e-5)
    assert records["private"][-1]["privacy_epsilon"] == [thrice, thrice, once, thrice]


def test_asynchronous_run_is_stale_bounded_and_resumes_exactly(tiny_bert, tiny_data, tmp_path):
    extra = ("stragglers.speeds=[1,1,3,1]", "stragglers.asynchronous=true", "stragglers.max_staleness=2")
    full = _build(tiny_bert, tiny_data, tmp_path / "a", *extra)
    records = engine.run(full)
    # node 2 publishes every 3 rounds (rounds 2, 5, ...): its copy is 1, 2, 0 rounds old in rounds 0, 1, 2
    assert [r["staleness_max"] for r in records] == [1, 2, 0]
    assert [r["active_nodes"] for r in records] == [3, 3, 4]
    crashed = _build(tiny_bert, tiny_data, tmp_path / "b", *extra)

    crash_after_round(crashed, 2)  # logged, not checkpointed: round 1 is the last checkpoint
    resumed = build_experiment(crashed.cfg, crashed.run_dir)
    again = engine.run(resumed, resume=True)
    assert_same_tensors(full, resumed)
    assert _plain(again) == _plain(records[1:])
    assert [r["sim_s"] for r in again] == [r["sim_s"] for r in records[1:]]


def test_a_missed_deadline_keeps_the_node_out_of_the_server_round(tiny_bert, tiny_data, tmp_path):
    extra = ("algorithm.name=fedavg", "stragglers.speeds=[1,1,3,1]", "stragglers.deadline=4")
    exp = _build(tiny_bert, tiny_data, tmp_path / "a", *extra)
    before = {k: v.detach().clone() for k, v in exp.fed.tensors().items()}
    records = engine.run(exp)
    plain = engine.run(_build(tiny_bert, tiny_data, tmp_path / "b", "algorithm.name=fedavg"))
    for k, v in exp.fed.tensors().items():  # node 2 never trained nor uploaded; it holds the server model,
        assert not torch.equal(v.detach()[2], before[k][2]), k  # which it would fetch if it came back
        assert torch.equal(v.detach()[0], v.detach()[2]) and torch.equal(v.detach()[0], v.detach()[3]), k
    assert all(r["active_nodes"] == 3 for r in records)
    assert records[-1]["bytes_total"] * 4 == plain[-1]["bytes_total"] * 3  # 3 of 4 nodes up and down
