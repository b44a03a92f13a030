"""train.logit_adjustment: each node's loss reads logits + tau * log(its own label frequencies)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from declora.config import ConfigError, ModelConfig, load_config
from declora.model import build_federation
from declora.optim import NodeAdamW
from declora.train import LocalTrainer, NodeStreams, label_prior_offsets

pytestmark = pytest.mark.unit


def test_offsets_are_tau_times_the_log_of_each_nodes_smoothed_label_frequencies():
    labels = np.array([0, 0, 1, 1, 2])
    parts = [np.array([0, 1, 2]), np.array([3])]  # node 1 saw label 1 only; nobody saw label 2 there
    offsets = label_prior_offsets(parts, labels, num_labels=3, tau=0.5)
    expected = 0.5 * torch.log(torch.tensor([[3 / 6, 2 / 6, 1 / 6], [1 / 4, 2 / 4, 1 / 4]]))
    torch.testing.assert_close(offsets, expected)


def _train_one_node(tiny_bert, token_ids, labels, tau: float) -> float:
    """Mean probability of label 1 on fresh texts after training one node on ``labels``."""
    fed = build_federation(ModelConfig(name=str(tiny_bert), rank=4, alpha=8), n=1, num_labels=2)
    parts = [np.arange(len(labels))]
    opt = NodeAdamW(dict(fed.tensors()), {k: 1e-2 for k in fed.tensors()})
    offsets = label_prior_offsets(parts, labels, 2, tau) if tau else None
    trainer = LocalTrainer(
        fed, opt, NodeStreams(parts, batch_size=16, seed=0), token_ids, labels, pad_id=0,
        max_grad_norm=1.0, tokens_per_chunk=4096, logit_offsets=offsets,
    )  # fmt: skip
    trainer.local_work(torch.ones(1, dtype=torch.bool), list(fed.tensors()), amount=30, unit="steps")
    g = torch.Generator().manual_seed(1)
    fresh = torch.randint(1000, 3000, (200, 12), generator=g)
    fed.set_training(False)
    with torch.no_grad(), fed.route(torch.zeros(200, dtype=torch.long)):
        return float(fed(fresh, torch.ones_like(fresh)).softmax(-1)[:, 1].mean())


def test_a_node_whose_texts_say_nothing_learns_its_prior_only_without_the_adjustment(tiny_bert):
    # random tokens carry no evidence; 90 % of the labels are 1: the plain loss learns "say 1", the
    # adjusted loss learns that the text says nothing (the prior is the offsets' to supply)
    g = np.random.default_rng(0)
    token_ids = [list(g.integers(1000, 3000, size=12)) for _ in range(480)]
    labels = (g.random(480) < 0.9).astype(np.int64)
    assert _train_one_node(tiny_bert, token_ids, labels, tau=0.0) > 0.8
    assert abs(_train_one_node(tiny_bert, token_ids, labels, tau=1.0) - 0.5) < 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.logit_adjustment=-1"], "train.logit_adjustment=-1.0 is out of range; allowed: [0, 10]"),
        (
            ["task.kind=causal_lm", "model.head=none", "train.logit_adjustment=1"],
            "train.logit_adjustment=1.0 adjusts a classifier head's logits "
            "(task.kind=sequence_classification); task.kind=causal_lm has none",
        ),
        (
            ["privacy.level=example", "privacy.noise_multiplier=1", "train.logit_adjustment=1"],
            "train.logit_adjustment=1.0 with privacy.level=example: the offsets come from each node's label",
        ),
    ],
)
def test_where_the_adjustment_cannot_apply_it_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
