"""The shared phase clock of the alternating methods: ADF-LoRA, TAD-LoRA, RoLoRA and RoLoRA-DFL.

docs/algorithms.md: phase mismatch, optimizer state. One global clock, so every node trains the same
factor in a round:

    phase(t) = first_phase  if floor(t / T) is even  else the other factor

- ``first_phase`` = cfg.algorithm.first_phase, default "B" [M: order]: B = 0 at init makes grad_A = 0.
- T = cfg.algorithm.switch_interval (default 5, ADF-LoRA's best). Only TAD-LoRA may set it to "auto":

      T = ceil(auto_c / sqrt(1 - rho))  clipped to [1, auto_max]      (auto_c = 3, auto_max = 20)

  with rho = lambda_2(E[W^T W]) from ``schedules.expected_contraction`` [M: TAD-LoRA's T*(rho) ~
  Theta(1/sqrt(1 - rho)) made operational; the paper sweeps T]. rho >= 1 (never mixes) gives auto_max.
- At a phase switch, cfg.algorithm.optimizer_policy [M]: "reset" (default) clears the moments and step
  counts of the factor that becomes active (stale since its last phase), "keep" leaves them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from declora.algorithms.base import RoundContext
from declora.config import AlgorithmConfig
from declora.schedules import Schedule, expected_contraction

log = logging.getLogger(__name__)
OTHER = {"A": "B", "B": "A"}


def auto_interval_refused(name: str) -> str:
    """Why switch_interval='auto' is refused for ``name`` (the config check and build_clock say the same)."""
    return (
        f"algorithm.switch_interval='auto' is TAD-LoRA's rule; algorithm.name={name} needs a positive "
        "integer (or use algorithm.name=tad_lora)"
    )


@dataclass(frozen=True)
class PhaseClock:
    interval: int  # T: rounds per phase
    first: str = "B"

    def __post_init__(self) -> None:
        if self.interval < 1 or self.first not in OTHER:
            raise ValueError(
                f"phase clock needs interval >= 1 and first in ['A', 'B'], "
                f"got interval={self.interval}, first={self.first!r}"
            )

    def phase(self, t: int) -> str:
        """The factor every node trains in round t."""
        return self.first if (t // self.interval) % 2 == 0 else OTHER[self.first]

    def switches_after(self, t: int) -> bool:
        return self.phase(t + 1) != self.phase(t)


def auto_interval(rho: float, c: float, max_interval: int) -> int:
    """TAD-LoRA's topology-aware interval: ceil(c / sqrt(1 - rho)) clipped to [1, max_interval]."""
    if rho >= 1.0:
        return max_interval
    return min(max(1, math.ceil(c / math.sqrt(1.0 - rho))), max_interval)


def build_clock(
    acfg: AlgorithmConfig, schedule: Schedule | None, name: str, allow_auto: bool = False
) -> tuple[PhaseClock, float | None]:
    """The clock from the config, and rho when T was chosen by the "auto" rule (else None)."""
    interval = acfg.switch_interval
    if interval != "auto":
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"algorithm.switch_interval={interval!r} must be a positive integer or 'auto'")
        return PhaseClock(interval, acfg.first_phase), None
    if not allow_auto:
        raise ValueError(auto_interval_refused(name))
    if schedule is None:
        raise ValueError(f"{name} with switch_interval='auto' needs the topology schedule to estimate rho")
    if acfg.auto_max < 1:
        raise ValueError(f"algorithm.auto_max={acfg.auto_max} must be a positive integer")
    rho, stderr = expected_contraction(schedule)
    interval = auto_interval(rho, acfg.auto_c, acfg.auto_max)
    log.info("%s: rho = %.4f +- %.4f, switch interval T = %d", name, rho, stderr, interval)
    return PhaseClock(interval, acfg.first_phase), rho


def end_of_round(ctx: RoundContext, clock: PhaseClock, policy: str) -> None:
    """After round t's communication: if round t+1 opens a new phase, apply the optimizer policy."""
    if policy not in ("reset", "keep"):
        raise ValueError(f"algorithm.optimizer_policy={policy!r} is not allowed; choose one of reset, keep")
    if policy == "reset" and clock.switches_after(ctx.round):
        ctx.optimizer.reset(list(ctx.fed.tensors((clock.phase(ctx.round + 1),))))
