"""FedEx-LoRA: FedAvg-LoRA made exact by folding the aggregation's residual into the frozen base.

Singhal, Ponkshe, Vepakomma. "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models." ACL 2025. Round t, participants S with weights p_i (server.weighting):

    server:  A <- sum_i p_i A_i     B <- sum_i p_i B_i                          (as FedAvg-LoRA)
             R  = sum_i p_i B_i A_i - B A                     (d_out, d_in): the cross-term error
             W0 <- W0 + s R      in every adapted module's frozen base weight
    so that  W0' + s B A = W0 + s sum_i p_i B_i A_i   exactly (a tested invariant)
    head (model.head=train): FedAvg with the same p_i
    robust.aggregator: the three means (A, B, the products) are the rule's (declora.robust_uploads); Krum
             makes its chosen node's factors the server model (R = 0)

Possible here because every node shares one frozen base (declora's one idea): one fold serves them all.
Bytes: each participant uploads (A_i, B_i); every online node downloads (A, B) and R, booked dense
(d_out d_in floats per module; a factored R of rank (|S| + 1) r would be smaller for large layers).
Why not for gossip: with W(t) each node would have its own residual, so its own base copy; the shared base
would become n dense per-node deltas, which is what LoRA avoids. The folded deltas are the algorithm's
checkpointed state (the adapted modules' base weights); PEFT export of the factors alone would not
reproduce the model, so the run exports nothing (config refuses export other than none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.ranks import average_head, factor_messages, round_start
from declora.algorithms.server import Rejoin, active_nodes, upload_shares, weighting
from declora.config import Config, RobustConfig
from declora.model import Federation, averaged_factors
from declora.robust_uploads import krum_weights, product_aggregate, upload_aggregate
from declora.schedules import Schedule


class BaseFolds:
    """Adds dense deltas to the adapted modules' frozen base weights; those weights are the checkpointed
    state (copied back on resume: re-adding a summed delta would round differently)."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def add(self, name: str, d: Tensor) -> None:
        """W0 <- W0 + d for module ``name``: d (d_out, d_in), already scaled."""
        base = self.fed.lora[name].base.weight
        with torch.no_grad():
            base.add_(d.to(base.device, base.dtype))

    def dense_bytes(self) -> int:
        """Bytes of one fp32 update of every folded base weight: what a node that missed rounds fetches
        when it comes back (the sum of the updates it missed)."""
        return sum(4 * v.base.weight.numel() for v in self.fed.lora.values())

    def state_dict(self) -> dict[str, Tensor]:
        return {f"base/{k}": v.base.weight.detach() for k, v in self.fed.lora.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.fed.lora.items():
                v.base.weight.copy_(state[f"base/{k}"])


def exact_residual(
    A: Tensor, B: Tensor, p: Tensor, robust: RobustConfig | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(A_mean (r, d_in), B_mean (d_out, r), R (d_out, d_in)) with B_mean A_mean + R = sum_i p_i B_i A_i;
    A: (n, r, d_in), B: (n, d_out, r), p: (n,) summing to 1 (0 for non-senders). With a robust rule
    (robust_uploads) each of the three means is the rule's: of the factors and of the products B_i A_i."""
    w = p.to(A.device, A.dtype)
    A_mean, B_mean = torch.einsum("n,nri->ri", w, A), torch.einsum("n,nor->or", w, B)
    product = torch.einsum("n,nor,nri->oi", w, B, A)
    if robust is not None and robust.aggregator not in ("mean", "krum"):  # krum: p is its choice already
        means = upload_aggregate(robust, {"A": A, "B": B}, p, {"A": A_mean, "B": B_mean})
        A_mean, B_mean = means["A"], means["B"]
        cut = product_aggregate(robust, A, B, None, p, product)
        product = product if cut is None else cut
    return A_mean, B_mean, product - B_mean @ A_mean


@dataclass
class FedExLoRA:
    fed: Federation
    name: str = "fedex_lora"
    single_node: bool = False
    cfg: Config = field(default_factory=Config)
    schedule: Schedule | None = None
    start: dict[str, Tensor] | None = None  # the round's starting factors, for node-level DP (round_start)

    def __post_init__(self) -> None:
        self.weighting = weighting(self.cfg)
        self.folds = BaseFolds(self.fed)
        self.rejoin = Rejoin(self.fed.n)

    def plan(self, t: int) -> RoundPlan:
        self.start = round_start(self.fed, self.cfg)
        return RoundPlan(train=trained_kinds(self.fed), active=active_nodes(self.cfg, t))

    def communicate(self, ctx: RoundContext) -> None:
        fed, online = ctx.fed, ctx.online.cpu()
        shares = upload_shares(self.cfg, self.weighting, ctx)
        if shares is None:
            return
        senders, p = shares  # this process's uploading rows; (n,) shares over every node
        keep = torch.ones(fed.n, fed.cfg.rank, dtype=torch.bool)
        table = ctx.exchange.upload_masked(
            factor_messages(fed), keep, senders, ctx.round, False, self.start
        )  # (n, ...)
        robust = self.cfg.robust
        head_p = p  # the head is its own upload, aggregated by the exchange's rule (Krum's own pick)
        if robust.aggregator == "krum":  # the chosen node's whole upload is the server model
            p = krum_weights(table, p, robust.krum_f)
        # A node offline now gets the server model too (the base it shares holds this round's residual): it
        # fetches what it missed when it comes back, the factors and the sum of the residuals it missed.
        factors = sum(v[0].numel() * 4 for v in fed.tensors(trained_kinds(fed)).values())
        self.rejoin.broadcast(ctx, {"model": self.folds.dense_bytes() + factors})
        for name, layer in fed.lora.items():
            A_mean, B_mean, R = exact_residual(table[f"{name}.lora_A"], table[f"{name}.lora_B"], p, robust)
            self.folds.add(name, fed.scale * R)
            ctx.exchange.ledger.add_server(int(online.sum()), R.numel() * 4)  # this process's receivers
            with torch.no_grad():
                layer.A.copy_(A_mean.expand_as(layer.A))
                layer.B.copy_(B_mean.expand_as(layer.B))
        average_head(ctx, trained_kinds(fed), head_p[ctx.node_ids])

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return averaged_factors(fed.tensors())  # every participant holds (A, B) over the folded base

    def state_dict(self) -> dict[str, Tensor]:
        return self.folds.state_dict() | self.rejoin.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.folds.load_state_dict(state)
        self.rejoin.load_state_dict(state)
