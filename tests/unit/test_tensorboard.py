"""TensorBoard mirror of the round records: the scalars written are the ones in the record."""

from __future__ import annotations

import math

import pytest

from declora.config import Config
from declora.trackers import TensorBoard, scalars, tag_of

pytestmark = pytest.mark.unit


def test_scalars_round_trip_through_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoard(Config(), tmp_path)
    records = [
        {"event": "round", "round": 1, "train_loss": 0.7, "bytes_total": 100, "wall_s": 1.5},
        {
            "event": "eval",
            "round": 2,
            "train_loss": 0.5,
            "acc_avg_factors": 0.8,
            "consensus_BA": math.nan,
            "bytes_total": 200,
            "nodes": [1, 2],
        },
    ]
    for record in records:
        board.log(scalars(record), record["round"])
    board.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/train_loss", "bytes/bytes_total", "accuracy/acc_avg_factors", "time/wall_s"} <= tags
    assert "consensus/consensus_BA" not in tags  # NaN is skipped
    loss = [(e.step, round(e.value, 6)) for e in events.Scalars("train/train_loss")]
    assert loss == [(1, 0.7), (2, 0.5)]
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, as text


def test_only_metric_families_get_tags():
    assert tag_of("acc_node_mean") == "accuracy/acc_node_mean"
    assert tag_of("cross_term") == "consensus/cross_term"
    assert tag_of("round") is None and tag_of("local_steps") is None
    assert scalars({"round": 3, "event": "eval", "local_steps": 5}) == {"run/local_steps": 5.0}
