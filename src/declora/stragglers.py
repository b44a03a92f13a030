"""Stragglers: simulated node speeds, a simulated wall clock, deadlines and asynchronous gossip.

Nothing here slows the real run down; the time a round would take is computed from each node's speed:

    c_i(t) = m_i * exp(jitter * z_{t,i}) * K_i * step_s        (simulated compute seconds)

m_i is node i's time multiplier (``stragglers.speeds``: one number per node, or ``lognormal``:
m_i = exp(sigma * z_i) drawn once from (seed, node)); z_{t,i} ~ N(0, 1) is drawn from (seed, round, node).
K_i is node i's local steps in a round: ``train.local_steps``, or with ``train.local_unit=epochs`` that many
passes over its data, ceil(|D_i| / batch_size) steps each (a node with more data takes longer).

- Deadline d: a node with c_i(t) > d sits round t out, exactly as an offline node (``topology.node_dropout``):
  it neither trains nor sends, and mixing leaves its state as it is (the schedule drops its edges).
- Clock: a round lasts max_{i trained} c_i(t), or d when a deadline is set and some node was silent (its
  neighbours wait until the deadline to know), plus link_s_per_mb * (MB sent by the busiest node).
- Asynchronous gossip: node i publishes its state every p_i = min(max_staleness + 1, round(w_i / min w))
  rounds, w_i = m_i K_i (a slow node finishes its local work less often); it trains only in those
  rounds, and every node mixes its own current state with its neighbours' last published copies:

      x_i <- W_ii x_i + sum_{j != i} W_ij x̂_j,     x̂_j = x_j as of round last_j,  t - last_j <= max_staleness

  A round then lasts max_i c_i(t) / p_i (each node spreads its local work over p_i rounds). With
  max_staleness = 0 every node publishes every round: synchronous gossip, bit for bit.

  With node-level DP, an attack or a robust rule (declora.guard), a node privatizes and corrupts at
  publication: its published copy x̂_j is the message it sent then (an attacker's is corrupted), only a
  publication spends privacy, and the robust rule mixes the node's own state (its message, when it
  published one under node-level DP) with its neighbours' last published copies.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from declora.algorithms import ASYNC_GOSSIP
from declora.config import Config, ConfigError, StragglersConfig
from declora.seeding import numpy_rng

log = logging.getLogger(__name__)


def enabled(cfg: Config) -> bool:
    return cfg.stragglers != StragglersConfig()


def validate_stragglers(cfg: Config) -> None:
    s = cfg.stragglers
    if cfg.algorithm.name == "centralized" and enabled(cfg):
        raise ConfigError(
            "stragglers with algorithm.name=centralized: one node has no one to wait for; drop the "
            "stragglers keys"
        )
    if isinstance(s.speeds, str) and s.speeds != "lognormal":
        raise ConfigError(
            f"stragglers.speeds={s.speeds!r} is not known; give one time multiplier per node or 'lognormal'"
        )
    if not isinstance(s.speeds, str) and s.speeds:
        if len(s.speeds) != cfg.nodes:
            raise ConfigError(
                f"stragglers.speeds has {len(s.speeds)} entries; nodes={cfg.nodes} needs one each"
            )
        bad = [x for x in s.speeds if not (math.isfinite(x) and x > 0)]
        if bad:
            raise ConfigError(f"stragglers.speeds={list(s.speeds)}: {bad[0]} is not a positive number")
    if s.deadline is not None and cfg.train.local_unit == "steps":  # epochs: checked once the data is read
        Stragglers(cfg, cfg.nodes).check_deadline()
    if s.max_staleness > 0 and not s.asynchronous:
        raise ConfigError(
            f"stragglers.max_staleness={s.max_staleness} needs stragglers.asynchronous=true (synchronous "
            "gossip has no stale copies)"
        )
    if not s.asynchronous:
        return
    if s.deadline is not None:  # the deadline reads a node's whole local work, not its share of a round
        raise ConfigError(
            f"stragglers.deadline={s.deadline} with stragglers.asynchronous=true: a slow node spreads its "
            "local work over several rounds there, and the deadline (on the whole work) would drop it from "
            "every round; choose one"
        )
    if cfg.algorithm.name not in ASYNC_GOSSIP:
        raise ConfigError(
            f"stragglers.asynchronous=true with algorithm.name={cfg.algorithm.name}: asynchrony replaces "
            f"plain gossip; choose one of {sorted(ASYNC_GOSSIP)}"
        )
    if cfg.comm.codec != "fp32":
        raise ConfigError(
            f"stragglers.asynchronous=true with comm.codec={cfg.comm.codec}: neighbours mix a held copy "
            "exactly as it was sent; use comm.codec=fp32"
        )


def multipliers(s: StragglersConfig, n: int, seed: int) -> np.ndarray:
    """(n,) each node's time multiplier m_i."""
    if s.speeds == "lognormal":
        return np.array(
            [math.exp(s.sigma * numpy_rng(seed, "stragglers", i).standard_normal()) for i in range(n)]
        )
    return np.array(s.speeds, dtype=np.float64) if s.speeds else np.ones(n)


