"""Exchanges: how the nodes' messages meet, and the ledger of bytes they cost.

``LocalExchange`` simulates the whole federation in one process: gossip is one matrix product over the
node axis. Bytes are counted per edge from the encoded messages actually mixed: node i's message costs
its encoded size once for every neighbour j != i with W_ji > 0 in this round.

A sparsifying codec (``topk``) gossips the CHOCO way (comm/choco.py): nodes send the compressed change
of their state against public copies that every neighbour holds, and mix on the copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from declora.comm.choco import PublicCopies, choco_mix
from declora.comm.codecs import CastCodec, Generators, QuantizeCodec, TopKCodec
from declora.seeding import torch_generator

RANDOM_CODECS = (QuantizeCodec,)  # codecs that draw from the generator: one generator per node
# Codecs that lose most of a message (sparsifiers): gossip sends C(X - X̂), never C(X) (CHOCO).
DIFFERENTIAL_CODECS = (TopKCodec,)


class MessageCodec(Protocol):
    name: str

    def roundtrip(
        self, x: Tensor, generator: Generators = None, *, key: str | None = None
    ) -> tuple[Tensor, int]:
        """(what the receivers decode, bytes of one node's encoded message) for stacked x: (n, ...)."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class Exchange(Protocol):
    """What an algorithm may call during ``communicate``; every message's bytes go to ``ledger`` (the
    server-side booking of a download a node makes later, say). The engine also uses ``codec``,
    ``start``, ``state_dict`` and ``load_state_dict`` (LocalExchange)."""

    @property
    def ledger(self) -> ByteLedger: ...  # read only: GuardedExchange passes on its inner exchange's

    def gossip(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]: ...

    def server_mean(
        self,
        tensors: dict[str, Tensor],
        weights: Tensor,
        round: int,
        start: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]: ...

    def share(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]: ...

    def upload_masked(
        self,
        tensors: dict[str, tuple[Tensor, int]],
        keep: Tensor,
        senders: Tensor,
        round: int,
        indices: bool,
        start: dict[str, Tensor] | None = None,
        fetched: bool = True,
    ) -> dict[str, Tensor]: ...

    def all_nodes(self, x: Tensor) -> Tensor: ...


Mix = Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]]


def share_and_mix(
    exchange: Exchange, tensors: dict[str, Tensor], W: Tensor, round: int, mix: Mix
) -> dict[str, Tensor]:
    """Share ``tensors`` and return ``mix(own, table)``: the local nodes' new tensors from their own
    value (m, ...) and the table (n, ...) of what the neighbours decode (``share``). Own is each node's
    exact tensors; under node-level DP (declora.guard.GuardedExchange.share_and_mix) a sender's own value
    is the message it released, so that what it holds after the mix is public."""
    guarded = getattr(exchange, "share_and_mix", None)
    if guarded is not None:
        return guarded(tensors, W, round, mix)
    return mix(tensors, exchange.share(tensors, W, round))


