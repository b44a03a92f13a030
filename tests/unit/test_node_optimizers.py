"""Per-node optimizers: one torch optimizer per node, SGD steps that average like one pooled step."""

import re

import pytest
import torch

from declora.config import ConfigError, TrainConfig, load_config
from declora.optim import NodeAdamW, NodeSGD, build_optimizer

pytestmark = pytest.mark.unit

OPTIMIZERS = {  # ours (per node) and torch's (one node), with the same settings
    "adamw": (
        lambda p: NodeAdamW(p, {"x": 0.01}, weight_decay=0.1),
        lambda r: torch.optim.AdamW([r], lr=0.01, weight_decay=0.1),
    ),
    "sgd": (
        lambda p: NodeSGD(p, {"x": 0.05}, momentum=0.9, weight_decay=0.01),
        lambda r: torch.optim.SGD([r], lr=0.05, momentum=0.9, weight_decay=0.01),
    ),
    "sgd_nesterov": (
        lambda p: NodeSGD(p, {"x": 0.05}, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda r: torch.optim.SGD([r], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_changing_active_sets_equal_one_torch_optimizer_per_node(name):
    ours_for, torch_for = OPTIMIZERS[name]
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(3, 4, 2))
    refs = [torch.nn.Parameter(ours.detach()[i].clone()) for i in range(3)]
    opt, ref_opts = ours_for({"x": ours}), [torch_for(r) for r in refs]
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
        for buffer in opt.buffers:  # torch names the state the same way
            theirs = ref_opts[i].state[refs[i]][buffer]
            torch.testing.assert_close(opt.state[buffer]["x"][i], theirs, atol=1e-6, rtol=0)
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


@pytest.mark.parametrize("name, pooled_equal", [("sgd", True), ("adamw", False)])
def test_steps_averaged_after_every_step_against_one_step_on_the_pooled_gradient(name, pooled_equal):
    """Why train.optimizer=sgd exists: SGD is linear in the gradient, so n nodes from one start, averaged
    after every step, move exactly as one optimizer on their mean gradient; AdamW divides each node's step
    by its own gradient scale, so its average does not."""
    ours_for, torch_for = OPTIMIZERS[name]
    torch.manual_seed(2)
    start = torch.randn(5, 3)
    nodes = torch.nn.Parameter(start.expand(4, 5, 3).clone())
    pooled = torch.nn.Parameter(start.clone())
    opt, ref = ours_for({"x": nodes}), torch_for(pooled)
    for step in range(6):
        g = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(step))
        nodes.grad, pooled.grad = g.clone(), g.mean(0)
        opt.step(torch.ones(4, dtype=torch.bool), ["x"])
        ref.step()
        with torch.no_grad():
            nodes.copy_(nodes.mean(0, keepdim=True).expand_as(nodes))
    gap = (nodes.detach()[0] - pooled.detach()).abs().max()
    assert gap < 1e-6 if pooled_equal else gap > 0.01


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
