"""Free functions the algorithms share: gossip or server-average named kinds of node tensors, in place.

    gossip_kinds:    x_i <- sum_j W_ij x_j                 (bytes booked per edge by the exchange)
    server_average:  x_i <- (1/|S|) sum_{j in S} x_j   for i in S, the online nodes; others keep x_i

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


def server_average(ctx: RoundContext, kinds: tuple[str, ...]) -> None:
    """The online nodes upload their ``kinds`` tensors; the server sends back the uniform mean."""
    tensors = ctx.fed.tensors(kinds)
    if not tensors:
        return
    weights = ctx.online.to(torch.float32)  # (n,)
    means = ctx.exchange.server_mean({k: v.detach() for k, v in tensors.items()}, weights, ctx.round)
    with torch.no_grad():
        for name, mean in means.items():  # every participant receives the server's tensor
            rows = ctx.online.view(-1, *([1] * mean.dim())).to(mean.device)
            tensors[name].copy_(torch.where(rows, mean.unsqueeze(0), tensors[name]))
