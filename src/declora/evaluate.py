"""Evaluation modes (ALGORITHMS.md §8h): each node's own model, the averaged-factor model, the
averaged-product model and, for server algorithms, the server model; plus consensus metrics."""

from __future__ import annotations

import torch

from declora.experiment import EvalSet, Experiment
from declora.metrics import consensus_metrics, mean_std
from declora.model import averaged_factors, averaged_product
from declora.train import accuracy_per_node


def _accuracy_of(exp: Experiment, stacked: dict[str, torch.Tensor], data: EvalSet) -> float:
    with exp.fed.override(stacked):
        acc = accuracy_per_node(
            exp.fed, data.token_ids, data.labels, 1, exp.pad_id, exp.cfg.train.tokens_per_chunk
        )
    return float(acc[0])


def evaluate(exp: Experiment) -> dict[str, float]:
    fed, chunk = exp.fed, exp.cfg.train.tokens_per_chunk
    per_node = accuracy_per_node(fed, exp.node_eval.token_ids, exp.node_eval.labels, fed.n, exp.pad_id, chunk)
    mean, std = mean_std(per_node)
    out: dict[str, float] = {
        "acc_node_mean": mean,
        "acc_node_std": std,
        "acc_node_min": float(per_node.min()),
        "acc_node_max": float(per_node.max()),
    }
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    if fed.n > 1:
        out["acc_avg_factors"] = _accuracy_of(exp, averaged_factors(stacked), exp.consensus_eval)
        out["acc_avg_product"] = _accuracy_of(exp, averaged_product(stacked), exp.consensus_eval)
    else:
        out["acc_avg_factors"] = out["acc_avg_product"] = _accuracy_of(exp, stacked, exp.consensus_eval)
    server = exp.algorithm.server_tensors(fed)
    if server is not None:
        out["acc_server"] = _accuracy_of(exp, server, exp.consensus_eval)
    out.update(consensus_metrics(fed.factors(), fed.scale))
    return out
