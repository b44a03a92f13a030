"""The per-round health check names the first non-finite (node, tensor) after communication."""

from __future__ import annotations

import pytest
import torch

from declora.config import load_config
from declora.dist import Layout
from declora.engine import NumericalError, check_health
from declora.experiment import build_experiment

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def test_a_non_finite_tensor_is_named_with_its_node(tiny_bert, tmp_path):
    overrides = [
        f"model.name={tiny_bert}",
        "model.rank=2",
        "nodes=3",
        "data.train_limit=30",
        "data.test_limit=10",
    ]
    exp = build_experiment(load_config(None, [*overrides, "export=none", f"run_dir={tmp_path}"]))
    loss, active = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    check_health(exp, 4, loss, active)  # all finite: nothing to say
    names = list(exp.fed.tensors())
    with torch.no_grad():
        exp.fed.tensors()[names[3]][2].fill_(float("inf"))
        exp.fed.tensors()[names[1]][1, 0] = float("nan")  # an earlier tensor wins, then the lower node
    with pytest.raises(
        NumericalError, match=rf"^round 5: node 1: tensor {names[1]} after communication is NaN"
    ):
        check_health(exp, 4, loss, active, saved=3)
    with pytest.raises(NumericalError, match=r"node 0: its training loss .* \(last checkpoint: round 3\)"):
        check_health(exp, 4, torch.tensor([float("nan"), 0.0, 0.0]), active, saved=3)


class _Rank:
    """Rank ``rank`` of a launch that hosts the nodes of ``layout``, seen by check_health: its all_max
    returns ``agreed`` (what the ranks' reduction gives), after keeping what this rank sent."""

    def __init__(self, layout: Layout, rank: int, agreed: torch.Tensor | None = None) -> None:
        self.layout, self.agreed, self.sent = layout, agreed, None
        self.nodes = torch.tensor(list(layout.nodes_of(rank)))

    def gather_nodes(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the test passes every node's flags

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        self.sent = x
        return x if self.agreed is None else self.agreed


def test_node_sliced_ranks_name_what_one_process_names(tiny_bert, tmp_path, monkeypatch):
    """Node 0 (on rank 0) has a NaN in an earlier tensor than node 2 (on rank 1): one process names node
    0, and so do the ranks once they reduce what each found, though rank 1's node index is larger."""
    overrides = [f"model.name={tiny_bert}", "model.rank=2", "nodes=3", "data.train_limit=30"]
    exp = build_experiment(load_config(None, [*overrides, "data.test_limit=10", f"run_dir={tmp_path}"]))
    loss, active = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    names = list(exp.fed.tensors())
    with torch.no_grad():
        exp.fed.tensors()[names[1]][0, 0] = float("nan")
        exp.fed.tensors()[names[3]][2].fill_(float("inf"))
    with pytest.raises(NumericalError) as alone:
        check_health(exp, 0, loss, active)
    assert f"node 0: tensor {names[1]} after" in str(alone.value)
    full = {k: v.detach() for k, v in exp.fed.tensors().items()}
    layout = Layout((1, 2))

    def on_rank(rank: _Rank) -> str:
        hosted = rank.nodes
        monkeypatch.setattr(exp, "group", rank)
        monkeypatch.setattr(exp.fed, "tensors", lambda *a, **k: {n: v[hosted] for n, v in full.items()})
        with pytest.raises(NumericalError) as stopped:
            check_health(exp, 0, loss, active)
        return str(stopped.value)

    alone_per_rank = [_Rank(layout, r) for r in (0, 1)]
    for rank in alone_per_rank:  # each rank on its own: what it sends to the reduction
        on_rank(rank)
    agreed = torch.stack([rank.sent for rank in alone_per_rank]).max()
    assert [on_rank(_Rank(layout, r, agreed)) for r in (0, 1)] == [str(alone.value)] * 2
