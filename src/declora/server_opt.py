"""Server optimizers: how a server turns the participants' mean change into its next model.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan. "Adaptive Federated Optimization."
ICLR 2021 (FedAdagrad, FedYogi, FedAdam); Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification." 2019 (FedAvgM).

The server model x (node axis 1) and the participants' weighted mean change (the pseudo-gradient)

    Delta = sum_{i in S} p_i (x_i - x)            p_i: uniform or by data size (server.weighting)

    average:  x <- x + Delta                     (plain FedAvg: the weighted mean of the uploads)
    sgd:      x <- x + lr Delta
    avgm:     m <- b1 m + Delta;                  x <- x + lr m
    adagrad:  m <- b1 m + (1 - b1) Delta;  v <- v + Delta^2;    x <- x + lr m / (sqrt(v) + tau)
    yogi:     m as adagrad;  v <- v - (1 - b2) Delta^2 sign(v - Delta^2);   x as adagrad
    adam:     m as adagrad;  v <- b2 v + (1 - b2) Delta^2;                  x as adagrad
    adamw:    torch AdamW (bias-corrected, eps 1e-8, decoupled weight decay) on g = -Delta: the server
              of FSLoRA's code, which FSLoRA and HetLoRA use by default

Moments start at zero (Reddi et al. start v at tau^2 or more; with v = 0 the first step of yogi equals
adam's, a tested invariant). Every rule acts elementwise on each named tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from declora.config import Config

RULES = ("average", "sgd", "avgm", "adagrad", "yogi", "adam", "adamw")
DEFAULT_LR = {"average": 1.0, "sgd": 1.0, "avgm": 1.0, "adagrad": 1e-2, "yogi": 1e-2, "adam": 1e-2}
ADAMW_EPS = 1e-8


def second_moment(rule: str, v: Tensor, d2: Tensor, b2: float) -> Tensor:
    """v after one round of ``rule`` (adagrad, yogi, adam) given Delta^2 ``d2``."""
    if rule == "adagrad":
        return v + d2
    if rule == "yogi":
        return v - (1 - b2) * d2 * torch.sign(v - d2)
    return b2 * v + (1 - b2) * d2


@dataclass
class ServerOptimizer:
    """One server rule with its moments per tensor name (created on first use, checkpointed)."""

    rule: str
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3
    weight_decay: float = 0.0  # adamw only
    m: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"server.optimizer={self.rule!r} is not allowed; choose one of {list(RULES)}")

    @torch.no_grad()
    def step(self, x: dict[str, Tensor], delta: dict[str, Tensor]) -> None:
        """Move each ``x[k]`` in place by its rule, given ``delta[k]`` (same shape) for every k in delta."""
        for k, d in delta.items():
            self.steps[k] = self.steps.get(k, 0) + 1
            if self.rule == "average":
                x[k].add_(d)
            elif self.rule == "sgd":
                x[k].add_(d, alpha=self.lr)
            elif self.rule == "avgm":
                m = self.m.setdefault(k, torch.zeros_like(d))
                m.mul_(self.betas[0]).add_(d)
                x[k].add_(m, alpha=self.lr)
            elif self.rule == "adamw":
                self._adamw(k, x[k], -d)
            else:
                self._adaptive(k, x[k], d)

    def _adaptive(self, k: str, x: Tensor, d: Tensor) -> None:
        b1, b2 = self.betas
        m = self.m.setdefault(k, torch.zeros_like(d))
        m.mul_(b1).add_(d, alpha=1 - b1)
        self.v[k] = second_moment(self.rule, self.v.get(k, torch.zeros_like(d)), d * d, b2)
        x.addcdiv_(m, self.v[k].sqrt() + self.tau, value=self.lr)

    def _adamw(self, k: str, x: Tensor, g: Tensor) -> None:
        """torch AdamW, in the order of optim.NodeAdamW (the device optimizer), so the numbers agree."""
        b1, b2 = self.betas
        m = self.m.setdefault(k, torch.zeros_like(g))
        v = self.v.setdefault(k, torch.zeros_like(g))
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = torch.tensor(float(self.steps[k]), dtype=x.dtype)
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        x.mul_(1 - self.lr * self.weight_decay)
        x.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(ADAMW_EPS), value=-self.lr)

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"m/{k}": t for k, t in self.m.items()} | {f"v/{k}": t for k, t in self.v.items()}
        return out | {f"steps/{k}": torch.tensor(s) for k, s in self.steps.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, t in state.items():
            part, name = key.split("/", 1)
            if part == "steps":
                self.steps[name] = int(t)
            else:
                getattr(self, part)[name] = t.clone()


# The server rule each method uses when server.optimizer is auto: FSLoRA's and HetLoRA's papers step the
# server with AdamW on the mean delta; every other server method applies the mean as it is.
PAPER_SERVER_RULE = {"fslora": "adamw", "hetlora": "adamw"}


def server_rule(cfg: Config) -> str:
    """server.optimizer, or the method's own rule when it is ``auto``."""
    if cfg.server.optimizer != "auto":
        return cfg.server.optimizer
    return PAPER_SERVER_RULE.get(cfg.algorithm.name, "average")


def build_server_optimizer(cfg: Config) -> ServerOptimizer:
    """The run's server rule (``server_rule``) with its learning rate, betas and tau."""
    s, a = cfg.server, cfg.algorithm
    rule = server_rule(cfg)
    if rule == "adamw":  # FSLoRA's server: its lr, weight decay and torch's betas unless set
        lr = s.lr if s.lr is not None else a.server_lr
        betas = s.betas if s.betas is not None else (0.9, 0.999)
        return ServerOptimizer(rule, lr, betas, s.tau, a.server_weight_decay)
    lr = s.lr if s.lr is not None else DEFAULT_LR[rule]
    return ServerOptimizer(rule, lr, s.betas if s.betas is not None else (0.9, 0.99), s.tau)
