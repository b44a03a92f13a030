"""The F1 score and Matthews' correlation of label 1 that two-label classification logs beside its
accuracy (f1_*, mcc_*)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from declora.config import ConfigError, load_config
from declora.tasks import SequenceClassification


def logits_saying(predicted: torch.Tensor, labels: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(predicted, labels).float()


def test_f1_of_label_1_from_summed_row_stats():
    task = SequenceClassification(None, 0, num_labels=2)
    said = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
    true = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    stats = task.row_stats(logits_saying(said, 2), None, None, true)
    assert task.width == 5 and stats.shape == (8, 5)
    totals = stats.sum(0)
    # right on rows 0, 2, 4, 5, 6; label 1 said and true on 0, 4, 6 (tp 3), said only on 1, 7 (fp 2),
    # true only on 3 (fn 1): F1 = 2·3 / (2·3 + 2 + 1)
    assert float(task.finalize(totals)) == 5 / 8
    assert float(task.extras(totals)["f1"]) == pytest.approx(2 / 3)
    # tn 2 (rows 2, 5): MCC = (3·2 − 2·1) / sqrt((3+2)(3+1)(2+2)(2+1))
    assert float(task.extras(totals)["mcc"]) == pytest.approx(4 / 240**0.5)
    # per-chunk and per-node sums give the same number (evaluation sums chunks and processes)
    assert torch.equal(stats[:3].sum(0) + stats[3:].sum(0), totals)
    per_node = torch.stack([stats[:4].sum(0), stats[4:].sum(0)])  # (nodes, width): one F1 each
    # node 0: tp 1, fp 1, fn 1, tn 1; node 1: tp 2, fp 1, fn 0, tn 1
    torch.testing.assert_close(task.extras(per_node)["f1"], torch.tensor([2 / 4, 4 / 5]))
    torch.testing.assert_close(task.extras(per_node)["mcc"], torch.tensor([0.0, 2 / 12**0.5]))


def test_no_label_1_said_or_true_is_an_f1_of_zero_and_three_labels_log_none():
    task = SequenceClassification(None, 0, num_labels=2)
    zeros = torch.zeros(4, dtype=torch.long)
    totals = task.row_stats(logits_saying(zeros, 2), None, None, zeros).sum(0)
    assert float(task.finalize(totals)) == 1.0 and float(task.extras(totals)["f1"]) == 0.0
    assert float(task.extras(totals)["mcc"]) == 0.0  # one label neither said nor true: no correlation
    three = SequenceClassification(None, 0, num_labels=3)
    stats = three.row_stats(logits_saying(torch.tensor([0, 1, 2]), 3), None, None, torch.tensor([0, 1, 1]))
    assert three.width == 2 and stats.shape == (3, 2) and three.extras(stats.sum(0)) == {}


def test_an_f1_headline_is_refused_where_it_is_not_logged():
    with pytest.raises(ConfigError, match="not measured for task.kind=causal_lm"):
        load_config(None, ["eval.headline=f1_avg_factors", "task.kind=causal_lm", "data.dataset=x.txt"])
    assert load_config(None, ["eval.headline=f1_node_mean"]).eval.headline == "f1_node_mean"


@pytest.mark.integration
def test_a_grid_ranked_by_f1_on_more_than_two_labels_is_refused_before_any_cell(tmp_path, capsys):
    import yaml

    from declora.cli import main

    grid = tmp_path / "grid.yaml"
    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "base": str(smoke),
                "out": str(tmp_path / "out"),
                "overrides": ["data.dataset=bbc_news", "rounds=1"],
                "grid": {"algorithm.name": ["dec_lora", "local"]},
                "seeds": [0],
                "metric": "f1_avg_factors",
            }
        )
    )
    assert main(["compare", str(grid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metric='f1_avg_factors': the F1 and Matthews' correlation are logged for two labels" in err
    assert "rank by acc_avg_factors" in err
    assert not (tmp_path / "out").exists()
