"""An algorithm of your own, in one file: Dec-LoRA that gossips only every ``every``-th round and trains
locally in between (periodic averaging, the decentralized form of local SGD). Run it, or compare it with
the shipped methods, by naming this file in ``plugins``:

    declora run plugins=[examples/periodic_gossip.py] algorithm.name=periodic_gossip
    declora run plugins=[examples/periodic_gossip.py] algorithm.name=periodic_gossip algorithm.options.every=4

docs/extending.md walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from declora.algorithms import register
from declora.algorithms.base import RoundContext, RoundPlan, trained_kinds
from declora.algorithms.mixing import gossip_kinds
from declora.model import Federation


@dataclass
class PeriodicGossip:
    fed: Federation  # every node's stacked tensors over the one frozen base
    cfg: Any = None  # the run's Config: this algorithm reads cfg.algorithm.options
    schedule: Any = None  # the graph schedule (W per round); gossip_kinds gets this round's W in ctx
    name: str = "periodic_gossip"
    single_node: bool = False  # True would make it a centralized method: one node holding all the data

    @staticmethod
    def check_config(cfg: Any) -> None:
        """Called when the config is checked, before any work: a mistyped option must not pass silently."""
        options = cfg.algorithm.options
        every = options.get("every", 2)
        if set(options) - {"every"} or not isinstance(every, int) or every < 1:
            raise ValueError(f"takes algorithm.options.every, an integer >= 1, alone; got {options}")

    def __post_init__(self) -> None:
        self.every = self.cfg.algorithm.options.get("every", 2) if self.cfg is not None else 2

    def plan(self, t: int) -> RoundPlan:
        """What trains in round t (before local training): the factors, and the head if it is trained."""
        return RoundPlan(train=trained_kinds(self.fed))

    def communicate(self, ctx: RoundContext) -> None:
        """After local training: gossip with the neighbours every ``every`` rounds, else nothing is sent."""
        if (ctx.round + 1) % self.every == 0:
            gossip_kinds(ctx, trained_kinds(self.fed))

    def server_tensors(self, fed: Federation) -> dict[str, Tensor] | None:
        return None  # no server model (a server method returns its model here, scored as acc_server)


register("periodic_gossip", PeriodicGossip)
