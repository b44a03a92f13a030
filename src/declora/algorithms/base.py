"""The one interface every algorithm implements (docs/algorithms.md), and what a round hands it.

An algorithm says, per round, what trains and who is active (``plan``), and how the nodes' tensors are
combined after local work (``communicate``). Everything else (batched local training, evaluation,
logging, checkpoints) is the engine's and is the same for every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from declora.comm.exchange import Exchange
from declora.model import Federation
from declora.optim import NodeOptimizer


@dataclass(frozen=True)
class RoundPlan:
    train: tuple[str, ...]  # kinds of tensors trained this round: a subset of model.KINDS (A, B, head, R)
    active: Tensor | None = None  # (n,) bool: nodes that train this round; None = every online node
    # Added to the trained tensors' gradients before clipping at every local step (FedProx, SCAFFOLD):
    # called with {name: parameter} of the trained tensors, each with its .grad. None: nothing.
    correction: Callable[[dict[str, Tensor]], None] | None = None


@dataclass
class RoundContext:
    round: int
    fed: Federation
    W: Tensor  # (n, n) mixing matrix of this round (offline nodes: identity rows/columns)
    online: Tensor  # (n,) bool
    exchange: Exchange
    optimizer: NodeOptimizer
    data_sizes: Tensor  # (n,) examples per node
    # Multi-process runs: the global ids of this process's nodes (the rows of fed's tensors); W is global
    # (n_global, n_global), while online and data_sizes are per local row. None: every node, local = global.
    nodes: Tensor | None = None

    @property
    def node_ids(self) -> Tensor:
        return torch.arange(self.W.shape[0]) if self.nodes is None else self.nodes


class Algorithm(Protocol):
    """One round: the engine calls ``plan(t)`` once, at the start of round t and before local training
    (an algorithm may record the round's starting state there: FedProx's anchor, SCAFFOLD's x), then
    trains, then calls ``communicate``. Optional members the engine reads when present: ``middle`` (Fed-SB's
    r x r factor between B and A), ``state_dict`` / ``load_state_dict`` (checkpointed state), and for the
    run's start line ``clock`` (alternating phases), ``rho`` (the graph's contraction) and ``sizes``
    (FSLoRA's sketch ranks)."""

    name: str
    single_node: bool  # True: one node holds all the data (centralized)

    def plan(self, t: int) -> RoundPlan: ...

    def communicate(self, ctx: RoundContext) -> None: ...

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        """The server model (node axis 1) for server algorithms, evaluated as acc_server; else None."""
        ...


def trained_kinds(fed: Federation, kinds: tuple[str, ...] = ("A", "B")) -> tuple[str, ...]:
    """``kinds`` plus the head when the config trains it."""
    return (*kinds, "head") if fed.cfg.head == "train" and fed.heads else kinds


def chosen_settings(algorithm: Any) -> dict[str, Any]:
    """What an algorithm settled when it was built that its config does not spell out, for the run's
    ``start`` line: the alternating methods' switch interval (TAD-LoRA's "auto" rule, with the rho it
    read from the graph) and FSLoRA's sketch sizes k_i (its ratios rounded to whole ranks)."""
    chosen: dict[str, Any] = {}
    clock = getattr(algorithm, "clock", None)  # alternating.PhaseClock
    if clock is not None:
        chosen["switch_interval"] = clock.interval
    if getattr(algorithm, "rho", None) is not None:
        chosen["rho"] = algorithm.rho
    if getattr(algorithm, "sizes", None) is not None:  # fslora
        chosen["sketch_ranks"] = list(algorithm.sizes)
    return chosen
