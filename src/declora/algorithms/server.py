"""What every server algorithm shares: who takes part in a round, how uploads are weighted, and the server
model that the server optimizer (``declora.server_opt``) moves.

- Participation: m nodes sampled per round without replacement from (seed, "clients", t), where
  m = algorithm.clients_per_round, else max(1, round(server.fraction n)); fraction 1: every node. A node
  offline this round (topology.node_dropout) does not take part either.
- Weights: p_i = 1/|S| (server.weighting=uniform) or n_i / sum_{j in S} n_j (size), over the senders S.
- ``ServerModel`` (FedAvg and the methods built on it, FedProx, SCAFFOLD, RoLoRA): the server keeps x
  (node axis 1) for every trained tensor and, after local training, moves it by its rule on
  Delta = sum_i p_i x_i - x; every node then holds x.
  Under ``average`` this is the weighted mean of the uploads itself and keeps no state. A node that did
  not take part still receives x (the download is booked), so the next round starts from the server model.
- ``Rejoin``: a node offline in a round cannot receive x then; its row holds x all the same, since it
  fetches what it missed when it comes back (the latest version of each tensor broadcast meanwhile: for
  RoLoRA the other phase's factor), and that download is booked in the round it comes back.
  So every node always holds the server model: acc_server scores it, and RoLoRA's frozen factor stays
  the same on every node.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext
from declora.config import Config
from declora.model import KINDS, Federation
from declora.schedules import Schedule
from declora.seeding import numpy_rng
from declora.server_opt import build_server_optimizer
from declora.validation import topk_of_states


def sample_clients(n: int, m: int | None, seed: int, t: int) -> Tensor:
    """(n,) bool: the nodes the server picks in round t (all of them when m is None)."""
    if m is None or m >= n:
        return torch.ones(n, dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.as_tensor(numpy_rng(seed, "clients", t).choice(n, size=m, replace=False))] = True
    return chosen


def clients_per_round(cfg: Config) -> int | None:
    """Nodes the server samples each round; None: all of them."""
    if cfg.algorithm.clients_per_round is not None:
        return cfg.algorithm.clients_per_round
    return None if cfg.server.fraction >= 1 else max(1, round(cfg.server.fraction * cfg.nodes))


def participants(cfg: Config, t: int) -> Tensor:
    """(n,) bool over the global nodes: who the server samples in round t."""
    return sample_clients(cfg.nodes, clients_per_round(cfg), cfg.seed, t)


def active_nodes(cfg: Config, t: int) -> Tensor | None:
    """RoundPlan.active: the sampled nodes, or None when every node takes part."""
    return None if clients_per_round(cfg) is None else participants(cfg, t)


def weighting(cfg: Config, default: str = "uniform") -> str:
    return default if cfg.server.weighting == "auto" else cfg.server.weighting


def upload_weights(rule: str, senders: Tensor, sizes: Tensor) -> Tensor:
    """(n,) unnormalized weights: 0 for non-senders, 1 (uniform) or the node's example count (size)."""
    w = senders.float()
    return w * sizes.float().to(w.device) if rule == "size" else w


def upload_shares(cfg: Config, rule: str, ctx: RoundContext) -> tuple[Tensor, Tensor] | None:
    """Who uploads this round (this process's rows: sampled and online) and every node's share p (n,),
    summing to 1 over all processes' senders; None when nobody uploads (every process decides alike)."""
    senders = participants(cfg, ctx.round)[ctx.node_ids] & ctx.online.cpu()
    weights = ctx.exchange.all_nodes(upload_weights(rule, senders, ctx.data_sizes.cpu()))
    if not (weights > 0).any():
        return None
    return senders, weights / weights.sum()


def book_downloads(
    ctx: RoundContext, receivers: Tensor, senders: Tensor, tensors: Mapping[str, Tensor]
) -> None:
    """The server model goes to receivers that did not upload (server_mean books the senders' copies)."""
    extra = int((receivers & ~senders).sum())
    if extra:
        ctx.exchange.ledger.add_server(extra, sum(v[0].numel() * v.element_size() for v in tensors.values()))