def periods(m: np.ndarray, max_staleness: int) -> np.ndarray:
    """(n,) rounds between two publications of each node: its slowness relative to the fastest, capped."""
    return np.clip(np.rint(m / m.min()), 1, max_staleness + 1).astype(np.int64)


class Stragglers:
    """Each round's simulated compute times, deadline misses, publishers and clock (one per process, global:
    every process derives the same numbers from (seed, round, node))."""

    def __init__(self, cfg: Config, n: int) -> None:
        self.s, self.n, self.seed = cfg.stragglers, n, cfg.seed
        self.m = multipliers(self.s, n, cfg.seed)  # (n,)
        self.last = torch.full((n,), -1, dtype=torch.long)  # round each node last published; -1: initial
        self.publish = torch.ones(n, dtype=torch.bool)  # this round's publishers
        self.clock = 0.0
        self.set_steps(np.full(n, cfg.train.local_steps))

    def set_steps(self, steps: np.ndarray) -> None:
        """Each node's local steps per round, K_i (with ``local_unit=epochs`` they follow its data)."""
        self.steps = np.asarray(steps, dtype=np.float64)  # (n,)
        self.period = torch.from_numpy(periods(self.m * self.steps, self.s.max_staleness))  # (n,) int64

    def check(self) -> None:
        """Refuse a fixed deadline that every node misses (nothing would ever train); warn when
        asynchronous gossip has no slow node (every node publishes every round: synchronous gossip)."""
        if self.s.asynchronous and self.s.max_staleness > 0 and bool((self.period == 1).all()):
            speeds = self.s.speeds if isinstance(self.s.speeds, str) else list(self.s.speeds)
            log.warning(
                "stragglers.asynchronous=true, but no node is at least 1.5x slower than the fastest "
                "(stragglers.speeds=%s), so every node publishes every round: this is synchronous gossip",
                speeds,
            )
        self.check_deadline()

    def check_deadline(self) -> None:
        """A fixed deadline (no jitter) that every node misses would train nothing in any round."""
        d = self.s.deadline
        if d is None or self.s.jitter > 0:
            return
        c = self.compute_s(0)
        if (c > d).all():
            i = int(c.argmin())
            raise ConfigError(
                f"stragglers.deadline={d:g} is below every node's local work (the fastest, node {i}: "
                f"{c[i]:g} s = multiplier {self.m[i]:g} x {self.steps[i]:g} steps x stragglers.step_s="
                f"{self.s.step_s:g}): no node would ever train; raise the deadline"
            )

    def compute_s(self, t: int) -> np.ndarray:
        """(n,) simulated seconds of each node's local work in round t."""
        c = self.m * self.steps * self.s.step_s
        if self.s.jitter > 0:
            c = c * np.exp(
                self.s.jitter * numpy_rng(self.seed, "straggler_jitter", t).standard_normal(self.n)
            )
        return c

    def late(self, t: int) -> np.ndarray:
        """(n,) bool: nodes whose local work misses round t's deadline."""
        if self.s.deadline is None:
            return np.zeros(self.n, dtype=bool)
        return self.compute_s(t) > self.s.deadline

    def begin_round(self, t: int, online: Tensor) -> Tensor:
        """(n,) bool: the nodes that train and publish in round t (all online ones unless asynchronous)."""
        publish = online & (t - self.last >= self.period) if self.s.asynchronous else online.clone()
        self.last[publish] = t
        self.publish = publish
        return publish

    def end_round(
        self, t: int, W: Tensor, online: Tensor, trained: Tensor, busiest_bytes: int
    ) -> dict[str, Any]:
        """Round t's simulated duration and the running clock; the staleness of the copies mixed."""
        c = torch.from_numpy(self.compute_s(t))  # (n,)
        if self.s.asynchronous:
            spent = float((c / self.period)[online].max()) if online.any() else 0.0
        else:
            spent = float(c[trained].max()) if trained.any() else 0.0
        if self.s.deadline is not None and not online.all():
            spent = self.s.deadline  # a silent node is known to be silent only at the deadline
        spent += self.s.link_s_per_mb * busiest_bytes / 1e6
        self.clock += spent
        out: dict[str, Any] = {"sim_round_s": spent, "sim_s": self.clock}
        if self.s.deadline is not None:
            out["late_nodes"] = int(torch.from_numpy(self.late(t)).sum())
        if self.s.asynchronous:
            used = (W > 0) & ~torch.eye(self.n, dtype=torch.bool)  # [i, j]: i mixes j's copy
            age = (t - self.last).expand(self.n, self.n)[used].double()  # (edges,)
            out["staleness_mean"] = float(age.mean()) if len(age) else 0.0
            out["staleness_max"] = int(age.max()) if len(age) else 0
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {"clock": torch.tensor([self.clock], dtype=torch.float64), "last": self.last.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        # the checkpoint loads onto the run's device; the clock's bookkeeping stays on the CPU
        self.clock, self.last = float(state["clock"][0]), state["last"].cpu().clone()


class AsyncExchange:
    """An exchange whose gossip mixes the neighbours' last published copies; everything else is the inner
    exchange's (bytes: only this round's publishers send)."""

    def __init__(self, inner: Any, stragglers: Stragglers, tensors: dict[str, Tensor]) -> None:
        self.inner, self.stragglers = inner, stragglers
        self.held = {k: v.detach().clone() for k, v in tensors.items()}  # x̂: (n, ...) per tensor

    def __getattr__(self, name: str) -> Any:  # ledger, codec, server_mean, ...: the inner exchange's
        return getattr(self.__dict__["inner"], name)

    @property
    def publishing(self) -> Tensor:
        """(n,) bool: this round's publishers, the only nodes that send (declora.guard reads it)."""
        return self.stragglers.publish

    def share(self, messages: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        """The last published copies (n, ...) after this round's publishers that reach a neighbour have
        sent ``messages`` (as the inner exchange decodes them; bytes for those only). declora.guard
        mixes them with its robust rule; with every node publishing this is the inner share exactly."""
        n = W.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        sent = self.stragglers.publish & ((W.T != 0) & ~eye).any(1)  # (n,)
        table = self.inner.share(messages, W * (eye | sent[None, :]), round)  # non-senders' columns: 0
        for k, x in table.items():
            self.held[k][sent] = x[sent.to(x.device)].to(self.held[k].dtype)
        return {k: self.held[k].clone() for k in table}

    def gossip(self, tensors: dict[str, Tensor], W: Tensor, round: int) -> dict[str, Tensor]:
        publish = self.stragglers.publish.to(next(iter(tensors.values())).device) if tensors else None
        for k, x in tensors.items():
            self.held[k][publish] = x[publish]
        n = W.shape[0]
        off = ~torch.eye(n, dtype=torch.bool)
        stale = W * (off & ~self.stragglers.publish[None, :])  # (n, n)
        if not (stale != 0).any():
            return self.inner.gossip(tensors, W, round)  # every copy used is fresh: synchronous gossip
        if ((W - stale) * off != 0).any():
            fresh = self.inner.gossip(tensors, W - stale, round)  # publishers' messages and each own state
        else:  # no publisher reaches anyone, and the inner gossip would then keep all of each own state
            own = torch.diagonal(W)
            fresh = {
                k: own.to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1)) * x for k, x in tensors.items()
            }
        out = {}
        for k, x in fresh.items():
            held = self.held[k].reshape(n, -1)  # (n, m): the copies this round's receivers hold
            out[k] = x + (stale.to(x.device, x.dtype) @ held).view_as(x)
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.inner.state_dict(), **{f"async/{k}": v for k, v in self.held.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.held:
            self.held[k].copy_(state[f"async/{k}"])
        self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith("async/")})
