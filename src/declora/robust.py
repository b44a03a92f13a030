"""Byzantine-robust mixing (``robust.aggregator``): how node i combines its own state x_i with the decoded
messages v_j of its neighbours N_i = {j != i : W_ij > 0}, with this round's weights W(t).

    mean          x_i' = W_ii x_i + sum_j W_ij v_j                    (plain gossip)
    trimmed_mean  per coordinate, of the k values {x_i} + {v_j}, the b = floor(trim * k) smallest and the
                  b largest are dropped; the rest are averaged with their W weights, renormalized
    median        per coordinate, the W-weighted median of {x_i} + {v_j}
    clipped       x_i' = x_i + sum_j W_ij clip(v_j - x_i, tau),   clip(d, tau) = d * min(1, tau / ||d||)
                  (ClippedGossip: He, Karimireddy, Jaggi, "Byzantine-Robust Decentralized Learning via
                  ClippedGossip", arXiv 2202.01545, 2022). ||d|| is over the whole message of the call
                  (every tensor a node sends in it), as the paper clips the whole model difference.

A rule with nothing to cut returns the plain mean bit for bit: trimmed_mean with trim 0 (or too few
values to trim), and clipped where no difference exceeds tau. Otherwise the rule is computed from what it
keeps, never as the plain mean plus a correction: a huge outlier in the plain mean would cancel the honest
values' digits away in float32 (values 0, 1, 2, 3 and 1e9 gave a trimmed mean of 0 instead of 2).

CHOCO-gossip (a ``topk`` codec, comm/choco.py) mixes the public copies X̂, not the messages:
x_i' = x_i + gamma * (agg_i - X̂_i), where agg_i is the rule over node i's own copy X̂_i and its
neighbours' copies X̂_j (the plain mean gives CHOCO's sum_j W_ij (X̂_j - X̂_i); ``clipped`` clips each
X̂_j - X̂_i to tau). A node whose rule cuts nothing takes CHOCO's own step, so a rule with nothing to
cut is plain CHOCO bit for bit.

Server algorithms (fedavg, ffa_lora, rolora, fedprox, fedsa_lora, fed_sb, scaffold) aggregate the uploads
of the senders S with the same rules (trimmed_mean, median over S; clipped around the uploads' coordinate
median, a robust centre, since the server keeps no model of its own between rounds) or, all but
SCAFFOLD (one node's control-variate change as the server's would break c = mean c_i), with Krum
(Blanchard et al., NeurIPS 2017): the upload whose summed squared distance to its |S| - f - 2 nearest
other uploads is smallest.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from declora.comm.choco import choco_mix

AGGREGATORS = ("mean", "trimmed_mean", "median", "clipped")  # gossip rules
SERVER_AGGREGATORS = (*AGGREGATORS, "krum")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- rules on one node's k values


def trimmed_cut(k: int, trim: float) -> int:
    """How many of k values each tail loses: floor(trim * k), leaving at least one value. The product is
    rounded to 9 decimals first, so that 0.29 of 100 cuts 29 (0.29 * 100 is 28.999999999999996)."""
    return min(math.floor(round(trim * k, 9)), (k - 1) // 2)


def trimmed_mean(values: Tensor, w: Tensor, b: int) -> Tensor:
    """Per coordinate, the w-weighted mean of the values left after dropping the b smallest and the b
    largest, renormalized to the full weight w.sum(). Summed over the kept values only, so a dropped
    value, however large (or infinite), never enters the sum. values: (k, D), w: (k,) -> (D,)."""
    k = values.shape[0]
    rank = values.argsort(dim=0, stable=True).argsort(dim=0, stable=True)  # (k, D): place in its coordinate
    keep = (rank >= b) & (rank < k - b)
    kept = w[:, None] * keep  # (k, D)
    new = kept * (w.sum() / kept.sum(0))
    return (new * torch.where(keep, values, torch.zeros_like(values))).sum(0)


def weighted_median(values: Tensor, w: Tensor) -> Tensor:
    """Per coordinate, the smallest value whose cumulative weight reaches half the total (for an even count
    of equal weights, the lower middle value). values: (k, D), w: (k,) -> (D,)."""
    ordered, order = values.sort(dim=0, stable=True)  # (k, D)
    w64 = w.double()  # summed in float64 and compared with a relative slack, so that "reaches half" does
    cum = w64[order].cumsum(0)  # not turn on rounding: ten weights of 0.1 reach half at the fifth, as ten 1s
    half = w64.sum() / 2 * (1 - 1e-9)
    pick = (cum < half).sum(0, keepdim=True).clamp(max=values.shape[0] - 1)  # (1, D)
    return ordered.gather(0, pick)[0]


def clip_coefficients(sq_norms: Tensor, tau: float) -> Tensor:
    """min(1, tau / ||d||) from squared norms (any shape); 1 for a zero difference."""
    return (tau / sq_norms.sqrt()).clamp(max=1.0)


def clipped_sum(pull: Tensor, d: Tensor) -> Tensor:
    """sum_j pull_j d_j over the rows of d (k, D), pull (k,). A row with an infinite norm has pull 0 and
    no direction to clip to: it adds nothing (not 0 * inf = NaN)."""
    return torch.where(pull[:, None] > 0, pull[:, None] * d, torch.zeros_like(d)).sum(0)


def krum_index(flat: Tensor, f: int) -> int:
    """Krum's choice among m uploads flat: (m, D): the smallest sum of squared distances to its
    m - f - 2 nearest others (at least one). With m <= 2f + 2 (a round that lost uploads to dropout or a
    deadline, allowed only with allow_degenerate) the choice carries no guarantee: it is warned about."""
    m = flat.shape[0]
    if m <= 2 * f + 2:
        log.warning(
            "Krum over %d uploads with robust.krum_f=%d (it needs more than 2f + 2 = %d): this round's "
            "choice may be an attacker's",
            m,
            f,
            2 * f + 2,
        )
    dist = torch.cdist(flat.double(), flat.double()).square()  # (m, m)
    dist.fill_diagonal_(float("inf"))
    near = max(1, min(m - 1, m - f - 2))
    scores = dist.sort(1).values[:, :near].sum(1)  # (m,)
    return int(scores.argmin())


# ---------------------------------------------------------------- gossip: every local node at once


def robust_gossip(
    rule: str,
    own: dict[str, Tensor],
    table: dict[str, Tensor],
    W: Tensor,
    nodes: Tensor,
    trim: float = 0.0,
    tau: float = float("inf"),
) -> dict[str, Tensor]:
    """Mix this process's nodes. own: name -> (m, ...) their exact tensors; table: name -> (n, ...) the
    decoded messages by global id (rows of nodes no local node hears are never read); W: (n, n) global;
    nodes: (m,) global ids of own's rows. Returns name -> (m, ...)."""
    eye = torch.eye(W.shape[0], dtype=torch.bool)
    off = (W * ~eye).to(torch.float32)[nodes]  # (m, n)
    diag = torch.diagonal(W).to(torch.float32)[nodes]  # (m,)
    out: dict[str, Tensor] = {}
    for name, x in own.items():  # the plain mean, exactly as the exchange's gossip computes it
        flat, tab = x.reshape(x.shape[0], -1), table[name].reshape(table[name].shape[0], -1)
        out[name] = off.to(x.device, x.dtype) @ tab + diag.to(x.device, x.dtype)[:, None] * flat  # (m, D)
    if rule != "mean":
        for r in range(len(nodes)):
            _correct_node(rule, r, off[r], diag[r], own, table, out, trim, tau)
    return {name: out[name].view_as(x) for name, x in own.items()}


