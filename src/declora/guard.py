"""The exchange as private, possibly Byzantine nodes and robust receivers see it.

``GuardedExchange`` wraps the run's exchange (in-process or torch.distributed) and changes three things,
each defined in its own module:

    what a node sends      privacy.privatize (node-level DP), then attack.corrupt (Byzantine senders)
    how a node mixes       robust.robust_gossip over its own state (under node-level DP: its own
                           message) and the decoded messages
    what a server keeps    robust.server_aggregate over the decoded uploads (masked uploads: the method
                           aggregates them itself, with robust_uploads' rules)

Encoding, routing and byte counts stay the inner exchange's: a gossip becomes the inner ``share`` (the
same messages, edges and bytes) followed by the robust rule. Without privacy, attack or a robust rule
the wrapper is not installed at all.

With CHOCO-gossip (a ``topk`` codec) a node's message is q_i = topk(X_i - X̂_i) against its public copy
X̂_i, which every receiver holds: node-level DP clips and noises the dense change X_i - X̂_i before the
top-k (what is released is then post-processing of a Gaussian mechanism, its support included), an
attacker publishes a corrupted state (its copy X̂_a follows corrupt(X_a)), and the robust rule acts on
the copies (robust.robust_choco). With asynchronous gossip (stragglers.AsyncExchange) only this round's
publishers send, privatize and spend privacy, and the rule mixes the neighbours' last published copies.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from declora.algorithms import MASKED_UPLOADS
from declora.attack import MESSAGE_ATTACKS, attacker_mask, corrupt
from declora.comm.exchange import Mix
from declora.config import Config
from declora.privacy import PrivacyAccount, noise_std, privatize, resolve_sigma
from declora.robust import robust_choco, robust_gossip, server_aggregate
from declora.robust_uploads import slice_mask

log = logging.getLogger(__name__)

PREV = "dp_previous_message/"  # checkpoint keys of node-level DP's public references (named when all were
# previous messages; kept so that older checkpoints resume)


class GuardedExchange:
    """An exchange whose nodes privatize and corrupt what they send and mix what they receive robustly."""

    def __init__(
        self,
        inner,
        cfg: Config,
        nodes: Tensor,
        initial: dict[str, Tensor] | None = None,
        account: PrivacyAccount | None = None,
    ) -> None:
        self.inner, self.cfg, self.nodes = inner, cfg, nodes  # nodes: (m,) global ids of local rows
        self.attackers = attacker_mask(cfg.attack, cfg.nodes, cfg.seed)  # (n,) bool
        self.account = account if cfg.privacy.level == "node" else None
        # Node-level DP clips each message's change since the node's public reference of that tensor.
        self.prev = {k: v.detach().clone() for k, v in (initial or {}).items()}
        self.public = getattr(inner, "copies", None)  # CHOCO's public copies X̂ (comm/choco.py), or None

    @property
    def ledger(self):
        return self.inner.ledger

    @property
    def codec(self):
        return self.inner.codec

    def _privatized(
        self,
        tensors: dict[str, Tensor],
        senders: Tensor,
        round: int,
        start: dict[str, Tensor] | None = None,
        masks: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Node-level DP's messages of the local nodes (``tensors`` as they are without it); ``senders``
        (m,) bool: whose message reaches anyone this time. The change is clipped against
        ``start`` when given (the server model, a masked upload's start; ``masks``: the entries sent),
        else against the node's public reference of the tensor: the state its last mix gave (see
        ``share_and_mix``), or its previous message when nothing mixed it (``share``); zero for a
        tensor without a public initial value (SCAFFOLD's control-variate changes)."""
        msgs = dict(tensors)
        if self.account is not None and senders.any():
            p = self.cfg.privacy
            ref = start if start is not None else self._previous(msgs)
            msgs = privatize(
                msgs,
                ref,
                p.clip,
                noise_std(self.account.sigma, p.clip),
                self.nodes,
                None if p.secure_noise else self.cfg.seed,
                round,
                masks,
            )
            if start is None:  # a node that sent nothing keeps its previous reference
                self._keep_reference(msgs, senders)
            self.account.spend(senders)
        return msgs

    def _keep_reference(self, tensors: dict[str, Tensor], senders: Tensor) -> None:
        for k, v in tensors.items():
            if k in self.prev:
                rows = senders.to(v.device).view(-1, *[1] * (v.dim() - 1))
                self.prev[k] = torch.where(rows, v, self.prev[k])

    def _corrupted(self, msgs: dict[str, Tensor], round: int) -> dict[str, Tensor]:
        """What the local nodes send: an attacker's messages corrupted, every other as it is."""
        if self.cfg.attack.kind not in MESSAGE_ATTACKS:
            return msgs
        a, seed = self.cfg.attack, self.cfg.seed
        return {k: corrupt(a, k, v, self.attackers, self.nodes, seed, round) for k, v in msgs.items()}

    def _previous(self, msgs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each local node's public reference: the state its last mix gave (gossip, DeCAF's factors), its
        previous message (a plain ``share``), or under CHOCO its public copy X̂_i (the codec then sends
        topk of the clipped, noised change against it)."""
        if self.public is None:
            return {k: self.prev.get(k, torch.zeros_like(v)) for k, v in msgs.items()}
        return {k: self.public.table(k, v)[self.nodes].to(v.dtype) for k, v in msgs.items()}

    def _senders(self, W: Tensor) -> Tensor:
        reach = (W.T != 0) & ~torch.eye(W.shape[0], dtype=torch.bool)  # [i, j]: i's message reaches j
        sending = reach[self.nodes].any(1)
        publishing = getattr(self.inner, "publishing", None)  # asynchronous: only this round's publishers
        return sending if publishing is None else sending & publishing[self.nodes]

    def gossip(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        if not tensors or not (W * ~torch.eye(W.shape[0], dtype=torch.bool)).any():
            return dict(tensors)  # nobody hears anyone (every process sees the same W)
        r, nodes, copies = self.cfg.robust, self.nodes, self.public

        def mix(own: dict[str, Tensor], table: dict[str, Tensor]) -> dict[str, Tensor]:
            if copies is not None:  # CHOCO: the table is the public copies X̂
                return robust_choco(r.aggregator, own, table, W, nodes, copies.step, r.trim, r.clip_radius)
            return robust_gossip(r.aggregator, own, table, W, nodes, r.trim, r.clip_radius)

        return self.share_and_mix(tensors, W, round, mix)

    def share_and_mix(self, tensors: dict[str, Tensor], W: Tensor, round: int, mix: Mix) -> dict[str, Tensor]:
        """comm.exchange.share_and_mix through the guard: the senders' privatized, corrupted messages are
        shared (``table``: as decoded, or CHOCO's copies X̂) and ``mix(own, table)`` gives the local
        nodes' new tensors.

        Node-level DP: a sender mixes its own message, not its exact state, so what it holds after the
        mix is a function of released messages, public, and its next message clips the change since
        then: what it learned. Against its previous message, which holds that message's noise, the clip
        would go mostly to undoing the noise, which would pile up round after round. Under CHOCO a node
        mixes its exact state and its copy X̂_i stays the reference: the consensus step moves the nodes
        by differences of copies, which sum to zero over the nodes (W doubly stochastic), so the noise
        does not enter the mean of the states (docs/privacy_robustness.md has the measured alternatives)."""
        senders = self._senders(W)
        private = self._privatized(tensors, senders, round)
        table = self.inner.share(self._corrupted(private, round), W, round)
        if self.account is None or self.public is not None:
            return mix(tensors, table)
        rows = {k: senders.to(v.device).view(-1, *[1] * (v.dim() - 1)) for k, v in tensors.items()}
        mixed = mix({k: torch.where(rows[k], private[k], v) for k, v in tensors.items()}, table)
        self._keep_reference(mixed, senders)
        return mixed

    def share(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        return self.inner.share(
            self._corrupted(self._privatized(tensors, self._senders(W), round), round), W, round
        )

    def server_mean(
        self,
        tensors: dict[str, Tensor],
        weights: Tensor,
        round: int,
        start: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Node-level DP clips each upload's change against ``start`` when given (the server model the
        senders fetched, public: DP-FedAvg's reference), else against the node's previous message."""
        msgs = self._corrupted(self._privatized(tensors, weights > 0, round, start), round)
        r = self.cfg.robust
        if r.aggregator == "mean":
            return self.inner.server_mean(msgs, weights, round)

        def reduce(decoded: dict[str, Tensor], w: Tensor) -> dict[str, Tensor]:
            return server_aggregate(r.aggregator, decoded, w, r.trim, r.clip_radius, r.krum_f)

        return self.inner.server_reduce(msgs, weights, round, reduce)

    def upload_masked(self, tensors, keep, senders, round, indices, start=None, fetched=True):  # type: ignore[no-untyped-def]
        """Each sender privatizes and corrupts only what it uploads (its ``keep`` slices), its change
        against ``start`` (its public value at the start of the round; None: zero, the upload is a change)."""
        x = {k: v for k, (v, _) in tensors.items()}
        masks = {k: slice_mask(keep, v, dim) for k, (v, dim) in tensors.items()}
        ref = start if start is not None else {k: torch.zeros_like(v) for k, v in x.items()}
        msgs = self._corrupted(self._privatized(x, senders, round, ref, masks), round)
        sent = {k: (msgs[k], dim) for k, (_, dim) in tensors.items()}
        return self.inner.upload_masked(sent, keep, senders, round, indices, fetched=fetched)

    def all_nodes(self, x: Tensor) -> Tensor:
        return self.inner.all_nodes(x)

    def start(self, tensors: dict[str, Tensor]) -> None:
        self.inner.start(tensors)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.inner.state_dict(), **{f"{PREV}{k}": v.contiguous() for k, v in self.prev.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith(PREV)})
        for k in self.prev:
            self.prev[k].copy_(state[f"{PREV}{k}"])


