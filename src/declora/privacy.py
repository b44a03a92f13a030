"""Differential privacy: clipped, noised messages (``privacy.level: node``) or per-example clipped, noised
gradients (``privacy.level: example``), and the budget they spend, from opacus' accountants.

Node level. Every time node i sends (a gossip, a share, a server upload), it sends

    m_t = m_prev + clip(x_t - m_prev, C) + sigma * C * z,     clip(d, C) = d * min(1, C / ||d||)

with x_t its tensors of that exchange, m_prev a public reference of those tensors (declora.guard: at
first the common initial adapter; in gossip and DeCAF the state the node's last mix gave, which mixed its
own message; for a server method whose nodes start each round from the server model, that model, which every
node fetched: DP-FedAvg's reference; else its previous message), ||.|| over all the tensors of the
exchange together, and z ~ N(0, I)
drawn from (seed, "privacy", round, tensor, node): the same numbers in one process and under torchrun.
Seeded noise makes a run reproducible, and lets anyone who knows the seed (it is in config.yaml) recompute
the noise and subtract it: a simulation of DP. ``privacy.secure_noise: true`` draws it (and DP-SGD's
batch order) from the operating system's entropy instead, written nowhere: what a deployment needs.
Noise is added before the codec encodes the message. Nothing is claimed for the node's own state (in
gossip it mixes its message, so its state after a mix is public; its training is not).

Guarantee (node level). For each node i, the sequence of all messages i sends during the run is
(epsilon, delta)-DP with respect to node i's whole local dataset, under the *zero-out* relation: the
neighbouring run is one where node i's data is replaced by data whose every clipped change is zero (add /
remove of the node's contribution, as user-level DP-FedAvg, McMahan et al., ICLR 2018). Each message is a
Gaussian mechanism of sensitivity C and noise sigma * C given everything sent before (adaptive
composition), so the accountant composes ``steps`` mechanisms at sampling rate 1. The adversary may see
every message of every node; what neighbours do with the messages is post-processing. For the *replace*
relation (node i's data swapped for any other data) the sensitivity is 2C: the epsilon is that of
noise multiplier sigma / 2. The guarantee says nothing about a node's own state or its evaluation.

Example level (DP-SGD, Abadi et al., CCS 2016). In every local step node i clips each of its examples'
gradients to C (norm over every trained tensor), sums them, adds sigma * C * z and divides by its batch
size b_i; z is drawn from (seed, "privacy", "example", node, step). The guarantee is per example of node
i's data, under the add/remove relation, for everything node i computes and sends; the accountant is fed
node i's sampling rate q_i = b_i / |D_i| and its number of steps. As in Opacus' default data loaders
being replaced by fixed shuffled batches, the accounting assumes Poisson sampling at rate q_i, which the
batches (shuffled, fixed size) approximate.

The accountant is opacus' RDP accountant (``privacy.accountant: rdp``, Mironov 2017) or its PRV
accountant (``prv``, Gopi et al. 2021). Only the accountants are used: never Opacus' PrivacyEngine or
GradSampleModule (opacus #820: silent wrong LoRA updates with PEFT >= 0.14); the per-example gradients
come from declora's own stacked layers.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from declora.config import PrivacyConfig
from declora.seeding import torch_generator

log = logging.getLogger(__name__)


def import_accountants() -> Any:
    """opacus.accountants (with its utils). opacus calls logging.basicConfig when first imported, which
    would give an application's root logger a handler, so that its own basicConfig did nothing: the root
    logger's handlers and level are put back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import opacus.accountants
        import opacus.accountants.utils
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return opacus.accountants


@functools.lru_cache(maxsize=4096)
def epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """The epsilon at ``delta`` of ``steps`` sampled Gaussian mechanisms, from opacus' accountant."""
    if steps == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    accountants = import_accountants()
    acc = accountants.RDPAccountant() if accountant == "rdp" else accountants.PRVAccountant()
    acc.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # PRV at sample rate 1 (node level: every message is sent) takes log(0) of the rate's complement
        # on the way; the epsilon is right (it matches the exact Gaussian mechanism), the warning is noise.
        warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
        value = float(acc.get_epsilon(delta))
    for warning in caught:  # opacus' own words would break the console's one line per event
        if "Optimal order is the" in str(warning.message):
            _loose_rdp_bound()
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return value


