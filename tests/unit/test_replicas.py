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


class _TwoRanks(Solo):
    """Rank 0 of a two-rank group whose other rank's flat buffer is given: ``all_sum`` adds it, once."""

    def __init__(self, other: torch.Tensor) -> None:
        super().__init__()
        self.other, self.calls = other, 0

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert x.shape == self.other.shape  # both ranks build the same layout
        return x + self.other


def test_gradients_and_loss_are_summed_over_ranks_and_none_stays_none():
    """The buffer is every named gradient flattened in ``names`` order (zeros where a rank has none),
    then one has-a-gradient flag per name, then the per-node loss; one all_sum adds the ranks' buffers.
    Here "a" has a gradient on this rank only, "c" on the other rank only, "b" on both, "d" on neither."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (2, 3, 4), "b": (2, 5), "c": (2, 3), "d": (2, 2)}
    params = {k: torch.nn.Parameter(torch.randn(shape, generator=g)) for k, shape in shapes.items()}
    ga, gb = torch.randn(shapes["a"], generator=g), torch.randn(shapes["b"], generator=g)
    params["a"].grad, params["b"].grad = ga.clone(), gb.clone()
    gb_other, gc_other = torch.randn(shapes["b"], generator=g), torch.randn(shapes["c"], generator=g)
    loss, loss_other = torch.tensor([0.25, 1.5]), torch.tensor([2.0, -0.5])
    other = torch.cat(  # the other rank's buffer, written out by hand
        [torch.zeros(2 * 3 * 4), gb_other.reshape(-1), gc_other.reshape(-1), torch.zeros(2 * 2)]
        + [torch.tensor([0.0, 1.0, 1.0, 0.0]), loss_other]
    )
    group = _TwoRanks(other)
    summed = sum_gradients(group, params, ["a", "b", "c", "d"], loss)
    assert group.calls == 1  # one all_reduce carries everything
    torch.testing.assert_close(summed, torch.tensor([2.25, 1.0]), rtol=0, atol=0)
    torch.testing.assert_close(params["a"].grad, ga, rtol=0, atol=0)
    torch.testing.assert_close(params["b"].grad, gb + gb_other, rtol=0, atol=0)
    assert params["c"].grad is not None  # only the other rank had one: it arrives here too
    torch.testing.assert_close(params["c"].grad, gc_other, rtol=0, atol=0)
    assert params["d"].grad is None  # no rank had one: the optimizer skips it, as in one process


def test_one_process_keeps_its_gradients_and_loss():
    """With ``Solo`` (one process) the sum is the identity: gradients and loss come back unchanged."""
    params = {k: torch.nn.Parameter(torch.randn(2, *shape)) for k, shape in (("a", (3, 4)), ("b", (5,)))}
    params["c"] = torch.nn.Parameter(torch.randn(2, 3))
    params["a"].grad, params["b"].grad = torch.randn(2, 3, 4), torch.randn(2, 5)
    expected = {k: params[k].grad.clone() for k in ("a", "b")}
    loss = sum_gradients(Solo(), params, ["a", "b", "c"], torch.tensor([0.25, 1.5]))
    torch.testing.assert_close(loss, torch.tensor([0.25, 1.5]), rtol=0, atol=0)
    for k, grad in expected.items():
        torch.testing.assert_close(params[k].grad, grad, rtol=0, atol=0)
    assert params["c"].grad is None
