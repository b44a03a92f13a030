"""Per-node AdamW on node-stacked tensors, and per-node gradient clipping.

Row i of every tensor is node i's own parameter. A node that does not train in a step (inactive,
offline, or done with its epochs) neither moves nor changes its moments; each node keeps its own step
count, so bias correction is per node: exactly what n independent torch AdamW optimizers would do.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


class NodeAdamW:
    """AdamW (decoupled weight decay) with a step counter and moments per node and tensor."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        lrs: dict[str, float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.params, self.lrs = params, lrs
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.lr_scale: Tensor | None = None  # (n,) per-node factor on every lr (lr_schedule); None: 1
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = {
            k: torch.zeros(p.shape[0], dtype=torch.long, device=p.device) for k, p in params.items()
        }

    @torch.no_grad()
    def step(self, active: Tensor, names: list[str]) -> None:
        """One step for the nodes in ``active`` (n,) bool, on the named tensors that have a gradient."""
        b1, b2 = self.betas
        for name in names:
            p = self.params[name]
            nodes = torch.nonzero(active).flatten().to(p.device)  # active: (n,) bool, possibly on the CPU
            if p.grad is None or len(nodes) == 0:
                continue
            self.steps[name][nodes] += 1
            # All nodes active (the common case): update the tensors in place, with no per-node copies.
            # Otherwise work on the active rows and write them back, so idle rows stay untouched.
            every = len(nodes) == p.shape[0]
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            param, m, v, g = (t if every else t.index_select(0, nodes) for t in (p, m, v, p.grad))
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step = self.steps[name][nodes].to(p.dtype)
            bc1, bc2 = _rows(1 - b1**step, p), _rows(1 - b2**step, p)
            lr = self.lrs[name]
            if self.lr_scale is None:
                param.mul_(1 - lr * self.weight_decay)  # decoupled weight decay, as torch AdamW
                param.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(self.eps), value=-lr)
            else:  # the same step with a per-node lr: lr * scale_i on node i's rows
                node_lr = _rows(lr * self.lr_scale.to(p.device, p.dtype)[nodes], p)
                param.mul_(1 - node_lr * self.weight_decay)
                param.sub_(node_lr * (m / bc1) / (v / bc2).sqrt_().add_(self.eps))
            if not every:
                p.index_copy_(0, nodes, param)
                self.exp_avg[name].index_copy_(0, nodes, m)
                self.exp_avg_sq[name].index_copy_(0, nodes, v)

    def node_lrs(self, name: str) -> Tensor:
        """(n,) float32 on the CPU: every node's learning rate for tensor ``name`` this round (lr_scale)."""
        scale = torch.ones(self.params[name].shape[0]) if self.lr_scale is None else self.lr_scale.cpu()
        return self.lrs[name] * scale

    def reset(self, names: list[str] | None = None, nodes: Tensor | None = None) -> None:
        """Forget moments and step counts (after a re-factorization, say) for some tensors and nodes."""
        for name in names if names is not None else list(self.params):
            steps = self.steps[name]
            keep = torch.zeros_like(steps, dtype=torch.bool) if nodes is None else ~nodes.to(steps.device)
            self.steps[name] *= keep.long()
            self.exp_avg[name] *= _rows(keep, self.exp_avg[name])
            self.exp_avg_sq[name] *= _rows(keep, self.exp_avg_sq[name])

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for k in self.params:
            out[f"exp_avg/{k}"], out[f"exp_avg_sq/{k}"] = self.exp_avg[k], self.exp_avg_sq[k]
            out[f"steps/{k}"] = self.steps[k]
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.params:
            self.exp_avg[k].copy_(state[f"exp_avg/{k}"])
            self.exp_avg_sq[k].copy_(state[f"exp_avg_sq/{k}"])
            self.steps[k].copy_(state[f"steps/{k}"])
