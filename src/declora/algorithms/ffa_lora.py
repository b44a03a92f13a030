"""FFA-LoRA: federated LoRA with A frozen at the shared init; a server averages only B (and a head).

Sun, Li, Li, Ding. "Improving LoRA in Privacy-preserving Federated Learning." ICLR 2024.
docs/algorithms.md: cross-term, initialization.

Every node starts from the same A^0 (model.init_seed) and B^0 = 0. Each round the participants S
train B_i (and a trained head), and the server sends back

    B <- sum_{i in S} p_i B_i        head <- sum_{i in S} p_i head_i        A = A^0 forever
(p_i by server.weighting, uniform 1/|S| by default, and moved by server.optimizer)

Exact aggregation: mean_i(B_i) A^0 = mean_i(B_i A^0), so there is no cross-term error; half the
communication of FedAvg-LoRA. The decentralized analogue is dlora_fa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from declora.algorithms.fedavg import FedAvg


@dataclass
class FFALoRA(FedAvg):
    name: str = "ffa_lora"
    TRAINS: ClassVar[tuple[str, ...]] = ("B",)  # A stays at the shared A^0
