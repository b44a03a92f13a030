"""Batched local training and evaluation of all nodes at once.

A local step lays every active node's minibatch end to end. The rows are sorted by length and cut into
micro-batches under a token budget, each padded only to its own longest row: the padding a union batch
would waste is gone, and the result is the same as one big batch (the loss is a per-row weighted sum,
weight 1/b_i for node i's rows, so node i's gradient is the gradient of its own mean loss). What a row's
loss and metric are is the task's (``declora.tasks``): a classifier head's cross-entropy by default.

Under label skew a node's classifier learns its own label prior along with the evidence, and the average
of such heads carries a prior no node's data had. ``train.logit_adjustment`` (tau) trains every node on
``logits + tau * log(prior_i)``, prior_i the label frequencies of node i's own data (the logit-adjusted
loss; balanced softmax at tau = 1): the prior is then supplied by the loss, so the model learns the
evidence alone and predicts as if every label were equally likely. Only training sees the offsets;
evaluation and the exported adapter read the plain logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from declora.dist import Solo
from declora.lora import row_gradients
from declora.model import Federation
from declora.optim import NodeOptimizer, clip_per_node
from declora.privacy import ExampleDP
from declora.replicas import replica_rows, sum_gradients
from declora.seeding import numpy_rng, seed_for
from declora.tasks import SequenceClassification, Task

CLASSIFY: Task = SequenceClassification(tokenizer=None, max_length=0)  # its losses need no tokenizer


class NodeStreams:
    """Each node's minibatches: its indices reshuffled every epoch from (seed, node, epoch).

    ``parts[k]`` belongs to global node ``offset + k``: a process hosting a slice of the nodes draws
    exactly the batches the one-process run draws for them. ``secret``: ``seed`` is not the run's but a
    draw of the operating system's entropy (DP-SGD with privacy.secure_noise, whose subsampling must stay
    unknown to others); it is kept in this process's checkpoint, so a resumed run goes on with its epochs.
    """

    def __init__(
        self, parts: list[np.ndarray], batch_size: int, seed: int, offset: int = 0, secret: bool = False
    ) -> None:
        self.parts, self.batch_size, self.seed, self.offset = parts, batch_size, seed, offset
        self.secret = secret
        self.epoch = np.zeros(len(parts), dtype=np.int64)
        self.pos = np.zeros(len(parts), dtype=np.int64)

    def steps_per_epoch(self, node: int) -> int:
        return -(-len(self.parts[node]) // self.batch_size)

    def next_batch(self, node: int) -> np.ndarray:
        key = (self.seed, "stream", self.offset + node, int(self.epoch[node]))
        order = numpy_rng(*key).permutation(len(self.parts[node]))
        start = int(self.pos[node])
        batch = self.parts[node][order[start : start + self.batch_size]]
        self.pos[node] = start + len(batch)
        if self.pos[node] >= len(order):  # epoch done: the next batch starts a fresh shuffle
            self.epoch[node] += 1
            self.pos[node] = 0
        return batch

    def row_keys(self, node: int, epoch: int, pos: int, count: int) -> np.ndarray:
        """The dropout keys (count,) of the rows drawn at ``pos`` of ``node``'s epoch ``epoch``: one per
        example drawn, the same in every process, micro-batch and resume (declora.keyed_dropout)."""
        base = seed_for(self.seed, "dropout", self.offset + node, epoch, pos) >> 1  # base + count < 2**63
        return base + np.arange(count, dtype=np.int64)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch.tolist(), "pos": self.pos.tolist()}
        return {**state, "seed": self.seed} if self.secret else state

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch[:], self.pos[:] = state["epoch"], state["pos"]
        if self.secret:
            self.seed = int(state["seed"])


@dataclass
class Rows:
    """Examples of several nodes laid end to end: token ids, label, owning node, loss weight and dropout
    key per row."""

    ids: list[list[int]]
    labels: Tensor  # (rows,)
    nodes: Tensor  # (rows,) long
    weights: Tensor  # (rows,)
    keys: Tensor | None = None  # (rows,) long: NodeStreams.row_keys; None: trained without LoRA dropout

    def take(self, index: list[int]) -> Rows:
        """The rows at ``index``, in that order."""
        at = torch.as_tensor(index, dtype=torch.long)
        keys = None if self.keys is None else self.keys[at]
        return Rows([self.ids[k] for k in index], self.labels[at], self.nodes[at], self.weights[at], keys)


def micro_batches(lengths: list[int], tokens_per_chunk: int) -> list[list[int]]:
    """Row indices grouped by length so each group, padded to its longest row, fits the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest row is always the longest of its chunk
        if current and (len(current) + 1) * lengths[i] > tokens_per_chunk:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def pad(ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for k, x in enumerate(ids):
        input_ids[k, : len(x)] = torch.as_tensor(x)
        mask[k, : len(x)] = 1
    return input_ids, mask


def label_prior_offsets(parts: list[np.ndarray], labels: np.ndarray, num_labels: int, tau: float) -> Tensor:
    """tau * log of each node's label frequencies (n, num_labels), from its rows ``parts[i]``.

    The counts are add-one smoothed: a label a node never saw gets a finite offset (its most negative one)
    rather than log 0, so every logit stays finite and keeps a gradient."""
    counts = np.stack([np.bincount(labels[part], minlength=num_labels) for part in parts]) + 1.0
    return tau * torch.log(torch.as_tensor(counts / counts.sum(1, keepdims=True), dtype=torch.float32))


def accumulate_gradients(
    fed: Federation,
    rows: Rows,
    pad_id: int,
    tokens_per_chunk: int,
    task: Task = CLASSIFY,
    dp: ExampleDP | None = None,
    logit_offsets: Tensor | None = None,
) -> Tensor:
    """Forward/backward every row in micro-batches; returns each node's mean loss (n,), on the CPU.

    Each micro-batch goes to ``fed.device``; the per-node bookkeeping of the engine stays on the CPU.
    With ``dp`` (example-level DP) each row's gradient is clipped before it is added to ``.grad``.
    ``logit_offsets`` (n, K), a classifier's only: added to each row's logits, by its node, before the loss
    (``label_prior_offsets``)."""
    device = fed.device
    node_loss = torch.zeros(fed.n, device=device)
    for chunk in micro_batches([len(x) for x in rows.ids], tokens_per_chunk):
        index = torch.as_tensor(chunk)
        input_ids, mask = (t.to(device) for t in pad([rows.ids[k] for k in chunk], pad_id))
        labels, nodes = rows.labels[index].to(device), rows.nodes[index].to(device)
        keep = task.positions(input_ids, mask, labels, train=True)  # None: every position
        with fed.route(nodes, None if rows.keys is None else rows.keys[index]):
            logits = fed(input_ids, mask, keep)
        if logit_offsets is not None:
            logits = logits + logit_offsets.to(device)[nodes]
        losses = task.row_loss(logits, input_ids, mask, labels, keep)  # (chunk,)
        weighted = losses * rows.weights[index].to(device)
        if dp is None:
            weighted.sum().backward()
        else:
            with row_gradients() as captured:
                weighted.sum().backward()
            dp.clip_into(captured, rows.weights[index])
        node_loss.index_add_(0, nodes, weighted.detach())
    return node_loss.cpu()


class LocalTrainer:
    """Runs K local steps (or epochs) for the active nodes on the trainable kinds of tensors."""

    def __init__(
        self,
        fed: Federation,
        optimizer: NodeOptimizer,
        streams: NodeStreams,
        token_ids: list[list[int]],
        labels: np.ndarray,
        pad_id: int,
        max_grad_norm: float | None,
        tokens_per_chunk: int,
        task: Task = CLASSIFY,
        dp: ExampleDP | None = None,
        replicas: Solo | None = None,
        logit_offsets: Tensor | None = None,
    ) -> None:
        self.fed, self.optimizer, self.streams = fed, optimizer, streams
        self.dp = dp  # example-level DP-SGD: per-example clipping and per-node noise replace max_grad_norm
        self.token_ids, self.labels, self.pad_id = token_ids, labels, pad_id
        self.max_grad_norm, self.tokens_per_chunk, self.task = max_grad_norm, tokens_per_chunk, task
        self.tokens = 0  # real (unpadded) tokens trained on since the engine last reset it: tokens/s
        self.correction: Callable[[dict[str, Tensor]], None] | None = None  # RoundPlan.correction
        self.replicas = replicas  # data parallel (declora.replicas): this rank's share of each batch
        # (n, K): train.logit_adjustment's, by node; None: the plain loss. On the device once, not per batch.
        self.logit_offsets = None if logit_offsets is None else logit_offsets.to(fed.device)

    def step(self, active: Tensor, names: list[str]) -> Tensor:
        """One optimizer step for every active node; returns per-node loss (n,), NaN for idle nodes."""
        ids: list[list[int]] = []
        labels, nodes, weights, keys = [], [], [], []
        for node in torch.nonzero(active).flatten().tolist():
            epoch, pos = int(self.streams.epoch[node]), int(self.streams.pos[node])
            batch = self.streams.next_batch(node)
            ids += [self.token_ids[k] for k in batch]
            labels.append(torch.as_tensor(self.labels[batch]))
            nodes.append(torch.full((len(batch),), node, dtype=torch.long))
            weights.append(torch.full((len(batch),), 1.0 / len(batch)))
            keys.append(torch.as_tensor(self.streams.row_keys(node, epoch, pos, len(batch))))
        rows = Rows(ids, torch.cat(labels), torch.cat(nodes), torch.cat(weights), torch.cat(keys))
        sizes = torch.bincount(rows.nodes, minlength=self.fed.n)  # (n,) each node's batch size this step
        if self.replicas is not None:  # the weights stay 1/b of the whole batch: the ranks' sum is the step's
            rows = rows.take(replica_rows([len(x) for x in ids], self.replicas.rank, self.replicas.world))
        self.tokens += sum(len(x) for x in rows.ids)
        params = self.optimizer.params
        for name, p in params.items():  # a frozen kind (ADF's inactive factor, say) gets no gradient at all
            p.grad = None
            p.requires_grad_(name in names)
        self.fed.set_training(True)
        node_loss = accumulate_gradients(
            self.fed, rows, self.pad_id, self.tokens_per_chunk, self.task, self.dp, self.logit_offsets
        )
        if self.replicas is not None:  # before anything reads the gradient: every replica steps alike
            node_loss = sum_gradients(self.replicas, params, names, node_loss)
        if self.correction is not None:  # FedProx, SCAFFOLD: deterministic, no data (DP noise follows)
            self.correction({k: params[k] for k in names if params[k].grad is not None})
        grads = [g for k in names if (g := params[k].grad) is not None]
        if self.dp is not None:
            self.dp.add_noise(params, names, active, sizes)
        elif self.max_grad_norm is not None and grads:
            clip_per_node(grads, self.max_grad_norm)
        self.optimizer.step(active, names)
        return torch.where(active, node_loss, torch.full_like(node_loss, float("nan")))

    def local_work(self, active: Tensor, names: list[str], amount: int, unit: str) -> tuple[Tensor, int]:
        """``amount`` steps, or epochs (then nodes with less data finish early and wait).

        Returns each active node's mean loss over its steps (n,) and the optimizer steps taken by the
        busiest node.
        """
        if unit == "epochs":
            budget = torch.tensor([amount * self.streams.steps_per_epoch(i) for i in range(self.fed.n)])
        else:
            budget = torch.full((self.fed.n,), amount)
        budget = torch.where(active, budget, torch.zeros_like(budget))
        total, count = torch.zeros(self.fed.n), torch.zeros(self.fed.n)
        steps = int(budget.max()) if len(budget) else 0
        for s in range(steps):
            now = budget > s
            loss = self.step(now, names)
            total += torch.where(now, loss, torch.zeros_like(loss))  # a trained node's NaN stays NaN
            count += now.float()
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan"))), steps


@torch.no_grad()
def row_stats(
    fed: Federation,
    token_ids: list[list[int]],
    labels: Tensor,
    nodes: Tensor,
    pad_id: int,
    tokens_per_chunk: int,
    task: Task = CLASSIFY,
) -> Tensor:
    """The task's (sum, count) of its metric (and of its extras) for every row, row k scored by (possibly
    overridden) node ``nodes[k]``: (rows, task.width)."""
    stats = torch.empty(len(token_ids), task.width)
    fed.set_training(False)
    for chunk in micro_batches([len(x) for x in token_ids], tokens_per_chunk):
        index = torch.as_tensor(chunk)
        input_ids, mask = (t.to(fed.device) for t in pad([token_ids[k] for k in chunk], pad_id))
        y = labels[index].to(fed.device)
        keep = task.positions(input_ids, mask, y, train=False)  # None: every position
        with fed.route(nodes[index]):
            logits = fed(input_ids, mask, keep)
        stats[index] = task.row_stats(logits, input_ids, mask, y, keep).float().cpu()
    return stats


def metric_per_node(
    fed: Federation,
    token_ids: list[list[int]],
    labels: np.ndarray,
    n_models: int,
    pad_id: int,
    tokens_per_chunk: int,
    task: Task = CLASSIFY,
) -> Tensor:
    """The metric (accuracy, perplexity) of each of ``n_models`` stacked models on the same examples, all in
    one pass: (n_models,)."""
    return task.finalize(totals_per_node(fed, token_ids, labels, n_models, pad_id, tokens_per_chunk, task))


def totals_per_node(
    fed: Federation,
    token_ids: list[list[int]],
    labels: np.ndarray,
    n_models: int,
    pad_id: int,
    tokens_per_chunk: int,
    task: Task = CLASSIFY,
) -> Tensor:
    """Each of ``n_models`` stacked models' summed ``row_stats`` on the same examples, in one pass:
    (n_models, task.width); ``task.finalize`` / ``task.extras`` turn them into metrics."""
    m = len(token_ids)
    rows = torch.arange(n_models).repeat_interleave(m)  # row k is scored by model rows[k]
    y = torch.as_tensor(labels).repeat(n_models)
    stats = row_stats(fed, token_ids * n_models, y, rows, pad_id, tokens_per_chunk, task)
    return stats.view(n_models, m, task.width).sum(1)
