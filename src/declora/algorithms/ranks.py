"""What the heterogeneous-rank server methods share (fslora, hetlora, flexlora). docs/algorithms.md.

Node i's adapter is the run's rank-r adapter (r = model.rank) seen through a per-node gate g_i
(``lora.RankMask``): W_i = W0 + s B_i diag(g_i) A_i, with the run's one scale s (alpha/r, alpha/sqrt(r)).
A gate of 0 removes a component: it contributes nothing and gets zero gradient in A and B.

- Participation: ``server.participants`` (algorithm.clients_per_round or server.fraction, seeded per
  round). Offline nodes (topology.node_dropout) do not take part.
- Messages: a node with k_i active components uploads k_i (d_in + d_out) floats per module (plus k_i
  int32 indices once per round where the set is random) and fetched the same slices at the start of the
  round: both booked by ``exchange.upload_masked``.
- ``ServerFactors``: the global (A, B), node axis 1, and a server optimizer (``declora.server_opt``; by
  default the papers' AdamW: lr algorithm.server_lr, weight decay algorithm.server_weight_decay [M], betas
  (0.9, 0.999), eps 1e-8; any server.optimizer otherwise) on Delta = -g, where

      g = (1/|S|) sum_{i in S} pad_i(theta_server - theta_i)      (zero outside node i's components)

  (p_i = n_i / sum_S n_j instead of 1/|S| with server.weighting=size). Its factors and moments are the
  algorithm's checkpointed state. A robust rule (robust.aggregator) replaces each component's mean by the
  rule's over the nodes that sent that component (declora.robust_uploads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext
from declora.config import Config
from declora.model import Federation
from declora.robust_uploads import krum_weights, slice_mask, upload_aggregate
from declora.server_opt import build_server_optimizer

RANK_DIM = {"A": 1, "B": 2}  # A: (n, r, d_in), B: (n, d_out, r)


def node_ranks(ranks: tuple[int, ...] | None, n: int, r: int) -> list[int]:
    """Each node's rank r_i in [1, r] (algorithm.ranks; None: r everywhere)."""
    if ranks is None:
        return [r] * n
    if len(ranks) != n or not all(1 <= k <= r for k in ranks):
        raise ValueError(f"algorithm.ranks={list(ranks)} needs {n} entries in [1, model.rank={r}]")
    return list(ranks)


def first_components(ranks: list[int], r: int) -> Tensor | None:
    """Gate (n, r) = 1[j < r_i]; None when every node has the full rank (no gate, no cost)."""
    if all(k == r for k in ranks):
        return None
    return (torch.arange(r)[None, :] < torch.tensor(ranks)[:, None]).float()


def install_gate(fed: Federation, gate: Tensor | None) -> None:
    """Gate the federation's rows by the global (n, r) ``gate`` (each process takes its nodes' rows)."""
    device = next(iter(fed.lora.values())).A.device
    fed.rank_mask.gate = None if gate is None else gate[fed.node_ids].to(device)


def active_components(fed: Federation, gate: Tensor | None) -> Tensor:
    """(n_local, r) bool: the components each of this process's nodes trains and sends (gate: global)."""
    if gate is None:
        return torch.ones(fed.n, fed.cfg.rank, dtype=torch.bool)
    return gate[fed.node_ids].cpu() != 0


def factor_messages(fed: Federation, minus: dict[str, Tensor] | None = None) -> dict[str, tuple[Tensor, int]]:
    """Every A and B (n, ...) with its rank dim, for upload_masked; ``minus``: send minus[k] - x (a delta)."""
    out: dict[str, tuple[Tensor, int]] = {}
    for k, v in fed.tensors(("A", "B")).items():
        x = v.detach() if minus is None else minus[k] - v.detach()
        out[k] = (x, RANK_DIM[fed.kind_of(k)])
    return out


def round_start(fed: Federation, cfg: Config) -> dict[str, Tensor] | None:
    """Every node's A and B as the round starts (what it downloaded, public): node-level DP clips an
    upload of factors against it (declora.guard). None without node-level DP: nothing else needs it."""
    if cfg.privacy.level != "node":
        return None
    return {k: v.detach().clone() for k, v in fed.tensors(("A", "B")).items()}


