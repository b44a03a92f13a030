"""Byzantine nodes, to test robust mixing (``attack.kind``, ``attack.nodes``).

An attacker trains like everyone else; what it does wrong is one of:

    sign_flip   sends -x instead of its tensors x
    scaled      sends scale * x
    gaussian    sends x + std * z, z ~ N(0, I) drawn from (seed, "attack", round, tensor, node)
    label_flip  sends honestly, but trains on poisoned data: label y becomes K - 1 - y

The first three corrupt messages (every tensor of every exchange: gossip, shares and server uploads);
label_flip poisons the node's training labels once, before tokenization. An attacker keeps its own state
honest: only what its neighbours receive is corrupted. Metrics then report the honest nodes separately
(``*_honest``: their accuracy mean and min, their consensus, and the accuracy of their averaged factors).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from declora.config import AttackConfig
from declora.seeding import numpy_rng, torch_generator

MESSAGE_ATTACKS = ("sign_flip", "scaled", "gaussian")
DATA_ATTACKS = ("label_flip",)


def attacker_mask(cfg: AttackConfig, n: int, seed: int) -> Tensor:
    """(n,) bool: the attacking nodes; ids as given, or round(fraction * n) nodes drawn from the seed
    (Python's round: a half goes to the even count; config refuses a fraction that rounds to none)."""
    mask = torch.zeros(n, dtype=torch.bool)
    if cfg.kind == "none" or cfg.nodes is None:
        return mask
    if isinstance(cfg.nodes, float):
        count = int(round(cfg.nodes * n))
        mask[torch.as_tensor(numpy_rng(seed, "attack", "nodes").choice(n, count, replace=False))] = True
        return mask
    mask[list(cfg.nodes)] = True
    return mask


def corrupt(cfg: AttackConfig, name: str, x: Tensor, attackers: Tensor, nodes: Tensor, seed: int, round: int):
    """The messages x: (m, ...) of the nodes ``nodes`` (m,) global ids, with the attackers' rows
    (``attackers``: (n,) bool, global) replaced by what they send instead."""
    rows = attackers[nodes].nonzero().flatten().tolist()
    if cfg.kind not in MESSAGE_ATTACKS or not rows:
        return x
    x = x.clone()
    for r in rows:
        if cfg.kind == "sign_flip":
            x[r] = -x[r]
        elif cfg.kind == "scaled":
            x[r] = cfg.scale * x[r]
        else:
            z = torch.randn(x[r].shape, generator=torch_generator(seed, "attack", round, name, int(nodes[r])))
            x[r] = x[r] + cfg.std * z.to(x.device, x.dtype)
    return x


def flip_labels(
    labels: np.ndarray, parts: list[np.ndarray], attackers: Tensor, num_labels: int
) -> np.ndarray:
    """label_flip: a copy of the training labels where every example of an attacker's part has label
    K - 1 - y (its partition, made from the true labels, is unchanged)."""
    out = labels.copy()
    for i in attackers.nonzero().flatten().tolist():
        out[parts[i]] = num_labels - 1 - labels[parts[i]]
    return out
