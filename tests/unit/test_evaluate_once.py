"""A consensus model is scored once: when every node holds the same tensors, the averaged factors, the
averaged product and an equal server model are one model, and evaluate() reuses its score."""

from __future__ import annotations

import pytest
from unit_helpers import perturb, tiny_experiment

import declora.evaluate as evaluate_module
from declora.model import averaged_factors, averaged_product, fold_middle

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize(
    ("algorithm", "same", "passes"),
    [("fedavg", True, 1), ("dec_lora", True, 1), ("dec_lora", False, 2)],
)
def test_one_model_is_scored_once_with_the_numbers_of_separate_passes(
    tiny_bert, tiny_data, tmp_path, monkeypatch, algorithm, same, passes
):
    overrides = (f"algorithm.name={algorithm}", "eval.node_examples=8", "data.test_limit=40")
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, *overrides)
    perturb(exp, same=same)  # B != 0; the same on every node, or not
    consensus_passes = []
    totals_of = evaluate_module._totals_of

    def counted(exp_, stacked, data):
        consensus_passes.extend([1] if data is exp_.consensus_eval else [])
        return totals_of(exp_, stacked, data)

    monkeypatch.setattr(evaluate_module, "_totals_of", counted)
    out = evaluate_module.evaluate(exp)
    assert len(consensus_passes) == passes

    monkeypatch.setattr(evaluate_module, "_totals_of", totals_of)
    stacked = fold_middle({k: v.detach() for k, v in exp.fed.tensors().items()})
    score = lambda model: evaluate_module._metric_of(exp, model, exp.consensus_eval)  # noqa: E731
    assert out["acc_avg_factors"] == score(averaged_factors(stacked))
    assert out["acc_avg_product"] == score(averaged_product(stacked))
    server = exp.algorithm.server_tensors(exp.fed)
    assert (server is not None) == (algorithm == "fedavg")
    if server is not None:
        assert out["acc_server"] == score(server)
