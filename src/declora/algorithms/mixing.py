"""Gossip named kinds of node tensors, in place (servers aggregate in ``algorithms/server.py``).

    gossip_kinds:    x_i <- sum_j W_ij x_j                 (bytes booked per edge by the exchange)

Only the kinds named are sent and changed; every other tensor stays as it is.
"""

from __future__ import annotations

import torch

from declora.algorithms.base import RoundContext


def gossip_kinds(ctx: RoundContext, kinds: tuple[str, ...]) -> None:
    """Mix every tensor of ``kinds`` ("A", "B", "head") with this round's W, through the exchange."""
    tensors = ctx.fed.tensors(kinds)
    if not tensors:
        return
    mixed = ctx.exchange.gossip({k: v.detach() for k, v in tensors.items()}, ctx.W, ctx.round)
    with torch.no_grad():
        for name, value in mixed.items():
            tensors[name].copy_(value)
