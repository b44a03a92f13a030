"""Robust server rules for uploads that are not whole states (``robust.aggregator`` with fslora, hetlora,
flexlora, fedex_lora, flora; declora.robust has the rules for whole uploads and for gossip).

Masked uploads (FSLoRA, HetLoRA): node i sends only its rank components keep_i, and the server's plain
aggregate of a coordinate c is sum_{i in U_c} w_i v_ic = P_c * (the w-weighted mean over U_c), U_c the
senders of c and P_c = sum_{i in U_c} w_i. A rule replaces that mean by its own, over U_c only:

    trimmed_mean  of the k_c values of U_c, floor(trim k_c) smallest and largest dropped, the rest
                  renormalized to P_c
    median        P_c * the w-weighted median over U_c
    clipped       x_c = P_c centre_c + sum_i w_i min(1, tau / ||d_i||) d_ic,  d_i = (v_i - centre) on
                  keep_i, centre the coordinate-wise median over U_c, ||d_i|| over node i's sent entries
                  (the plain mean with each difference from the centre clipped to tau)

Products (FlexLoRA, FedEx-LoRA, FLoRA aggregate M = sum_i p_i B_i G_i A_i): the same rules on the dense
products M_i = B_i G_i A_i (d_out, d_in), per module (clipped: the norm of a module's product), so that
the robust model is still a product the method can refactor (FlexLoRA's SVD) or fold (FedEx-LoRA, FLoRA).
Cost: the senders' products of one module at a time, |S| d_out d_in floats, on the server (every rank).

Krum compares whole uploads, so every node must upload the same components: FSLoRA's sketches never are,
nor heterogeneous ranks (HetLoRA, FlexLoRA, FLoRA), and the config refuses it for them. Otherwise Krum
picks one node (``krum_weights``) and the method builds the server model from its upload alone.

A rule returns the aggregate the method uses in place of its own plain one. Where it cuts nothing
(trimmed_mean with trim 0 or too few senders of a coordinate, clipped with no difference beyond tau) the
method's plain aggregate is returned as it is, so such a run is the plain run bit for bit. Where it cuts,
the aggregate is computed from what the rule keeps, never as the plain mean plus a correction, in which a
huge upload would cancel the honest values' digits in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from declora.config import RobustConfig
from declora.robust import clip_coefficients, clipped_sum, krum_index, trimmed_cut


def slice_mask(keep: Tensor, x: Tensor, dim: int) -> Tensor:
    """(m, ...) bool like x: True on the slices ``keep`` (m, r) of x along ``dim`` (the rank axis)."""
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = keep.shape[1]
    return keep.to(x.device).view(shape).expand_as(x)


def masked_median(values: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    """Per coordinate, the w-weighted median of the values its senders (mask) sent; 0 where none did.
    values: (k, D), w: (k,), mask: (k, D) bool -> (D,)."""
    last = torch.where(mask, values, torch.full_like(values, float("inf")))  # unsent values sort last
    ordered, order = last.sort(dim=0, stable=True)
    # Summed in float64 and compared with weighted_median's relative slack, so that "reaches half" does
    # not turn on rounding: ten weights of 0.1 reach half at the fifth (the lower middle value), as there.
    wm = w.double()[:, None] * mask  # (k, D)
    cum = wm.gather(0, order).cumsum(0)
    count = mask.sum(0)  # (D,)
    pick = (cum < wm.sum(0) / 2 * (1 - 1e-9)).sum(0, keepdim=True)
    pick = torch.minimum(pick, (count - 1).clamp(min=0)[None])  # (1, D)
    return torch.where(count > 0, ordered.gather(0, pick)[0], torch.zeros_like(values[0]))


def masked_trimmed_mean(values: Tensor, w: Tensor, mask: Tensor, trim: float, plain: Tensor) -> Tensor:
    """Per coordinate over its senders: floor(trim k_c) of each tail dropped (at least one value kept),
    the rest renormalized to the senders' weight P_c and summed; ``plain`` (D,) where nothing is dropped.
    values: (k, D), w: (k,), mask: (k, D) bool -> (D,)."""
    count = mask.sum(0)  # (D,)
    cuts = [trimmed_cut(c, trim) for c in range(int(count.max()) + 1)]  # the server rule's cut for c senders
    cut = torch.tensor(cuts).clamp(min=0).to(count.device)[count]  # (D,); (its float64 floor, not float32's)
    if int(cut.max()) == 0:
        return plain
    last = torch.where(mask, values, torch.full_like(values, float("inf")))
    rank = last.argsort(dim=0, stable=True).argsort(dim=0, stable=True)  # senders first, in order
    keep = mask & (rank >= cut) & (rank < count - cut)
    wm = w[:, None] * mask
    kept = wm * keep
    total = kept.sum(0)
    new = kept * torch.where(total > 0, wm.sum(0) / total, torch.zeros_like(total))
    trimmed = (new * torch.where(keep, values, torch.zeros_like(values))).sum(0)
    return torch.where(cut > 0, trimmed, plain)


def upload_aggregate(
    cfg: RobustConfig,
    values: dict[str, Tensor],
    weights: Tensor,
    plain: dict[str, Tensor],
    masks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Rule ``cfg.aggregator``'s aggregate of the uploads ``values`` (name -> (n, ...), zero where not
    sent) of the senders (weights (n,) > 0, summing to 1), in place of the method's plain aggregate
    ``plain`` (name -> (...), sum_i w_i v_i), which is returned where the rule cuts nothing; masks:
    name -> (n, ...) bool, the entries each node sent (None: all). Returns name -> (...)."""
    senders = (weights > 0).nonzero().flatten()
    k = len(senders)
    flat = {n: v[senders].reshape(k, -1) for n, v in values.items()}  # (k, D)
    flat_plain = {n: plain[n].reshape(-1) for n in values}
    sent = {
        n: torch.ones_like(v, dtype=torch.bool) if masks is None else masks[n][senders].reshape(k, -1)
        for n, v in flat.items()
    }
    w = {n: weights[senders].to(v.device, v.dtype) for n, v in flat.items()}
    if cfg.aggregator == "clipped":
        centre = {n: masked_median(v, w[n], sent[n]) for n, v in flat.items()}
        diffs = {n: torch.where(sent[n], v - centre[n], torch.zeros_like(v)) for n, v in flat.items()}
        sq = sum(d.double().square().sum(1) for d in diffs.values())  # (k,)
        coef = clip_coefficients(torch.as_tensor(sq), cfg.clip_radius)  # (k,)
        if not bool((coef < 1).any()):
            out = flat_plain
        else:  # P_c centre_c + sum_i w_i clip(d_i, tau)_c over the senders of c
            out = {
                n: (w[n][:, None] * sent[n]).sum(0) * centre[n] + clipped_sum(coef.to(d.dtype) * w[n], d)
                for n, d in diffs.items()
            }
    elif cfg.aggregator == "trimmed_mean":
        out = {n: masked_trimmed_mean(v, w[n], sent[n], cfg.trim, flat_plain[n]) for n, v in flat.items()}
    elif cfg.aggregator == "median":
        out = {n: (w[n][:, None] * sent[n]).sum(0) * masked_median(v, w[n], sent[n]) for n, v in flat.items()}
    else:
        raise ValueError(f"robust.aggregator={cfg.aggregator!r} has no rule for partial uploads")
    return {n: out[n].view(values[n].shape[1:]) for n in values}


