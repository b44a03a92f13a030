"""FedSA-LoRA: the server aggregates only the A factors; every node keeps its own B (and head).

Guo, Wu, Tang, Zhao, Chen, Zhou, Hu, Ding. "Selective Aggregation for Low-Rank Adaptation in Federated
Learning." ICLR 2025. The paper finds that A learns what is common to the clients and B what is specific
to each, so round t, participants S (algorithms/server.py):

    local:   every participant trains A_i and B_i (and a trained head)
    server:  A <- sum_{i in S} p_i A_i (or any server.optimizer on the mean change), sent to every
             online node;  B_i and head_i stay on node i (personalization)

Half of FedAvg-LoRA's message (only A). There is no single server model (B differs per node): the
headline is each node's own accuracy (acc_node_mean). Choice [M]: a trained head stays local, as B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from declora.algorithms.fedavg import FedAvg
from declora.model import Federation


@dataclass
class FedSALoRA(FedAvg):
    name: str = "fedsa_lora"
    AGGREGATES: ClassVar[tuple[str, ...] | None] = ("A",)  # B and a trained head stay on their node

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None  # every node runs the shared A with its own B: no one server model
