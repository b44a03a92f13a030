"""TAD-LoRA: topology-aware alternating LoRA for dynamic, sparse graphs.

Wang, Li, Zhou, Li, Liu. "TAD-LoRA." arXiv 2602.00451 (2026).
docs/algorithms.md: phase mismatch, sparse dynamic graphs.

The ADF-LoRA round (global phase p = phase(t); train only factor p; mix BOTH factors and a trained
head with W(t) every round):

    A_i <- sum_j W_ij(t) A_j      B_i <- sum_j W_ij(t) B_j

with a switching interval matched to the topology. switch_interval="auto" (set it: the config's default
is the fixed 5) picks

    T = ceil(auto_c / sqrt(1 - rho))  clipped to [1, auto_max],   rho = lambda_2(E[W(t)^T W(t)])

[M: the paper's T*(rho) ~ Theta(1/sqrt(1 - rho)) made operational; auto_c = 3, auto_max = 20 are config
fields]. A sparser graph (rho nearer 1) gets longer phases. ``rho`` and ``interval`` are logged and kept
as attributes (rho is None for a fixed T). The paper freezes the head (model.head=frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from declora.algorithms.adf_lora import ADFLoRA
from declora.algorithms.alternating import build_clock


@dataclass
class TADLoRA(ADFLoRA):
    """ADF-LoRA's round with the switching interval read from the graph (``switch_interval=auto``)."""

    name: str = "tad_lora"
    rho: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.acfg = self.cfg.algorithm
        self.clock, self.rho = build_clock(self.acfg, self.schedule, self.name, allow_auto=True)
        self.interval = self.clock.interval
