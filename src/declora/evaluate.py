"""Evaluation modes (docs/algorithms.md: evaluation protocols): each node's own model, the averaged-factor
model, the averaged-product model and, for server algorithms, the server model; plus consensus metrics.

The metric is the task's (``declora.tasks``): accuracy (keys ``acc_*``) or, for causal language
modelling and instruction data, perplexity (keys ``ppl_*``); a task's extras come from the same pass
(instruction data: greedy exact match, keys ``em_*``, beside each perplexity; two-label classification:
the F1 score and Matthews' correlation of label 1, keys ``f1_*`` and ``mcc_*``, beside each accuracy).

In a multi-process run each rank scores its own nodes, and the consensus and server models (built from
every node's factors, gathered: adapter-sized) are scored on each rank's share of the examples; the
metric's (sum, count) pairs are summed, so every number equals the one-process run's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from declora.experiment import EvalSet, Experiment
from declora.metrics import consensus_metrics, head_disagreement, mean_std
from declora.model import Federation, as_run, averaged_factors, averaged_product, fold_middle
from declora.report import METRIC_PREFIXES, VALIDATION
from declora.train import row_stats, totals_per_node


def _totals_of(exp: Experiment, stacked: dict[str, torch.Tensor], data: EvalSet) -> torch.Tensor:
    """The task's stats (width,) of the model ``stacked`` on ``data``, summed over processes."""
    share = exp.group.share_of(len(data.labels))
    token_ids, labels = data.token_ids[share], torch.as_tensor(data.labels[share])
    totals = torch.zeros(exp.task.width)
    if len(token_ids):
        with exp.fed.override(stacked):
            rows = torch.zeros(len(token_ids), dtype=torch.long)
            chunk = exp.trainer.tokens_per_chunk
            totals = row_stats(exp.fed, token_ids, labels, rows, exp.pad_id, chunk, exp.task).sum(0)
    return exp.group.all_sum(totals)


def _metric_of(exp: Experiment, stacked: dict[str, torch.Tensor], data: EvalSet) -> float:
    return float(exp.task.finalize(_totals_of(exp, stacked, data)))  # summed over processes, then finalized


def scores_of(exp: Experiment, stacked: dict[str, torch.Tensor]) -> dict[str, float]:
    """The task's metric (``acc`` or ``ppl``) of the model ``stacked`` on the consensus examples, and its
    extras (``em``: instruction exact match; ``f1``, ``mcc``: two labels), from one pass."""
    totals = _totals_of(exp, stacked, exp.consensus_eval)
    out = {exp.task.metric: float(exp.task.finalize(totals))}
    out.update({k: float(v) for k, v in exp.task.extras(totals).items()})
    return out


def _scored(exp: Experiment, stacked: dict[str, torch.Tensor], mode: str) -> dict[str, float]:
    """``scores_of`` under the evaluation keys of ``mode``: ``acc_avg_factors``, ``f1_avg_factors``..."""
    return {f"{k}_{mode}": v for k, v in scores_of(exp, stacked).items()}


@contextmanager
def with_all_nodes(fed: Federation, stacked: dict[str, torch.Tensor]) -> Iterator[Federation]:
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


def _rows_agree(stacked: dict[str, torch.Tensor]) -> bool:
    """Every node's row of every tensor is bit for bit the first node's."""
    return all(torch.equal(v, v[:1].expand_as(v)) for v in stacked.values())


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # equal also means same shape


def _renamed(scored: dict[str, float], mode: str) -> dict[str, float]:
    """Scores of the avg_factors model under another mode's keys (the same model)."""
    return {k.replace("_avg_factors", f"_{mode}"): v for k, v in scored.items()}


def evaluate_all(exp: Experiment) -> dict[str, Any]:
    """``evaluate`` on the test rows and, with data.validation_fraction, its metrics on the validation
    rows too, under ``val_`` keys (``val_acc_avg_factors``): the numbers a round is chosen by."""
    out = evaluate(exp)
    if exp.validation is not None:
        test = exp.consensus_eval, exp.node_eval
        exp.consensus_eval, exp.node_eval = exp.validation
        try:
            on_validation = evaluate(exp)
        finally:
            exp.consensus_eval, exp.node_eval = test
        out.update(
            {
                VALIDATION + k: v
                for k, v in on_validation.items()
                if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float))
            }
        )
    return out