def mean_product(A: Tensor, B: Tensor, gate: Tensor | None, p: Tensor) -> Tensor:
    """M = sum_i p_i B_i G_i A_i: A (n, r, d_in), B (n, d_out, r), gate (n, r) or None -> (d_out, d_in)."""
    Bg = B if gate is None else B * gate.to(B.device, B.dtype)[:, None, :]
    return torch.einsum("n,nor,nri->oi", p.to(A.device, A.dtype), Bg, A)


def product_aggregate(
    cfg: RobustConfig, A: Tensor, B: Tensor, gate: Tensor | None, p: Tensor, plain: Tensor
) -> Tensor | None:
    """The rule's aggregate of the senders' dense products B_i G_i A_i of one module (p: (n,), 0 for
    non-senders) in place of the method's plain ``plain`` (d_out, d_in); None where it cuts nothing."""
    take = (p > 0).nonzero().flatten()
    Bg = B[take] if gate is None else B[take] * gate.to(B.device, B.dtype)[take][:, None, :]
    products = Bg @ A[take]  # (k, d_out, d_in)
    robust = upload_aggregate(cfg, {"M": products}, p[take], {"M": plain})["M"]
    return None if torch.equal(robust, plain) else robust


def krum_weights(values: dict[str, Tensor], weights: Tensor, f: int) -> Tensor:
    """(n,) weights with all the weight on Krum's choice among the senders' whole uploads values:
    name -> (n, ...)."""
    senders = (weights > 0).nonzero().flatten()
    flat = torch.cat([v[senders].reshape(len(senders), -1) for v in values.values()], 1)  # (k, D)
    chosen = torch.zeros_like(weights)
    chosen[senders[krum_index(flat, f)]] = 1.0
    return chosen
