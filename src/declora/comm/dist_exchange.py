"""The exchange of a multi-process run: neighbour send/receive for gossip, all_reduce for servers.

Each rank holds the rows of its own nodes (``group.nodes``, global ids) and the global W(t). Gossip and
``share`` send node j's encoded message only to the ranks that host a neighbour of j in W(t) (one copy
per receiving rank, with ``batch_isend_irecv``), and a rank receives only what its nodes need; there is
no server. ``server_mean`` is a collective: each rank sums its senders' weighted decoded messages and one
``all_reduce`` gives every rank the mean (no rank aggregates for the others).
A robust server rule (``server_reduce``) needs every upload: one ``all_gather`` of the encoded node rows
gives every rank the simulator's whole table, and every rank applies the rule itself.

What crosses a process boundary is the codec's payload of adapter tensors (values, and a codec's
indices and scales), never data or base weights. The ledger books, per rank, its own senders' per-edge
bytes exactly as ``LocalExchange`` does (the logged totals are summed over ranks), and separately the
bytes that actually went through send/recv: ``bytes_cross_process``.

CHOCO-gossip (a ``topk`` codec, comm/choco.py): a rank keeps the public copies of every node in a global
(n, ...) table, sends its nodes' C(X - X̂) along the same routes, and updates the rows of its own nodes and
of the neighbours it heard from; rows of nodes it never hears from are never read (their W entries are 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from declora.comm.choco import choco_mix
from declora.comm.codecs import Codec, Encoded, TopKCodec
from declora.comm.exchange import RANDOM_CODECS, ByteLedger, LocalExchange
from declora.dist import Distributed, talking
from declora.seeding import torch_generator


class DistLedger(ByteLedger):
    """This rank's senders' bytes on the global (n, n) edge table; summaries are summed over ranks."""

    def __init__(self, n: int, group: Distributed) -> None:
        super().__init__(n)
        self.group = group
        self.cross_round = 0  # bytes this rank put on the wire this round
        self.cross_total = 0

    def start_round(self) -> None:
        super().start_round()
        self.cross_round = 0

    def add_cross(self, nbytes: int) -> None:
        self.cross_round += nbytes
        self.cross_total += nbytes

    def round_summary(self) -> dict[str, float]:
        mine = torch.tensor([self.server_sent, self.total, self.cross_round, self.cross_total])
        summed = self.group.all_sum(torch.cat([self.edges.sum(1), mine]))  # (n + 4,) int64
        per_node, (server, total, cross, cross_total) = summed[: self.n].double(), summed[self.n :].tolist()
        return {
            "bytes_round": int(per_node.sum()) + server,
            "bytes_total": total,
            "bytes_node_mean": float(per_node.mean()),
            "bytes_node_max": int(per_node.max()),
            "bytes_server_round": server,
            "bytes_cross_process": cross,
            "bytes_cross_process_total": cross_total,
        }

    def state(self) -> dict[str, int]:
        return {"total": self.total, "cross_total": self.cross_total}

    def load_state(self, state: dict[str, int]) -> None:
        self.total, self.cross_total = int(state["total"]), int(state.get("cross_total", 0))


class DistExchange(LocalExchange):
    """Gossip, share and server_mean over torch.distributed; tensors are this rank's rows (n_local, ...)."""

    codec: Codec  # the whole codec, not LocalExchange's roundtrip alone: ranks send the encoded payloads

    def __init__(self, group: Distributed, n: int, codec: Codec, seed: int = 0, step: float = 0.3) -> None:
        super().__init__(n, codec, seed, step)
        self.group, self.n = group, n
        self.ledger: DistLedger = DistLedger(n, group)
        self.nodes = group.nodes  # (n_local,) global ids of this rank's rows
        self.owner = group.layout.owners()  # (n,) rank of every node
        self.mine = self.owner == group.rank  # (n,) bool

    # ---------------------------------------------------------------- encoding and routing

    def _encode_rows(self, name: str, x: Tensor, round: int, senders: Tensor | None = None) -> Encoded:
        """This rank's messages; a random codec draws per GLOBAL node, as LocalExchange does. ``senders``
        (n_local,) bool, for an upload: top-k's error feedback keeps the others' residuals, as there."""
        if isinstance(self.codec, TopKCodec) and self.codec.error_feedback and senders is not None:
            return self.codec.encode(x, key=name, sent=senders)
        if not isinstance(self.codec, RANDOM_CODECS):
            return self.codec.encode(x, torch_generator(self.seed, "codec", round, name), key=name)
        generators = [torch_generator(self.seed, "codec", round, name, int(i)) for i in self.nodes]
        return self.codec.encode(x, generators, key=name)

    def _route(self, reach: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """reach (n, n) bool, [i, j]: node j needs node i's message. Returns, per other rank, the local
        rows to send it and the global ids to receive from it (both ascending)."""
        sends, recvs = {}, {}
        for k in range(self.group.world):
            if k == self.group.rank:
                continue
            theirs = self.owner == k
            out = reach[self.mine][:, theirs].any(1).nonzero().flatten()  # local rows
            inc = (reach[:, self.mine].any(1) & theirs).nonzero().flatten()  # global ids
            if len(out):
                sends[k] = out
            if len(inc):
                recvs[k] = inc
        return sends, recvs

    def _swap(self, payloads: dict[int, Tensor], sizes: dict[int, int]) -> dict[int, Tensor]:
        """Send each payload to its rank and receive ``sizes[k]`` bytes from each rank k, all at once."""
        device = self.group.device
        received = {k: torch.empty(size, dtype=torch.uint8, device=device) for k, size in sizes.items()}
        ops = [dist.P2POp(dist.isend, buf.to(device), k) for k, buf in payloads.items()]
        ops += [dist.P2POp(dist.irecv, buf, k) for k, buf in received.items()]
        if ops:
            with talking():
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        self.ledger.add_cross(sum(int(b.numel()) for b in payloads.values()))
        return {k: b.cpu() for k, b in received.items()}

    def _exchange(
        self, tensors: dict[str, Tensor], reach: Tensor, round: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, dict[str, int]]:
        """Encode every tensor once, send each rank the rows it needs, decode what arrives.

        Returns (local decoded (n_local, ...), remote decoded (m, ...), remote ids (m,), bytes per
        node message) per tensor name; remote ids ascend.
        """
        encs = {name: self._encode_rows(name, x, round) for name, x in tensors.items()}
        sends, recvs = self._route(reach)
        payloads = {k: _pack(encs, rows) for k, rows in sends.items()}
        row_bytes = sum(_row_bytes(enc) for enc in encs.values())
        arrived = self._swap(payloads, {k: row_bytes * len(ids) for k, ids in recvs.items()})
        ids = torch.cat([recvs[k] for k in sorted(recvs)]) if recvs else torch.zeros(0, dtype=torch.long)
        remote_parts = [_unpack(encs, arrived[k], len(recvs[k])) for k in sorted(recvs)]
        local, remote, nbytes = {}, {}, {}
        for name, x in tensors.items():
            local[name] = self.codec.decode(encs[name]).to(x.dtype)
            nbytes[name] = encs[name].nbytes_per_node()
            if remote_parts:
                parts = {p: torch.cat([rp[name][p] for rp in remote_parts]) for p in encs[name].parts}
                remote[name] = self.codec.decode(Encoded(parts, (len(ids), *x.shape[1:]))).to(
                    x.device, x.dtype
                )
            else:
                remote[name] = x.new_zeros(0, *x.shape[1:])
        return local, remote, ids, nbytes

    def _publish_rows(
        self, tensors: dict[str, Tensor], reach: Tensor, round: int
    ) -> tuple[dict[str, Tensor], dict[str, int]]:
        """CHOCO: send this rank's C(X - X̂), add what was sent and received to the copies (a node whose
        message reaches no neighbour this round sends nothing, and its copy stays, as in one process).

        Returns (X̂ tables (n, ...), bytes per node message) per tensor name."""
        assert self.copies is not None
        hats = {name: self.copies.table(name, x) for name, x in tensors.items()}
        diffs = {name: x.to(hats[name].dtype) - hats[name][self.nodes] for name, x in tensors.items()}
        local, remote, ids, nbytes = self._exchange(diffs, reach, round)
        sending = reach[self.nodes].any(1)  # (n_local,)
        for name, table in hats.items():
            table[self.nodes[sending]] += local[name][sending.to(local[name].device)]
            table[ids] += remote[name]  # only neighbours whose message reached this rank
        return hats, nbytes

    def _book(self, reach: Tensor, nbytes: int) -> None:
        self.ledger.add_edges(reach & self.mine[:, None], nbytes)  # only this rank's senders

    # ---------------------------------------------------------------- the Exchange protocol

    def gossip(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        eye = torch.eye(self.n, dtype=torch.bool)
        reach = (W.T > 0) & ~eye  # [i, j]: i's message reaches j
        if not reach.any() or not tensors:
            return dict(tensors)
        if self.copies is not None:
            hats, nbytes = self._publish_rows(tensors, reach, round)
            off_rows = (W * ~eye).to(torch.float32)[self.nodes]  # (n_local, n)
            for name in tensors:
                self._book(reach, nbytes[name])
            return {
                name: choco_mix(x, hats[name], off_rows, self.nodes, self.copies.step)
                for name, x in tensors.items()
            }
        local, remote, ids, nbytes = self._exchange(tensors, reach, round)
        columns = torch.cat([self.nodes, ids])
        order = torch.argsort(columns)  # neighbours in node order, as the simulator's matmul
        off = (W * ~eye).to(torch.float32)[self.nodes][:, columns[order]]  # (n_local, m)
        own = torch.diagonal(W).to(torch.float32)[self.nodes]  # (n_local,)
        out = {}
        for name, x in tensors.items():
            flat = x.reshape(x.shape[0], -1)
            dec = torch.cat([local[name], remote[name]]).reshape(len(columns), -1)[order]
            off_x, own_x = off.to(x.device, x.dtype), own.to(x.device, x.dtype)  # W lives on the CPU
            out[name] = (off_x @ dec + own_x[:, None] * flat).view_as(x)
            self._book(reach, nbytes[name])
        return out

    def share(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        """Decoded messages as (n, ...) tables by global id: this rank's nodes and the neighbours its
        nodes hear from are filled, every other row is zero (never read)."""
        reach = (W.T != 0) & ~torch.eye(self.n, dtype=torch.bool)
        if not reach.any() or not tensors:
            return dict(tensors)
        if self.copies is not None:  # the neighbours' view is the public copies
            hats, nbytes = self._publish_rows(tensors, reach, round)
            for name in tensors:
                self._book(reach, nbytes[name])
            return {name: hats[name].to(x.dtype).clone() for name, x in tensors.items()}
        local, remote, ids, nbytes = self._exchange(tensors, reach, round)
        out = {}
        for name, x in tensors.items():
            table = x.new_zeros(self.n, *x.shape[1:])
            table[self.nodes], table[ids] = local[name], remote[name]
            out[name] = table
            self._book(reach, nbytes[name])
        return out

    def server_mean(
        self,
        tensors: dict[str, Tensor],
        weights: Tensor,
        round: int,
        start: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted mean over the senders (weight > 0) of every rank: local sums, one all_reduce
        (``start``: as LocalExchange.server_mean, not read here)."""
        senders = weights > 0  # (n_local,)
        w = (weights / self.group.all_sum(weights.sum())).to(torch.float32)
        sums, nbytes = [], {}
        for name, x in tensors.items():
            decoded, nbytes[name] = self._encode_local(name, x, round, senders)
            sums.append(torch.einsum("n,n...->...", w.to(x.device, x.dtype), decoded.to(x.dtype)).reshape(-1))
        flat = torch.cat(sums) if sums else torch.zeros(0)
        total = self.group.all_sum(flat)
        if self.group.world > 1:  # one buffer up to the (logical) server and one down, per rank
            self.ledger.add_cross(2 * flat.numel() * flat.element_size())
        out, at = {}, 0
        uploads = torch.zeros(self.n, dtype=torch.bool)
        uploads[self.nodes] = senders
        for name, x in tensors.items():
            size = x[0].numel()
            out[name] = total[at : at + size].view(x.shape[1:]).to(x.dtype)
            at += size
            self.ledger.add_edges(torch.diag(uploads), nbytes[name])  # uploads on the sender's diagonal
            self.ledger.add_server(int(senders.sum()), size * x.element_size())
        return out

    def _encode_local(
        self, name: str, x: Tensor, round: int, senders: Tensor | None = None
    ) -> tuple[Tensor, int]:
        enc = self._encode_rows(name, x, round, senders)
        return self.codec.decode(enc), enc.nbytes_per_node()

    def server_reduce(self, tensors, weights, round, reduce):  # type: ignore[no-untyped-def]
        """As server_mean, for a rule that needs every upload (declora.robust): each rank's encoded
        uploads are gathered node by node (one all_gather of byte rows), so every rank decodes the whole
        (n, ...) table, exactly the simulator's, and applies ``reduce(decoded, weights)`` itself."""
        encs = {name: self._encode_rows(name, x, round, weights > 0) for name, x in tensors.items()}
        mine = _byte_rows(encs)  # (n_local, bytes of one node's uploads)
        every = self.group.gather_nodes(mine)  # (n, ...) in node order
        if self.group.world > 1:  # all_gather: this rank's (padded) rows go to every other rank
            width = max(self.group.layout.counts)
            self.ledger.add_cross((self.group.world - 1) * width * mine.shape[1])
        parts = _from_byte_rows(encs, every)
        uploads = torch.zeros(self.n, dtype=torch.bool)
        uploads[self.nodes] = weights > 0
        decoded = {}
        for name, x in tensors.items():
            decoded[name] = self.codec.decode(Encoded(parts[name], (self.n, *x.shape[1:]))).to(
                x.device, x.dtype
            )
            self.ledger.add_edges(torch.diag(uploads), encs[name].nbytes_per_node())
            self.ledger.add_server(int((weights > 0).sum()), x[0].numel() * x.element_size())
        return reduce(decoded, self.group.gather_nodes(weights))

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
        """This rank's senders upload as in the simulator (codec draws and bytes by global id); one
        all_reduce then gives every rank the server's whole table (n, ...) (the logical server is every
        rank: no rank aggregates for the others)."""
        tables = self._upload_rows(tensors, keep, senders, round, indices, self.nodes, fetched)
        if not tables:
            return tables
        flat = self.group.all_sum(torch.cat([t.reshape(-1) for t in tables.values()]))
        if self.group.world > 1:  # this rank's table up to the (logical) server and the whole one back
            self.ledger.add_cross(2 * flat.numel() * flat.element_size())
        out, at = {}, 0
        for name, t in tables.items():
            out[name] = flat[at : at + t.numel()].view_as(t)
            at += t.numel()
        return out

    def all_nodes(self, x: Tensor) -> Tensor:
        return self.group.gather_nodes(x)


# ---------------------------------------------------------------- wire format


def _row_bytes(enc: Encoded) -> int:
    return sum(p[0].numel() * p.element_size() for p in enc.parts.values())


def _pack(encs: dict[str, Encoded], rows: Tensor) -> Tensor:
    """The messages of ``rows`` (local indices), every tensor and codec part, as one uint8 buffer."""
    chunks = [
        part[rows].contiguous().view(-1).view(torch.uint8)
        for enc in encs.values()
        for part in enc.parts.values()
    ]
    return torch.cat(chunks)


def _unpack(encs: dict[str, Encoded], buf: Tensor, rows: int) -> dict[str, dict[str, Tensor]]:
    """Inverse of :func:`_pack` for ``rows`` messages; the layout (dtype and shape of every part of one
    node's message) is this rank's own, which is every rank's."""
    out: dict[str, dict[str, Tensor]] = {}
    at = 0
    for name, enc in encs.items():
        out[name] = {}
        for key, part in enc.parts.items():
            size = rows * part[0].numel() * part.element_size()
            piece = buf[at : at + size].clone()  # a fresh buffer: aligned for any dtype
            out[name][key] = piece.view(part.dtype).reshape(rows, *part.shape[1:])
            at += size
    return out


def _byte_rows(encs: dict[str, Encoded]) -> Tensor:
    """Every node's encoded message (every tensor and codec part) as one uint8 row: (n_local, bytes)."""
    m = next(iter(encs.values())).shape[0]
    cols = [
        p.reshape(m, -1).contiguous().view(torch.uint8) for enc in encs.values() for p in enc.parts.values()
    ]
    return torch.cat(cols, 1) if cols else torch.zeros(m, 0, dtype=torch.uint8)


def _from_byte_rows(encs: dict[str, Encoded], rows: Tensor) -> dict[str, dict[str, Tensor]]:
    """Inverse of :func:`_byte_rows` for ``rows`` (k, bytes) of any k nodes, with this rank's layout."""
    out: dict[str, dict[str, Tensor]] = {}
    at = 0
    for name, enc in encs.items():
        out[name] = {}
        for key, part in enc.parts.items():
            size = part[0].numel() * part.element_size()
            piece = rows[:, at : at + size].contiguous()
            out[name][key] = piece.view(part.dtype).reshape(rows.shape[0], *part.shape[1:])
            at += size
    return out
