"""Data parallelism for a single-node algorithm (``centralized``) under torchrun.

A federation of one node cannot be sliced over P processes, so every rank holds a replica of the node:
its adapter, head and optimizer state. Each local step, every rank draws the same batch from the node's
stream and keeps its share of the rows (``replica_rows``: the rows in length order, dealt round-robin, so
shares differ by at most one row and hold about the same number of tokens). A rank cuts its share into
micro-batches under its own token budget; the loss weights stay 1/b of the whole batch, so the sum over
ranks of their gradients is the one-process gradient. One ``all_reduce`` per step sums the gradients
and the loss (``sum_gradients``) before clipping and the optimizer step: every replica takes the same
step and stays identical, and the metrics are the one-process run's to fp32 rounding.

Nothing else crosses processes during training. Evaluation scores each rank's share of the consensus
examples and sums the counts, as for node slices. Every rank writes its (identical) checkpoint shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from declora.config import ConfigError
from declora.dist import Distributed, Layout, Solo


class Replicas(Solo):
    """The process group of a data-parallel run, as the engine sees it.

    Node-level calls are ``Solo``'s: this process hosts every node, so ``gather_nodes`` and
    ``all_gather_object`` return their argument. Sums and maxima over processes, evaluation shares,
    broadcasts, barriers, progress stamps and fault handling are the process group's.
    """

    def __init__(self, procs: Distributed) -> None:
        super().__init__()
        self.procs = procs
        self.rank, self.world, self.is_main = procs.rank, procs.world, procs.is_main
        self.device = procs.device

    def set_nodes(self, n: int, counts: tuple[int, ...] | None = None) -> None:
        if counts is not None:
            raise ConfigError(
                f"dist.node_slices={list(counts)} does not apply to a single-node algorithm: every process "
                "holds a replica of the one node and a share of each batch; remove dist.node_slices"
            )
        self.layout = Layout((n,))

    @property
    def nodes(self) -> Tensor:
        return torch.arange(self.layout.n)

    def all_sum(self, x: Tensor) -> Tensor:
        return self.procs.all_sum(x)

    def all_max(self, x: Tensor) -> Tensor:
        return self.procs.all_max(x)

    def share_of(self, m: int) -> slice:
        return self.procs.share_of(m)

    def broadcast(self, obj: Any) -> Any:
        return self.procs.broadcast(obj)

    def enter(self, round: int, phase: str) -> None:
        self.procs.enter(round, phase)

    def barrier(self) -> None:
        self.procs.barrier()

    def stop_together(self) -> None:
        self.procs.stop_together()

    @contextmanager
    def guard(self) -> Iterator[None]:
        with self.procs.guard():
            yield

    def close(self) -> None:
        self.procs.close()


def replica_rows(lengths: list[int], rank: int, world: int) -> list[int]:
    """This rank's rows of a step's batch: the rows ordered by length (ties by position), dealt
    round-robin (rank k takes the k-th, (k+P)-th, ... shortest)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return order[rank::world]


def sum_gradients(group: Solo, params: Mapping[str, Tensor], names: list[str], node_loss: Tensor) -> Tensor:
    """Sum ``.grad`` of the named tensors and the per-node loss (n,) over the ranks, in one all_reduce.

    A tensor has a gradient after the sum if it had one on any rank (a rank whose share of the batch is
    empty has none); the others keep ``.grad = None``, as in one process. Returns the summed loss (n,)."""
    device = params[names[0]].device if names else node_loss.device
    grads = [params[k].grad for k in names]
    has = torch.tensor([float(g is not None) for g in grads], device=device)  # (names,)
    parts = [torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads, strict=True)]
    sizes = [p.numel() for p in parts] + [len(names), len(node_loss)]
    flat = torch.cat([p.reshape(-1).float() for p in parts] + [has, node_loss.to(device).float()])
    *summed, has, loss = group.all_sum(flat).split(sizes)
    for k, part, g, got in zip(names, parts, summed, has.tolist(), strict=True):
        params[k].grad = g.view_as(part).to(part.dtype) if got else None
    return loss.to(node_loss.device, node_loss.dtype)
