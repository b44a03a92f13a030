"""The per-round health check names the first non-finite (node, tensor) after communication."""

from __future__ import annotations

import pytest
import torch

from declora.config import load_config
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
