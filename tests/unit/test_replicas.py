"""Data parallelism's pure parts (replicas.py): how a batch's rows are dealt to the ranks, and the one
buffer that carries every gradient and the loss through the all_reduce."""

from __future__ import annotations

import pytest
import torch

from declora.dist import Solo
from declora.replicas import replica_rows, sum_gradients

pytestmark = pytest.mark.unit


def test_rows_are_dealt_by_length_round_robin():
    lengths = [7, 3, 9, 3, 5, 8, 1]  # by length (ties by position): rows 6, 1, 3, 4, 0, 5, 2
    assert replica_rows(lengths, 0, 2) == [6, 3, 0, 2]
    assert replica_rows(lengths, 1, 2) == [1, 4, 5]
    for world in (1, 2, 3, 4, 8):
        shares = [replica_rows(lengths, k, world) for k in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(len(lengths)))  # each row once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert replica_rows([4, 2], 2, 3) == []  # more ranks than rows: an empty share


def test_gradients_and_loss_survive_the_buffer_and_none_stays_none():
    params = {k: torch.nn.Parameter(torch.randn(2, *shape)) for k, shape in (("a", (3, 4)), ("b", (5,)))}
    params["c"] = torch.nn.Parameter(torch.randn(2, 3))
    params["a"].grad, params["b"].grad = torch.randn(2, 3, 4), torch.randn(2, 5)
    expected = {k: params[k].grad.clone() for k in ("a", "b")}
    loss = sum_gradients(Solo(), params, ["a", "b", "c"], torch.tensor([0.25, 1.5]))
    torch.testing.assert_close(loss, torch.tensor([0.25, 1.5]), rtol=0, atol=0)
    for k, grad in expected.items():
        torch.testing.assert_close(params[k].grad, grad, rtol=0, atol=0)
    assert params["c"].grad is None  # no rank had one: the optimizer skips it, as in one process