def average_head(ctx: RoundContext, kinds: tuple[str, ...], weights: Tensor) -> None:
    """FedAvg of a trained head: nodes with weight > 0 upload it, every node gets the weighted mean."""
    heads = ctx.fed.tensors(tuple(k for k in kinds if k == "head"))
    if not heads or not (ctx.exchange.all_nodes(weights) > 0).any():  # every process decides alike
        return
    means = ctx.exchange.server_mean({k: v.detach() for k, v in heads.items()}, weights, ctx.round)
    with torch.no_grad():
        for k, mean in means.items():
            heads[k].copy_(mean.unsqueeze(0).expand_as(heads[k]))


class ServerFactors:
    """The server's global factors (node axis 1) and its optimizer on the mean of the nodes' deltas."""

    def __init__(self, fed: Federation, cfg: Config) -> None:
        self.x = {k: v.detach().mean(0, keepdim=True).clone() for k, v in fed.tensors(("A", "B")).items()}
        self.opt = build_server_optimizer(cfg)  # the paper's AdamW unless server.optimizer is set
        self.weighting, self.robust = cfg.server.weighting, cfg.robust

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.x)

    def step(self, ctx: RoundContext, keep: Tensor, senders: Tensor, indices: bool) -> None:
        """Senders upload theta_server - theta_i on their ``keep`` (n, r) components; one server step on
        Delta = -sum_i p_i pad_i(theta_server - theta_i), p_i = 1/|S| (FSLoRA details) or by data size."""
        everyone = ctx.exchange.all_nodes(senders)  # (n,) over every process's nodes
        if not everyone.any():
            return
        msgs = factor_messages(ctx.fed, self.tensors())
        decoded = ctx.exchange.upload_masked(msgs, keep, senders, ctx.round, indices)  # (n, ...) everywhere
        if self.weighting == "size":
            p = everyone.float() * ctx.exchange.all_nodes(ctx.data_sizes).float().cpu()
            p = p / p.sum()  # (n,)
            g = {k: torch.einsum("n,n...->...", p.to(d.device, d.dtype), d)[None] for k, d in decoded.items()}
        else:
            p = everyone.float() / everyone.sum()
            g = {k: d.sum(0, keepdim=True) / everyone.sum().to(d.dtype) for k, d in decoded.items()}
        if self.robust.aggregator == "krum":  # equal ranks only (config): the chosen node's delta
            p = krum_weights(decoded, p, self.robust.krum_f)
            g = {k: torch.einsum("n,n...->...", p.to(d.device, d.dtype), d)[None] for k, d in decoded.items()}
        elif self.robust.aggregator != "mean":  # over the senders of each component (robust_uploads)
            every = ctx.exchange.all_nodes(keep)  # (n, r)
            masks = {k: slice_mask(every, d, msgs[k][1]) for k, d in decoded.items()}
            robust = upload_aggregate(self.robust, decoded, p, {k: v[0] for k, v in g.items()}, masks)
            g = {k: robust[k][None] for k in g}
        self.opt.step(self.x, {k: -v for k, v in g.items()})

    def broadcast(self, fed: Federation) -> None:
        with torch.no_grad():
            for k, v in fed.tensors(("A", "B")).items():
                v.copy_(self.x[k].expand_as(v))

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"server/{k}": v for k, v in self.x.items()}
        return state | {f"server_opt/{k}": v for k, v in self.opt.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in self.x.items():
            v.copy_(state[f"server/{k}"])
        n = len("server_opt/")
        self.opt.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith("server_opt/")})


class ServedByServerFactors:
    """The server side shared by algorithms whose server keeps ``self.server`` (ServerFactors): the
    server model for evaluation (its factors and the mean head) and its state for checkpoints."""

    server: ServerFactors

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        heads = {k: v.detach().mean(0, keepdim=True) for k, v in fed.tensors(("head",)).items()}
        return self.server.tensors() | heads

    def state_dict(self) -> dict[str, Tensor]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.server.load_state_dict(state)