def node_releases_per_round(cfg: Config) -> int:
    """Messages a node sends per round under node-level DP, each clipped and noised on its own, so the
    accountant composes them all: a trained head travels beside a masked upload or DeCAF's shared factors in
    a message of its own, and SCAFFOLD's control-variate change is a second upload."""
    name = cfg.algorithm.name
    if name == "scaffold" or (name in (*MASKED_UPLOADS, "decaf") and cfg.model.head == "train"):
        return 2
    return 1


def build_account(cfg: Config, sizes: list[int], nodes: Tensor) -> PrivacyAccount | None:
    """The privacy account of this process's nodes ``nodes`` (m,) given every node's data size, with
    sigma as configured or solved for ``target_epsilon`` over the run's planned steps: every message of
    every round (node level, ``node_releases_per_round``), or every local step at sampling rate
    b / |D_i| (example level)."""
    p, t = cfg.privacy, cfg.train
    if p.level == "none":
        return None
    if p.level == "node":
        rates = [1.0] * len(sizes)
        steps = [cfg.rounds * node_releases_per_round(cfg)] * len(sizes)
    else:
        rates = [min(1.0, t.batch_size / size) for size in sizes]
        per_round = [
            t.local_steps * (-(-size // t.batch_size) if t.local_unit == "epochs" else 1) for size in sizes
        ]
        steps = [cfg.rounds * k for k in per_round]
    _warn_weak_settings(cfg, sizes)
    sigma = resolve_sigma(p, list(zip(rates, steps, strict=True)))
    return PrivacyAccount(p, sigma, torch.tensor(rates, dtype=torch.float64)[nodes])


def _warn_weak_settings(cfg: Config, sizes: list[int]) -> None:
    """Settings that run, and that a user may mean (an ablation), but that protect little or nothing."""
    p = cfg.privacy
    if p.noise_multiplier == 0:
        log.warning(
            "privacy.noise_multiplier=0 adds no noise: nothing is private (epsilon = inf); the run only "
            "clips at privacy.clip=%g",
            p.clip,
        )
    # delta is the chance the guarantee fails outright; it should be well below one protected unit's
    # share: 1/nodes at node level (one node's data), 1/|D_i| at example level (one example of a node)
    smallest = max(1, min(sizes))
    units, what = (cfg.nodes, "nodes") if p.level == "node" else (smallest, "examples of the smallest node")
    if p.delta >= 1 / units:
        log.warning(
            "privacy.delta=%g is not below 1/%d (%d %s): a mechanism may then fail for one protected unit "
            "outright with that chance; the usual choice is delta well below 1/%d",
            p.delta,
            units,
            units,
            what,
            units,
        )


def needs_guard(cfg: Config) -> bool:
    return (
        cfg.privacy.level == "node" or cfg.robust.aggregator != "mean" or cfg.attack.kind in MESSAGE_ATTACKS
    )
