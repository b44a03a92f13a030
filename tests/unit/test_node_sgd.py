"""Per-node SGD with momentum: torch.optim.SGD per node, and steps that average like one pooled step."""

import re

import pytest
import torch

from declora.config import ConfigError, TrainConfig, load_config
from declora.optim import NodeAdamW, NodeSGD, build_optimizer


@pytest.mark.parametrize("nesterov", [False, True])
def test_node_sgd_with_changing_active_sets_equals_one_torch_sgd_per_node(nesterov):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(3, 4, 2))
    refs = [torch.nn.Parameter(ours.detach()[i].clone()) for i in range(3)]
    opt = NodeSGD({"x": ours}, {"x": 0.05}, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    ref_opts = [
        torch.optim.SGD([r], lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01) for r in refs
    ]
    actives = [[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 1, 1]]
    for step, active in enumerate(actives):
        g = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(step))
        ours.grad = g.clone()
        opt.step(torch.tensor(active, dtype=torch.bool), ["x"])
        for i in range(3):
            if active[i]:
                refs[i].grad = g[i].clone()
                ref_opts[i].step()
    for i in range(3):
        torch.testing.assert_close(ours.detach()[i], refs[i].detach(), atol=1e-6, rtol=0)
        buf = ref_opts[i].state[refs[i]]["momentum_buffer"]
        torch.testing.assert_close(opt.state["momentum_buffer"]["x"][i], buf, atol=1e-6, rtol=0)
    assert opt.steps["x"].tolist() == [4, 4, 5]


@pytest.mark.parametrize("make", [lambda p, lr: NodeSGD(p, lr), lambda p, lr: NodeAdamW(p, lr)])
def test_a_per_node_lr_scale_equals_that_nodes_scaled_lr(make):
    torch.manual_seed(1)
    start = torch.randn(2, 3)
    scaled = torch.nn.Parameter(start.clone())
    opt = make({"w": scaled}, {"w": 0.1})
    opt.lr_scale = torch.tensor([1.0, 0.5])
    singles = [torch.nn.Parameter(start[i : i + 1].clone()) for i in range(2)]
    refs = [make({"w": s}, {"w": lr}) for s, lr in zip(singles, (0.1, 0.05), strict=True)]
    for step in range(3):
        g = torch.randn(2, 3, generator=torch.Generator().manual_seed(step))
        scaled.grad = g.clone()
        opt.step(torch.tensor([True, True]), ["w"])
        for i, (s, ref) in enumerate(zip(singles, refs, strict=True)):
            s.grad = g[i : i + 1].clone()
            ref.step(torch.tensor([True]), ["w"])
    torch.testing.assert_close(scaled.detach(), torch.cat([s.detach() for s in singles]), atol=1e-6, rtol=0)


def _averaged_every_step(opt_cls, n=4, steps=6):
    """n nodes from one start, each stepping on its own gradient, averaged after every step."""
    torch.manual_seed(2)
    start = torch.randn(5, 3)
    nodes = torch.nn.Parameter(start.expand(n, 5, 3).clone())
    opt = opt_cls({"x": nodes}, {"x": 0.05})
    grads = [torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(s)) for s in range(steps)]
    for g in grads:
        nodes.grad = g.clone()
        opt.step(torch.ones(n, dtype=torch.bool), ["x"])
        with torch.no_grad():
            nodes.copy_(nodes.mean(0, keepdim=True).expand_as(nodes))
    return nodes.detach()[0], start, grads


def test_sgd_steps_averaged_every_step_equal_one_step_on_the_pooled_gradient():
    consensus, start, grads = _averaged_every_step(NodeSGD)
    pooled = torch.nn.Parameter(start.clone())
    ref = torch.optim.SGD([pooled], lr=0.05, momentum=0.9)
    for g in grads:
        pooled.grad = g.mean(0)
        ref.step()
    torch.testing.assert_close(consensus, pooled.detach(), atol=1e-6, rtol=0)


def test_adamw_steps_averaged_every_step_are_not_the_pooled_step():
    """Why train.optimizer=sgd exists: AdamW normalizes each node's step by its own gradient scale."""
    consensus, start, grads = _averaged_every_step(NodeAdamW)
    pooled = torch.nn.Parameter(start.clone())
    ref = torch.optim.AdamW([pooled], lr=0.05, weight_decay=0.0)
    for g in grads:
        pooled.grad = g.mean(0)
        ref.step()
    assert (consensus - pooled.detach()).abs().max() > 0.05


def test_reset_clears_the_momentum_of_the_named_nodes_only():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = NodeSGD({"x": p}, {"x": 0.1})
    p.grad = torch.ones(3, 2)
    opt.step(torch.ones(3, dtype=torch.bool), ["x"])
    opt.reset(["x"], torch.tensor([False, True, False]))
    assert opt.state["momentum_buffer"]["x"].sum(1).tolist() == [2.0, 0.0, 2.0]
    assert opt.steps["x"].tolist() == [1, 0, 1]


def test_the_config_builds_the_named_optimizer():
    params = {"x": torch.nn.Parameter(torch.zeros(2, 3))}
    sgd = build_optimizer(TrainConfig(optimizer="sgd", momentum=0.5, nesterov=True), params, {"x": 0.1})
    assert isinstance(sgd, NodeSGD) and (sgd.momentum, sgd.nesterov) == (0.5, True)
    assert isinstance(build_optimizer(TrainConfig(), params, {"x": 0.1}), NodeAdamW)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.optimizer=rmsprop"], "train.optimizer='rmsprop' is not allowed"),
        (["train.momentum=0.5"], "train.momentum=0.5 has no effect with train.optimizer=adamw"),
        (["train.optimizer=sgd", "train.eps=1e-6"], "train.eps=1e-06 has no effect with train.optimizer=sgd"),
        (["train.optimizer=sgd", "train.momentum=1.0"], "train.momentum=1.0 is out of range"),
        (["train.optimizer=sgd", "train.momentum=0", "train.nesterov=true"], "needs train.momentum > 0"),
    ],
)
def test_optimizer_settings_that_would_be_ignored_or_unsound_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