def robust_choco(
    rule: str,
    own: dict[str, Tensor],
    hats: dict[str, Tensor],
    W: Tensor,
    nodes: Tensor,
    step: float,
    trim: float = 0.0,
    tau: float = float("inf"),
) -> dict[str, Tensor]:
    """CHOCO's consensus step with ``rule`` over the public copies. own: name -> (m, ...) the exact
    tensors of this process's nodes ``nodes`` (m,); hats: name -> (n, ...) the copies after this round's
    messages (rows of nodes no local node hears are never read); step: gamma. Returns name -> (m, ...)."""
    off = (W * ~torch.eye(W.shape[0], dtype=torch.bool)).to(torch.float32)[nodes]  # (m, n)
    out = {name: choco_mix(x, hats[name], off, nodes, step) for name, x in own.items()}
    if rule == "mean":
        return out
    mine = {name: hats[name][nodes] for name in own}  # (m, ...): each node's own copy X̂_i
    robust = robust_gossip(rule, mine, hats, W, nodes, trim, tau)
    plain = robust_gossip("mean", mine, hats, W, nodes)  # bit for bit the mean inside ``robust``
    cut = torch.zeros(len(nodes), dtype=torch.bool)  # the nodes whose rule changed any tensor
    for name in own:
        cut |= (robust[name] != plain[name]).reshape(len(nodes), -1).any(1).cpu()
    for name, x in own.items():  # x_i + gamma (agg_i - X̂_i) where the rule cut (rows of W sum to 1)
        step_to = x + step * (robust[name] - mine[name]).to(x.dtype)
        out[name] = torch.where(cut.to(x.device).view(-1, *[1] * (x.dim() - 1)), step_to, out[name])
    return out


