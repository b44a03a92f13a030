"""Fixed evaluation sets: the held-out split and the scored examples come from eval.seed, so two training
seeds score the very same reviews; another eval.seed scores others."""

from __future__ import annotations

import pytest

from declora.config import load_config
from declora.experiment import build_experiment

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _eval_sets(tiny_bert, tmp_path, *extra):
    cfg = load_config(
        None,
        [
            f"model.name={tiny_bert}",
            "model.rank=2",
            "model.max_length=16",
            "nodes=3",
            "data.train_limit=60",
            "data.test_limit=80",
            "eval.node_examples=20",
            "eval.consensus_examples=50",
            "export=none",
            f"run_dir={tmp_path}",
            *extra,
        ],
    )
    exp = build_experiment(cfg)
    return exp.node_eval, exp.consensus_eval, exp.parts


def test_two_training_seeds_score_the_same_test_examples(tiny_bert, tmp_path):
    node0, cons0, parts0 = _eval_sets(tiny_bert, tmp_path / "a", "seed=0")
    node1, cons1, parts1 = _eval_sets(tiny_bert, tmp_path / "b", "seed=1")
    assert node0.token_ids == node1.token_ids and (node0.labels == node1.labels).all()
    assert cons0.token_ids == cons1.token_ids and (cons0.labels == cons1.labels).all()
    assert len(node0.labels) == 20 and len(cons0.labels) == 50
    differ = [len(a) != len(b) or (a != b).any() for a, b in zip(parts0, parts1, strict=True)]
    assert any(differ)  # the training seeds do differ: other partitions
    node2, cons2, _ = _eval_sets(tiny_bert, tmp_path / "c", "seed=0", "eval.seed=1")
    assert cons2.token_ids != cons0.token_ids
    assert node2.token_ids != node0.token_ids  # eval.seed draws the nodes' sets too
