"""Evaluation modes (ALGORITHMS.md §8h): each node's own model, the averaged-factor model, the
averaged-product model and, for server algorithms, the server model; plus consensus metrics.

In a multi-process run each rank scores its own nodes, and the consensus and server models (built from
every node's factors, gathered: adapter-sized) are scored on each rank's share of the examples; the
correct counts are summed, so every number equals the one-process run's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from declora.experiment import EvalSet, Experiment
from declora.metrics import consensus_metrics, mean_std
from declora.model import Federation, averaged_factors, averaged_product
from declora.train import accuracy_per_node, predict


def _accuracy_of(exp: Experiment, stacked: dict[str, torch.Tensor], data: EvalSet) -> float:
    share = exp.group.share_of(len(data.labels))
    token_ids, labels = data.token_ids[share], torch.as_tensor(data.labels[share])
    correct = torch.zeros((), dtype=torch.long)
    if len(token_ids):
        with exp.fed.override(stacked):
            rows = torch.zeros(len(token_ids), dtype=torch.long)
            preds = predict(exp.fed, token_ids, rows, exp.pad_id, exp.cfg.train.tokens_per_chunk)
        correct = (preds == labels).sum()
    total = exp.group.all_sum(correct)
    return float(total.float() / len(data.labels))  # float32, as a mean of 0/1 floats


@contextmanager
def all_nodes(fed: Federation, stacked: dict[str, torch.Tensor]) -> Iterator[Federation]:
    """``fed`` seen with every node's tensors (n, ...) in place of this process's rows, for algorithm
    code that reads ``fed.tensors()`` (server_tensors); restored on exit."""
    params = fed.tensors()
    saved, n = {k: p.data for k, p in params.items()}, fed.n
    try:
        for k, p in params.items():
            p.data = stacked[k]
        fed.n = next(iter(stacked.values())).shape[0]
        yield fed
    finally:
        for k, p in params.items():
            p.data = saved[k]
        fed.n = n


def evaluate(exp: Experiment) -> dict[str, float]:
    fed, chunk, group = exp.fed, exp.cfg.train.tokens_per_chunk, exp.group
    own = accuracy_per_node(fed, exp.node_eval.token_ids, exp.node_eval.labels, fed.n, exp.pad_id, chunk)
    per_node = group.gather_nodes(own)  # (n,)
    mean, std = mean_std(per_node)
    out: dict[str, float] = {
        "acc_node_mean": mean,
        "acc_node_std": std,
        "acc_node_min": float(per_node.min()),
        "acc_node_max": float(per_node.max()),
    }
    stacked = {k: group.gather_nodes(v.detach()) for k, v in fed.tensors().items()}  # (n, ...) each
    if exp.n > 1:
        out["acc_avg_factors"] = _accuracy_of(exp, averaged_factors(stacked), exp.consensus_eval)
        out["acc_avg_product"] = _accuracy_of(exp, averaged_product(stacked), exp.consensus_eval)
    else:
        out["acc_avg_factors"] = out["acc_avg_product"] = _accuracy_of(exp, stacked, exp.consensus_eval)
    if group.world == 1:
        server = exp.algorithm.server_tensors(fed)
    else:
        with all_nodes(fed, stacked):
            server = exp.algorithm.server_tensors(fed)
    if server is not None:
        out["acc_server"] = _accuracy_of(exp, server, exp.consensus_eval)
    factors = {name: (stacked[f"{name}.lora_A"], stacked[f"{name}.lora_B"]) for name in fed.lora}
    out.update(consensus_metrics(factors, fed.scale))
    return out