class Rejoin:
    """The nodes that missed broadcasts of the server (offline): at the next broadcast a node is online
    for, it books one download of the latest version of each part it missed (it fetched them before
    training that round). Parts are what a broadcast carries: the whole model, or single tensors when
    rounds broadcast different ones (RoLoRA's A in one phase, B in the other)."""

    def __init__(self, n_local: int) -> None:  # parts and their (n_local,) masks appear as broadcast
        self.missed: dict[str, Tensor] = {}  # part -> (n_local,) bool: its latest version not received
        self.sizes: dict[str, int] = {}  # part -> bytes of its latest version

    def broadcast(self, ctx: RoundContext, sizes: Mapping[str, int]) -> None:
        """Book the returning nodes' downloads of what they missed; this round's parts (``sizes``: bytes
        each) then are missed by the offline nodes alone."""
        online = ctx.online.cpu()
        for part, missed in self.missed.items():
            back = int((missed & online).sum())
            if back:
                ctx.exchange.ledger.add_server(back, self.sizes[part])
            self.missed[part] = missed & ~online
        for part, size in sizes.items():
            self.missed[part], self.sizes[part] = ~online, size

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"rejoin/missed/{p}": m.to(torch.uint8) for p, m in self.missed.items()}
        return state | {f"rejoin/size/{p}": torch.tensor(size) for p, size in self.sizes.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        # kept beside the schedule's masks, on the CPU
        for key, value in state.items():
            if key.startswith("rejoin/missed/"):
                part = key[len("rejoin/missed/") :]
                self.missed[part] = value.bool().cpu()
                self.sizes[part] = int(state[f"rejoin/size/{part}"])


class ServerModel:
    """Server aggregation with an optimizer for the algorithms whose nodes all hold the server model."""

    def __init__(self, fed: Federation, cfg: Config, schedule: Schedule | None):
        if cfg.comm.codec == "topk":  # the config refuses it for declora's own users; a registered one
            raise topk_of_states(cfg.algorithm.name, "its ServerModel uploads whole factors")
        self.cfg, self.schedule, self.opt = cfg, schedule, build_server_optimizer(cfg)
        self.weighting = weighting(cfg)
        # Every node starts from the same adapter, so the mean of this process's rows is the server model.
        keep = self.opt.rule != "average"
        self.x = {k: v.detach().mean(0, keepdim=True).clone() for k, v in fed.tensors(KINDS).items() if keep}
        self.rejoin = Rejoin(fed.n)
        # Node-level DP: the server model every node fetched (1, ...), public, which each upload's change
        # is clipped against, as DP-FedAvg does; against the node's own previous upload instead, most of
        # the clip would go to undoing the noise that upload carried.
        private = cfg.privacy.level == "node"
        self.fetched = {
            k: v.detach().mean(0, keepdim=True).clone() for k, v in fed.tensors(KINDS).items() if private
        }

    def senders(self, ctx: RoundContext) -> tuple[Tensor, int]:
        """(n_local,) bool: this process's nodes that upload in round ctx.round; and how many upload in all,
        known on every process without talking (participation and the schedule are global)."""
        sampled = participants(self.cfg, ctx.round)
        senders = sampled[ctx.node_ids] & ctx.online.cpu()
        total = senders.sum() if self.schedule is None else (sampled & self.schedule.online(ctx.round)).sum()
        return senders, int(total)

    def aggregate(self, ctx: RoundContext, kinds: tuple[str, ...], also: int = 0) -> None:
        """Round ctx.round: the sampled online nodes upload ``kinds``; every node gets the result (Rejoin;
        ``also``: bytes a returning node fetches besides the model, SCAFFOLD's c)."""
        tensors = ctx.fed.tensors(kinds)
        online = ctx.online.cpu()
        senders, count = self.senders(ctx)
        if not tensors or count == 0:
            return
        weights = upload_weights(self.weighting, senders, ctx.data_sizes)
        uploads = {k: v.detach() for k, v in tensors.items()}
        start = {k: self.fetched[k].expand_as(v) for k, v in uploads.items()} if self.fetched else None
        means = ctx.exchange.server_mean(uploads, weights, ctx.round, start)
        book_downloads(ctx, online, senders, tensors)
        sizes = {name: v[0].numel() * v.element_size() for name, v in tensors.items()}
        self.rejoin.broadcast(ctx, sizes | ({"also": also} if also else {}))
        if self.opt.rule != "average":
            self.opt.step(self.x, {k: mean.unsqueeze(0) - self.x[k] for k, mean in means.items()})
            means = {k: self.x[k][0] for k in means}
        with torch.no_grad():
            for name, mean in means.items():
                tensors[name].copy_(mean.unsqueeze(0).expand_as(tensors[name]))
                if name in self.fetched:
                    self.fetched[name].copy_(mean.unsqueeze(0))

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"server/{k}": v for k, v in self.x.items()} | self.rejoin.state_dict()
        state |= {f"fetched/{k}": v for k, v in self.fetched.items()}
        return state | {f"server_opt/{k}": v for k, v in self.opt.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.x:
            self.x[k].copy_(state[f"server/{k}"])
        for k in self.fetched:
            self.fetched[k].copy_(state[f"fetched/{k}"])
        self.rejoin.load_state_dict(state)
        n = len("server_opt/")
        self.opt.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith("server_opt/")})