def evaluate(exp: Experiment) -> dict[str, Any]:
    fed, chunk, group = exp.fed, exp.trainer.tokens_per_chunk, exp.group
    data, m = exp.node_eval, exp.task.metric  # m: "acc" | "ppl"
    own = totals_per_node(fed, data.token_ids, data.labels, fed.n, exp.pad_id, chunk, exp.task)
    per_node = group.gather_nodes(exp.task.finalize(own))  # (n,)
    mean, std = mean_std(per_node)
    out: dict[str, float | list[float]] = {
        f"{m}_node_mean": mean,
        f"{m}_node_std": std,
        f"{m}_node_min": float(per_node.min()),
        f"{m}_node_max": float(per_node.max()),
        f"{m}_node": [float(v) for v in per_node],  # every node's own, in node order (adapter cards)
    }
    for key, values in exp.task.extras(own).items():  # (local nodes,) each
        out[f"{key}_node_mean"] = float(group.gather_nodes(values).mean())
    raw = {k: group.gather_nodes(v.detach()) for k, v in fed.tensors().items()}  # (n, ...) each
    gate = fed.rank_mask.gate  # (n, r) rank gates (HetLoRA, FlexLoRA): folded into what is scored
    gate = None if gate is None else group.gather_nodes(gate.detach())
    stacked = as_run(fed, fold_middle(raw), gate)  # Fed-SB: B R in place of B; every metric reads B A
    # Each consensus pass scores the whole held-out set, so a model scored once is not scored again: when
    # every node holds the same tensors (server methods between rounds, one node) the averaged factors,
    # the averaged product and a server model equal to them are one model.
    one_model = exp.n == 1 or _rows_agree(stacked)
    # one model: its first row exactly (the mean of equal rows can differ from them in the last bit)
    consensus = {k: v[:1] for k, v in stacked.items()} if one_model else averaged_factors(stacked)
    scored = _scored(exp, consensus, "avg_factors")
    out.update(scored)
    if one_model:
        out.update(_renamed(scored, "avg_product"))
    else:
        out.update(_scored(exp, averaged_product(stacked), "avg_product"))
    if group.world == 1:
        server = exp.algorithm.server_tensors(fed)
    else:
        with with_all_nodes(fed, raw):
            server = exp.algorithm.server_tensors(fed)
    if server is not None:
        same = one_model and _same_tensors(server, consensus)
        out.update(_renamed(scored, "server") if same else _scored(exp, server, "server"))
    factors = {name: (stacked[f"{name}.lora_A"], stacked[f"{name}.lora_B"]) for name in fed.lora}
    out.update(consensus_metrics(factors, fed.scale))
    if fed.heads:
        out["consensus_head"] = head_disagreement({k: stacked[k] for k in fed.tensors(("head",))})
    if exp.honest is not None:
        out.update(honest_metrics(exp, per_node, stacked, factors))
    return out


def honest_metrics(
    exp: Experiment,
    per_node: torch.Tensor,
    stacked: dict[str, torch.Tensor],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """Under attack (declora.attack), the same numbers over the honest nodes only: their own metric's
    mean and min, their averaged factors' metric, and their consensus."""
    honest, m = exp.honest, exp.task.metric  # (n,) bool
    assert honest is not None
    mine = per_node[honest.to(per_node.device)]
    out = {f"{m}_honest_mean": float(mine.mean()), f"{m}_honest_min": float(mine.min())}
    if exp.n > 1:
        kept = {k: v[honest.to(v.device)] for k, v in stacked.items()}
        out[f"{m}_honest_avg_factors"] = _metric_of(exp, averaged_factors(kept), exp.consensus_eval)
    consensus = consensus_metrics(factors, exp.fed.scale, online=honest)
    out.update({f"{k}_honest": v for k, v in consensus.items()})
    return out