def _correct_node(
    rule: str,
    r: int,
    off_row: Tensor,
    self_weight: Tensor,
    own: dict[str, Tensor],
    table: dict[str, Tensor],
    out: dict[str, Tensor],
    trim: float,
    tau: float,
) -> None:
    """Apply ``rule`` to local row r in place of (or on top of) its plain mean ``out[name][r]``."""
    nb = (off_row > 0).nonzero().flatten()  # (k - 1,) global ids of its neighbours
    if len(nb) == 0:
        return
    w = torch.cat([self_weight.view(1), off_row[nb]])  # (k,)
    values = {
        name: torch.cat([x[r : r + 1].reshape(1, -1), table[name].reshape(table[name].shape[0], -1)[nb]])
        for name, x in own.items()
    }  # name -> (k, D): own state first, then the neighbours' messages
    if rule == "clipped":
        diffs = {name: v[1:] - v[:1] for name, v in values.items()}  # (k - 1, D)
        sq = sum(d.double().square().sum(1) for d in diffs.values())  # (k - 1,)
        assert isinstance(sq, torch.Tensor)  # own is never empty (the exchanges skip mixing no tensors)
        coef = clip_coefficients(torch.as_tensor(sq), tau)  # (k - 1,)
        if bool((coef < 1).any()):  # x_i (sum of its weights) + sum_j W_ij clip(v_j - x_i, tau)
            pull = (coef.to(w.dtype) * w[1:].to(coef.device)).cpu()
            for name, d in diffs.items():
                x = values[name][0]
                out[name][r] = w.sum().to(x.dtype) * x + clipped_sum(pull.to(d.device, d.dtype), d)
        return
    if float(self_weight) == 0:  # W_ii = 0: the node's own state is not among the values it mixes
        w, values = w[1:], {name: v[1:] for name, v in values.items()}
    for name, v in values.items():
        wv = w.to(v.device, v.dtype)
        if rule == "trimmed_mean":
            b = trimmed_cut(v.shape[0], trim)
            if b > 0:
                out[name][r] = trimmed_mean(v, wv, b)
        elif rule == "median":
            out[name][r] = weighted_median(v, wv)
        else:
            raise ValueError(f"robust.aggregator={rule!r} is not a gossip rule; choose one of {AGGREGATORS}")


# ---------------------------------------------------------------- server: one aggregate of the uploads


def server_aggregate(
    rule: str,
    decoded: dict[str, Tensor],
    weights: Tensor,
    trim: float = 0.0,
    tau: float = float("inf"),
    krum_f: int = 1,
) -> dict[str, Tensor]:
    """The server's aggregate of the uploads decoded: name -> (n, ...), from the senders weights > 0
    (weights: (n,)). Returns name -> (...)."""
    senders = (weights > 0).nonzero().flatten()
    w = (weights / weights.sum()).to(torch.float32)
    out = {n: torch.einsum("n,n...->...", w.to(x.device, x.dtype), x) for n, x in decoded.items()}  # mean
    if rule == "mean":
        return out
    flat = {n: x[senders].reshape(len(senders), -1) for n, x in decoded.items()}  # (k, D)
    ws = w[senders].to(next(iter(decoded.values())).device)
    if rule == "krum":
        pick = krum_index(torch.cat(list(flat.values()), 1), krum_f)
        return {n: decoded[n][senders[pick]].clone() for n in decoded}
    if rule == "clipped":
        centre = {n: weighted_median(v, ws.to(v.dtype)) for n, v in flat.items()}
        sq = sum((v - centre[n]).double().square().sum(1) for n, v in flat.items())  # (k,)
        coef = clip_coefficients(torch.as_tensor(sq), tau)  # (k,)
        if bool((coef < 1).any()):  # the centre (sum of the weights) + sum_i w_i clip(v_i - centre, tau)
            pull = coef.to(ws.dtype) * ws
            for n, v in flat.items():
                moved = clipped_sum(pull.to(v.dtype), v - centre[n])
                out[n] = (ws.sum().to(v.dtype) * centre[n] + moved).view_as(out[n])
        return out
    for n, v in flat.items():
        if rule == "trimmed_mean":
            b = trimmed_cut(v.shape[0], trim)
            if b > 0:
                out[n] = trimmed_mean(v, ws.to(v.dtype), b).view_as(out[n])
        elif rule == "median":
            out[n] = weighted_median(v, ws.to(v.dtype)).view_as(out[n])
        else:
            raise ValueError(f"robust.aggregator={rule!r} is not known; choose one of {SERVER_AGGREGATORS}")
    return out
