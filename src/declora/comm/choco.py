"""CHOCO-gossip: compressed gossip that compresses what changed, not the state.

Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed
Communication", ICML 2019. A sparsifying codec (``topk``) applied to a node's whole state drops most of
it, and mixing with the dropped entries as zeros pulls every node towards zero. CHOCO keeps, for every
node j, a public copy X̂_j that every neighbour of j holds identically (node-stacked like everything else,
``(n, ...)``), and per round:

    q_i   = C(X_i - X̂_i)                                     node i sends q_i to its neighbours
    X̂_j  <- X̂_j + q_j                                        every holder of a copy of j adds what j sent
    X_i   <- X_i + gamma * sum_j W_ij (X̂_j - X̂_i)            (consensus step size gamma = comm.consensus_step)

With identical nodes nothing is sent and nothing moves; as X̂ catches up with X the messages shrink, so
the consensus error decays geometrically. Copies start at the run's initial adapter, which every node
derives from the seed without communicating (or at zero when none is given, as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def choco_mix(x: Tensor, hats: Tensor, off: Tensor, rows: Tensor, step: float) -> Tensor:
    """x (k, ...) of the nodes ``rows`` (k,) -> x + step * sum_j W_ij (X̂_j - X̂_i).

    hats: (n, ...) public copies (only the rows of the nodes and of their neighbours are read);
    off: (k, n) the off-diagonal of W for those nodes (rows of W sum to 1, so the diagonal drops out).
    """
    flat = hats.reshape(hats.shape[0], -1).to(x.dtype)  # (n, m)
    off = off.to(x.device, x.dtype)  # W lives on the CPU
    pull = off @ flat - off.sum(1, keepdim=True) * flat[rows]  # (k, m)
    return x + step * pull.view_as(x)


class PublicCopies:
    """The public copies X̂ (n, ...) per tensor name, and the shared initial tensors they start from."""

    def __init__(self, n: int, step: float) -> None:
        self.n, self.step = n, step
        self.hats: dict[str, Tensor] = {}
        self.initial: dict[str, Tensor] = {}

    def start(self, tensors: Mapping[str, Tensor]) -> None:
        """The run's initial node tensors (every node starts equal, so row 0 is everyone's start)."""
        self.initial = {k: v.detach()[:1].to(torch.float32).clone() for k, v in tensors.items()}

    def table(self, name: str, like: Tensor) -> Tensor:
        """X̂ for ``name`` (n, *like.shape[1:]) float32; created from the initial tensor on first use."""
        if name not in self.hats:
            shape = (self.n, *like.shape[1:])
            start = self.initial.get(name)
            if start is not None and tuple(start.shape[1:]) != tuple(like.shape[1:]):
                start = None  # a tensor of another shape under this name: start from zero
            zero = torch.zeros(shape, dtype=torch.float32, device=like.device)
            self.hats[name] = zero if start is None else start.to(like.device).expand(shape).clone()
        return self.hats[name]

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.hats.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.hats = {k: v.clone().to(torch.float32) for k, v in state.items()}
