"""Per-node optimizers on node-stacked tensors (AdamW, SGD with momentum), and per-node gradient clipping.

Row i of every tensor is node i's own parameter. A node that does not train in a step (inactive,
offline, or done with its epochs) neither moves nor changes its optimizer state; each node keeps its own
step count, so bias correction is per node: exactly what n independent torch optimizers would do.

Why two optimizers: AdamW (the default) divides each coordinate's step by that node's own running
gradient scale, so the mean of n nodes' steps is not the step one optimizer would take on their pooled
batch. SGD with momentum is linear in the gradient: with the nodes averaged after every step, the mean
of their steps is exactly the pooled step (train.optimizer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from declora.config import TrainConfig


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def clip_per_node(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale each node's gradient (over all tensors together) to norm <= max_norm; returns the norms (n,)."""
    sq = sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)  # (n,)
    norms = torch.as_tensor(sq).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        g.mul_(_rows(coef, g))
    return norms


class NodeOptimizer:
    """What the per-node optimizers share: the active rows, per-node step counts and learning rates,
    reset and checkpoint state. A subclass names its state buffers and updates the rows of one tensor."""

    buffers: tuple[str, ...] = ()  # per-node state tensors shaped like the parameter, zero at the start

    def __init__(self, params: dict[str, torch.nn.Parameter], lrs: dict[str, float]):
        self.params, self.lrs = params, lrs
        self.lr_scale: Tensor | None = None  # (n,) per-node factor on every lr (lr_schedule); None: 1
        self.state = {b: {k: torch.zeros_like(p) for k, p in params.items()} for b in self.buffers}
        self.steps = {
            k: torch.zeros(p.shape[0], dtype=torch.long, device=p.device) for k, p in params.items()
        }

    def update(
        self, param: Tensor, grad: Tensor, state: list[Tensor], steps: Tensor, lr: float | Tensor
    ) -> None:
        """Update ``param`` and ``state`` (the active rows) in place; lr: a float or (rows, 1, ...) tensor."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, active: Tensor, names: list[str]) -> None:
        """One step for the nodes in ``active`` (n,) bool, on the named tensors that have a gradient."""
        on: dict[torch.device, Tensor] = {}  # the active rows' ids on each device, copied there once a step
        scales: dict[torch.device, Tensor] = {}  # and their lr_scale
        for name in names:
            p = self.params[name]
            if p.device not in on:
                on[p.device] = torch.nonzero(active).flatten().to(p.device)  # active: maybe on the CPU
                if self.lr_scale is not None:
                    scales[p.device] = self.lr_scale.to(p.device)[on[p.device]]
            nodes = on[p.device]
            if p.grad is None or len(nodes) == 0:
                continue
            self.steps[name][nodes] += 1
            # All nodes active (the common case): update the tensors in place, with no per-node copies.
            # Otherwise work on the active rows and write them back, so idle rows stay untouched.
            every = len(nodes) == p.shape[0]
            full = [p, p.grad, *(self.state[b][name] for b in self.buffers)]
            param, grad, *state = (t if every else t.index_select(0, nodes) for t in full)
            lr: float | Tensor = self.lrs[name]
            if self.lr_scale is not None:  # lr * scale_i on node i's rows
                lr = _rows(lr * scales[p.device].to(p.dtype), p)
            self.update(param, grad, state, self.steps[name][nodes].to(p.dtype), lr)
            if not every:
                for target, rows in zip([p, *full[2:]], [param, *state], strict=True):
                    target.index_copy_(0, nodes, rows)

    def node_lrs(self, name: str) -> Tensor:
        """(n,) float32 on the CPU: every node's learning rate for tensor ``name`` this round (lr_scale)."""
        scale = torch.ones(self.params[name].shape[0]) if self.lr_scale is None else self.lr_scale.cpu()
        return self.lrs[name] * scale

    def reset(self, names: list[str] | None = None, nodes: Tensor | None = None) -> None:
        """Forget the state and step counts (after a re-factorization, say) for some tensors and nodes."""
        for name in names if names is not None else list(self.params):
            steps = self.steps[name]
            keep = torch.zeros_like(steps, dtype=torch.bool) if nodes is None else ~nodes.to(steps.device)
            self.steps[name] *= keep.long()
            for b in self.buffers:
                self.state[b][name] *= _rows(keep, self.state[b][name])

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for k in self.params:
            out.update({f"{b}/{k}": self.state[b][k] for b in self.buffers})
            out[f"steps/{k}"] = self.steps[k]
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.params:
            for b in self.buffers:
                self.state[b][k].copy_(state[f"{b}/{k}"])
            self.steps[k].copy_(state[f"steps/{k}"])


class NodeAdamW(NodeOptimizer):
    """AdamW (decoupled weight decay) with a step counter and moments per node and tensor."""

    buffers = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        lrs: dict[str, float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lrs)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def update(
        self, param: Tensor, grad: Tensor, state: list[Tensor], steps: Tensor, lr: float | Tensor
    ) -> None:
        (b1, b2), (m, v) = self.betas, state
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bc1, bc2 = _rows(1 - b1**steps, param), _rows(1 - b2**steps, param)
        param.mul_(1 - lr * self.weight_decay)  # decoupled weight decay, as torch AdamW
        if isinstance(lr, float):
            param.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(self.eps), value=-lr)
        else:
            param.sub_(lr * (m / bc1) / (v / bc2).sqrt_().add_(self.eps))


class NodeSGD(NodeOptimizer):
    """SGD with heavy-ball or Nesterov momentum and L2 weight decay: torch.optim.SGD without dampening."""

    buffers = ("momentum_buffer",)

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        lrs: dict[str, float],
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lrs)
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def update(
        self, param: Tensor, grad: Tensor, state: list[Tensor], steps: Tensor, lr: float | Tensor
    ) -> None:
        (buf,) = state
        if self.weight_decay:
            grad = grad.add(param, alpha=self.weight_decay)  # L2 in the gradient, as torch SGD
        # torch starts the buffer at the first gradient; a zero buffer times momentum plus it is the same.
        buf.mul_(self.momentum).add_(grad)
        direction = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        param.sub_(direction * lr)  # lr: a float, or one per row


def build_optimizer(
    train: TrainConfig, params: dict[str, torch.nn.Parameter], lrs: dict[str, float]
) -> NodeOptimizer:
    """The node optimizer a TrainConfig asks for (train.optimizer)."""
    if train.optimizer == "sgd":
        return NodeSGD(params, lrs, train.momentum, train.nesterov, train.weight_decay)
    return NodeAdamW(params, lrs, train.betas, train.eps, train.weight_decay)