class ByteLedger:
    """Bytes sent: per directed edge (sender -> receiver) this round, and in total."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.edges = torch.zeros(n, n, dtype=torch.long)  # [i, j]: bytes node i sent to node j this round
        self.server_sent = 0  # bytes the server sent this round
        self.total = 0

    def start_round(self) -> None:
        self.edges.zero_()
        self.server_sent = 0

    def add_edges(self, sends: Tensor, nbytes: int) -> None:
        self.edges += sends.long() * nbytes
        self.total += int(sends.sum()) * nbytes

    def add_server(self, receivers: int, nbytes: int) -> None:
        self.server_sent += receivers * nbytes
        self.total += receivers * nbytes

    def round_summary(self) -> dict[str, float]:
        per_node = self.edges.sum(1).double()
        return {
            "bytes_round": int(self.edges.sum()) + self.server_sent,
            "bytes_total": self.total,
            "bytes_node_mean": float(per_node.mean()),
            "bytes_node_max": int(per_node.max()),
            "bytes_server_round": self.server_sent,
        }

    def state(self) -> dict[str, int]:
        return {"total": self.total}

    def load_state(self, state: dict[str, int]) -> None:
        self.total = int(state["total"])


class LocalExchange:
    """In-process exchange: ``X <- W X`` over the node axis, with encoded off-diagonal messages."""

    def __init__(self, n: int, codec: MessageCodec | None = None, seed: int = 0, step: float = 0.3) -> None:
        self.codec = codec or CastCodec("fp32")
        self.ledger = ByteLedger(n)
        self.seed = seed
        # CHOCO's public copies (and consensus step size ``step``) for a differential codec, else None.
        self.copies = PublicCopies(n, step) if isinstance(self.codec, DIFFERENTIAL_CODECS) else None

    def start(self, tensors: Mapping[str, Tensor]) -> None:
        """The run's initial node tensors: where the public copies start (every node knows them)."""
        if self.copies is not None:
            self.copies.start(tensors)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.copies is None else self.copies.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.copies is not None:
            self.copies.load_state_dict(state)
        elif state:
            raise ValueError(f"codec {self.codec.name!r} keeps no public copies; got {sorted(state)}")

    def _publish(self, name: str, x: Tensor, round: int, sends: Tensor) -> tuple[Tensor, int]:
        """CHOCO: every node whose message reaches a neighbour (``sends`` (n, n), [i, j]: i's message
        reaches j) sends C(X_i - X̂_i) and every copy of it adds that; a node that sends nothing this
        round leaves its copy as it was. Returns (the new X̂ (n, ...), bytes)."""
        assert self.copies is not None
        hats = self.copies.table(name, x)
        q, nbytes = self._encode(name, x.to(hats.dtype) - hats, round)
        senders = sends.any(1).to(hats.device)
        hats[senders] += q[senders].to(hats.dtype)
        return hats, nbytes

    def _encode(self, name: str, x: Tensor, round: int) -> tuple[Tensor, int]:
        if not isinstance(self.codec, RANDOM_CODECS):
            return self.codec.roundtrip(x, torch_generator(self.seed, "codec", round, name), key=name)
        # Node i draws from (seed, round, tensor, i): a multi-process run, whose ranks encode slices of the
        # node axis, draws exactly the same (comm/dist_exchange.py). All rows are encoded in one call.
        generators = [torch_generator(self.seed, "codec", round, name, i) for i in range(x.shape[0])]
        return self.codec.roundtrip(x, generators, key=name)

    def _encode_upload(self, name: str, x: Tensor, round: int, senders: Tensor) -> tuple[Tensor, int]:
        """_encode for an upload to the server: under top-k with error feedback the nodes that do not
        upload this round keep the residual they hold (what they send nothing of is not lost)."""
        if isinstance(self.codec, TopKCodec) and self.codec.error_feedback:
            enc = self.codec.encode(x, key=name, sent=senders)
            return self.codec.decode(enc), enc.nbytes_per_node()
        return self._encode(name, x, round)

    def gossip(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        n = W.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        sends = (W.T > 0) & ~eye  # [i, j]: i's message reaches j
        off = (W * ~eye).to(torch.float32)  # (n, n), on the CPU (the schedule's); moved to each tensor
        own = torch.diagonal(W).to(torch.float32)  # a node mixes its own exact tensor, others' decoded
        out: dict[str, Tensor] = {}
        for name, x in tensors.items():
            if not sends.any():
                out[name] = x
                continue
            if self.copies is not None:
                hats, nbytes = self._publish(name, x, round, sends)
                out[name] = choco_mix(x, hats, off, torch.arange(n), self.copies.step)
                self.ledger.add_edges(sends, nbytes)
                continue
            decoded, nbytes = self._encode(name, x, round)
            flat, dec = x.reshape(n, -1), decoded.reshape(n, -1).to(x.dtype)
            off_x, own_x = off.to(x.device, x.dtype), own.to(x.device, x.dtype)
            out[name] = (off_x @ dec + own_x[:, None] * flat).view_as(x)
            self.ledger.add_edges(sends, nbytes)
        return out

    def server_mean(
        self,
        tensors: dict[str, Tensor],
        weights: Tensor,
        round: int,
        start: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted mean over the nodes with weight > 0; they upload, the server sends the mean back.
        ``start``: the public value every sender started the round from (the server model it fetched),
        which node-level DP clips the change against (declora.guard); a plain exchange does not read it."""
        senders = weights > 0
        w = (weights / weights.sum()).to(torch.float32)
        out: dict[str, Tensor] = {}
        for name, x in tensors.items():
            decoded, nbytes = self._encode_upload(name, x, round, senders)
            out[name] = torch.einsum("n,n...->...", w.to(x.device, x.dtype), decoded.to(x.dtype))
            self._book_upload(senders, nbytes, x)
        return out

    def server_reduce(
        self,
        tensors: dict[str, Tensor],
        weights: Tensor,
        round: int,
        reduce: Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """As server_mean, with the server's aggregate ``reduce(decoded, weights)`` of all the decoded
        uploads at once (a robust rule, declora.robust); the same bytes."""
        decoded: dict[str, Tensor] = {}
        for name, x in tensors.items():
            dec, nbytes = self._encode_upload(name, x, round, weights > 0)
            decoded[name] = dec.to(x.dtype)
            self._book_upload(weights > 0, nbytes, x)
        return reduce(decoded, weights)

    def _book_upload(self, senders: Tensor, nbytes: int, x: Tensor) -> None:
        # Uploads go to the server, not to a node: they are booked on the sender's diagonal entry.
        self.ledger.add_edges(torch.diag(senders), nbytes)
        self.ledger.add_server(int(senders.sum()), x[0].numel() * x.element_size())

    def upload_masked(
        self,
        tensors: dict[str, tuple[Tensor, int]],
        keep: Tensor,
        senders: Tensor,
        round: int,
        indices: bool,
        start: dict[str, Tensor] | None = None,
        fetched: bool = True,
    ) -> dict[str, Tensor]:
        """What the server decodes when each node i in ``senders`` (n,) uploads only the slices ``keep[i]``
        ((n, r) bool) of every tensor ``x`` (n, ...) along its ``dim``: zero elsewhere and for other nodes.
        ``start``: each sender's public value of the tensors at the start of the round (None: zero, the
        upload is a change), the reference of node-level DP (declora.guard); a plain exchange ignores it.

        Bytes, per sender: its encoded sub-tensors, plus int32 slice indices once per call if ``indices``,
        on its diagonal (upload); and, unless not ``fetched``, the server's download of the same slices
        (uncoded, as server_mean books it), which a sender fetched at the start of the round (FSLoRA,
        HetLoRA, FlexLoRA; a FLoRA node starts each round from a fresh seeded adapter and fetches none).
        """
        return self._upload_rows(tensors, keep, senders, round, indices, torch.arange(self.ledger.n), fetched)

    def _upload_rows(
        self,
        tensors: dict[str, tuple[Tensor, int]],
        keep: Tensor,
        senders: Tensor,
        round: int,
        indices: bool,
        ids: Tensor,
        fetched: bool = True,
    ) -> dict[str, Tensor]:
        """upload_masked for rows whose global ids are ``ids``: the decoded table (n_global, ...), filled at
        the senders' global rows; a sender's codec draws and ledger entries are by its global id."""
        n = self.ledger.n
        out = {name: x.new_zeros(n, *x.shape[1:]) for name, (x, _) in tensors.items()}
        for i in senders.nonzero().flatten().tolist():
            gid, idx = int(ids[i]), keep[i].nonzero().flatten()
            up = down = 4 * len(idx) if indices else 0
            for name, (x, dim) in tensors.items():
                sub = x[i : i + 1].index_select(dim, idx.to(x.device))
                if isinstance(self.codec, TopKCodec) and self.codec.error_feedback:  # residual per slice
                    enc = self.codec.encode_slices(x[i : i + 1], dim, idx.to(x.device), key=f"{name}@{gid}")
                    decoded, nbytes = self.codec.decode(enc), enc.nbytes_per_node()
                else:
                    decoded, nbytes = self._encode(f"{name}@{gid}", sub, round)
                out[name][gid : gid + 1].index_copy_(dim, idx.to(x.device), decoded.to(x.dtype))
                up, down = up + nbytes, down + sub.numel() * sub.element_size()
            self.ledger.add_edges(torch.diag(torch.arange(n) == gid), up)
            if fetched:
                self.ledger.add_server(1, down)
        return out

    def all_nodes(self, x: Tensor) -> Tensor:
        """A per-node tensor of this process's rows as (n, ...) over every node (one process: itself)."""
        return x

    def share(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        """Every node's tensors as its neighbours decode them (n, ...), for combinations that are not
        linear in the messages (DeCAF's product mix); bytes are booked per edge W_ji != 0, as gossip.
        A differential codec shares the public copies X̂ (the neighbours' view after this round's update)."""
        sends = (W.T != 0) & ~torch.eye(W.shape[0], dtype=torch.bool)  # [i, j]: i's message reaches j
        out: dict[str, Tensor] = {}
        for name, x in tensors.items():
            if not sends.any():
                out[name] = x
                continue
            if self.copies is not None:
                hats, nbytes = self._publish(name, x, round, sends)
                decoded = hats.clone()
            else:
                decoded, nbytes = self._encode(name, x, round)
            out[name] = decoded.to(x.dtype)
            self.ledger.add_edges(sends, nbytes)
        return out