@functools.cache
def _loose_rdp_bound() -> None:
    """Once per process: the RDP accountant's best order was the last it tries, so its epsilon is an
    upper bound that larger orders would lower (opacus warns of it at every call)."""
    log.warning(
        "the RDP accountant's epsilon is an upper bound here, possibly loose (its best order was the "
        "largest it tries, as with much noise or few steps); privacy.accountant=prv gives a tighter one"
    )


@functools.lru_cache(maxsize=256)
def noise_for(target: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``target`` epsilon at ``delta`` in ``steps`` steps (opacus)."""
    get_noise_multiplier = import_accountants().utils.get_noise_multiplier
    try:
        with warnings.catch_warnings():  # the search tries extreme sigmas, whose alpha warnings mean nothing
            warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
            warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
            sigma = get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
    except ValueError as err:  # opacus: "The privacy budget is too low."
        raise ValueError(
            f"privacy.target_epsilon={target:g} cannot be reached at privacy.delta={delta:g} in {steps} "
            f"steps at sample rate {sample_rate:g} by any noise multiplier the {accountant} accountant "
            f"finds ({err}); raise privacy.target_epsilon or privacy.delta, or run fewer rounds"
        ) from err
    return float(sigma)


def resolve_sigma(cfg: PrivacyConfig, plans: list[tuple[float, int]]) -> float:
    """sigma as given, or the smallest that keeps every node's planned (sample rate, steps) within
    ``target_epsilon``."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.target_epsilon is not None  # validated
    return max(noise_for(cfg.target_epsilon, q, s, cfg.delta, cfg.accountant) for q, s in set(plans))


# ---------------------------------------------------------------- node level: messages


def clip_change(
    x: dict[str, Tensor], prev: dict[str, Tensor], clip: float, masks: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """m_prev + clip(x - m_prev, C) per row (node), the norm over all the tensors together; written as
    x + (c - 1)(x - m_prev) so that an unclipped row is x exactly. x, prev: name -> (m, ...); masks:
    name -> (m, ...) bool, the entries each node sends (a masked upload): the change, its norm and so its
    clipping are over those entries only, and every other entry stays x."""
    diffs = {k: v - prev[k] if masks is None else (v - prev[k]) * masks[k] for k, v in x.items()}
    sq = sum(d.double().reshape(d.shape[0], -1).square().sum(1) for d in diffs.values())  # (m,)
    coef = (clip / torch.as_tensor(sq).sqrt()).clamp(max=1.0)  # (m,)
    return {k: v + (coef.to(v.dtype) - 1).view(-1, *[1] * (v.dim() - 1)) * diffs[k] for k, v in x.items()}


def noise_std(sigma: float, clip: float) -> float:
    """sigma * C, with no noise at all for sigma = 0 (also with an infinite clip)."""
    return sigma * clip if sigma > 0 else 0.0


def gaussian_noise(shape: torch.Size, std: float, *keys: int | str, seed: int | None) -> Tensor:
    """std * N(0, I) of ``shape`` from the generator of (seed, *keys); ``seed=None``
    (privacy.secure_noise): from a generator seeded with the operating system's entropy, which nothing
    keeps, so no one can draw the same noise again."""
    if seed is None:
        return std * torch.randn(shape, generator=torch.Generator().manual_seed(secrets.randbits(63)))
    return std * torch.randn(shape, generator=torch_generator(seed, *keys))


def privatize(
    x: dict[str, Tensor],
    prev: dict[str, Tensor],
    clip: float,
    std: float,
    nodes: Tensor,
    seed: int | None,
    round: int,
    masks: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """What the nodes ``nodes`` (m,) send: their clipped change plus noise of std ``std`` (= sigma C);
    with ``masks`` (see clip_change) only on the entries each node sends; ``seed=None``: secure noise."""
    out = clip_change(x, prev, clip, masks)
    if std == 0:
        return out
    for name, v in out.items():
        noise = torch.stack(
            [gaussian_noise(v.shape[1:], std, "privacy", round, name, int(i), seed=seed) for i in nodes]
        ).to(v.device, v.dtype)
        out[name] = v + (noise if masks is None else noise * masks[name])
    return out


class PrivacyAccount:
    """Mechanisms each of this process's nodes has run, and the epsilon they add up to."""

    def __init__(self, cfg: PrivacyConfig, sigma: float, sample_rates: Tensor) -> None:
        self.cfg, self.sigma = cfg, sigma
        self.rates = sample_rates.double()  # (m,)
        self.steps = torch.zeros(len(sample_rates), dtype=torch.long)  # (m,)

    def spend(self, nodes: Tensor) -> None:
        """One more mechanism for the local rows where ``nodes`` (m,) bool is True."""
        self.steps += nodes.long()

    def epsilons(self, steps: Tensor, rates: Tensor) -> list[float]:
        c = self.cfg
        return [
            epsilon(self.sigma, float(q), int(s), c.delta, c.accountant)
            for q, s in zip(rates.tolist(), steps.tolist(), strict=True)
        ]

    def summary(self, group) -> dict[str, object]:
        """Per-round metrics: every node's epsilon so far (gathered over processes), its max and mean."""
        steps, rates = group.gather_nodes(self.steps), group.gather_nodes(self.rates)
        eps = self.epsilons(steps, rates)
        return {
            "privacy_epsilon_max": max(eps),
            "privacy_epsilon_mean": sum(eps) / len(eps),
            "privacy_epsilon": eps,
            "privacy_delta": self.cfg.delta,
            "privacy_noise_multiplier": self.sigma,
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.steps.copy_(state["steps"])


# ---------------------------------------------------------------- example level: DP-SGD in the batched pass


def _per_weight(captured: list[tuple[Tensor, Tensor, Tensor]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One (weight, rows, gradient) per trained tensor: a module that runs several times in a forward
    (ALBERT shares one layer across its depth) hands one gradient per call, and an example's gradient is
    their sum; its norm, not the root of the calls' squared norms, is what must stay within the clip."""
    merged: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for weight, rows, g in captured:
        if id(weight) not in merged:
            merged[id(weight)] = (weight, rows, g)
            continue
        _, first_rows, total = merged[id(weight)]
        if not torch.equal(first_rows, rows):  # every call of one micro-batch gathers the same rows
            raise RuntimeError("example-level DP: one tensor was gathered for different rows in one pass")
        merged[id(weight)] = (weight, rows, total + g)
    return list(merged.values())


@dataclass
class ExampleDP:
    """Per-example clipping and per-node noise for the local steps of this process's nodes."""

    clip: float
    account: PrivacyAccount  # its steps count each node's DP-SGD steps: the noise's key
    nodes: Tensor  # (m,) global ids of the local rows
    seed: int | None  # None: noise from the operating system's entropy (privacy.secure_noise)

    def clip_into(self, captured: list[tuple[Tensor, Tensor, Tensor]], weights: Tensor) -> None:
        """Add sum_k w_k clip(g_k, C) to ``.grad`` from the per-row gradients ``captured`` of one
        micro-batch (``lora.row_gradients``: w_k g_k, w_k = 1/b_i the row's loss weight (rows,))."""
        if not captured:
            return
        if any(g.shape[0] != weights.shape[0] for _, _, g in captured):
            raise RuntimeError("example-level DP needs one gradient per row: the per-row LoRA product")
        captured = _per_weight(captured)
        sq = sum(g.double().reshape(g.shape[0], -1).square().sum(1) for _, _, g in captured)  # (rows,)
        assert isinstance(sq, Tensor)  # captured is not empty
        norms = torch.as_tensor(sq).sqrt() / weights.to(sq.device, torch.float64)  # unweighted ||g_k||
        coef = (self.clip / norms).clamp(max=1.0)  # (rows,)
        for weight, rows, g in captured:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            scaled = g * coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
            weight.grad.index_add_(0, rows, scaled.to(weight.dtype))

    def add_noise(
        self, params: Mapping[str, Tensor], names: list[str], active: Tensor, batch: Tensor
    ) -> None:
        """grad_i += sigma C z / b_i for every active node i (batch: (m,) its batch size this step) and
        trained tensor, z from (seed, "privacy", "example", node, its step, tensor); counts the step."""
        std = noise_std(self.account.sigma, self.clip)
        for r in active.nonzero().flatten().tolist():
            step, node = int(self.account.steps[r]), int(self.nodes[r])
            for name in names:
                p = params[name]
                if std == 0 or p.grad is None:
                    continue
                z = gaussian_noise(p.shape[1:], std, "privacy", "example", node, step, name, seed=self.seed)
                p.grad[r] += (z / float(batch[r])).to(p.grad.device, p.grad.dtype)
        self.account.spend(active)
