"""Server optimizers (server_opt.py), weighting and client sampling (algorithms/server.py): the rules on
tiny tensors, then one real round of every server algorithm on the tiny BERT."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from unit_helpers import perturb, round_context, tiny_experiment

from declora.algorithms.server import participants
from declora.config import ConfigError, load_config
from declora.server_opt import ServerOptimizer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _run(opt: ServerOptimizer, x0: Tensor, deltas: list) -> Tensor:
    x = {"w": x0.clone()}
    for d in deltas:
        opt.step(x, {"w": d})
    return x["w"]


def _deltas(k: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, generator=g) for _ in range(k)]


def test_sgd_lr1_and_avgm_without_momentum_are_averaging():
    x0, ds = torch.randn(2, 5), _deltas()
    plain = _run(ServerOptimizer("average"), x0, ds)
    assert torch.allclose(plain, x0 + sum(ds), atol=1e-6)
    assert torch.allclose(_run(ServerOptimizer("sgd", lr=1.0), x0, ds), plain, atol=1e-6)
    assert torch.allclose(_run(ServerOptimizer("avgm", lr=1.0, betas=(0.0, 0.99)), x0, ds), plain, atol=1e-6)


def test_avgm_is_heavy_ball_momentum():
    x0, (d1, d2) = torch.zeros(2, 5), _deltas(2)
    out = _run(ServerOptimizer("avgm", lr=0.5, betas=(0.9, 0.99)), x0, [d1, d2])
    assert torch.allclose(out, 0.5 * d1 + 0.5 * (0.9 * d1 + d2), atol=1e-6)


def test_adaptive_rules_first_steps():
    x0, (d1, d2) = torch.zeros(2, 5), _deltas(2)
    # FedAdam with b1 = b2 = 0 and tau = 0 is sign descent on the mean change: x + lr sign(Delta)
    sign = _run(ServerOptimizer("adam", lr=0.1, betas=(0.0, 0.0), tau=0.0), x0, [d1])
    assert torch.allclose(sign, 0.1 * torch.sign(d1), atol=1e-6)
    # from zero moments the first yogi step is adam's (v = (1 - b2) Delta^2 for both)
    yogi = _run(ServerOptimizer("yogi", lr=0.1, tau=1e-3), x0, [d1])
    assert torch.allclose(yogi, _run(ServerOptimizer("adam", lr=0.1, tau=1e-3), x0, [d1]), atol=1e-7)
    # adagrad: v accumulates Delta^2, m is the b1-average of Delta
    ada = _run(ServerOptimizer("adagrad", lr=0.1, betas=(0.9, 0.99), tau=1e-3), x0, [d1, d2])
    m1, m2 = 0.1 * d1, 0.9 * 0.1 * d1 + 0.1 * d2
    want = 0.1 * m1 / (d1.abs() + 1e-3) + 0.1 * m2 / ((d1**2 + d2**2).sqrt() + 1e-3)
    assert torch.allclose(ada, want, atol=1e-6)


def test_adamw_is_torch_adamw_on_minus_delta():
    x0, ds = torch.randn(2, 5), _deltas(3)
    ours = _run(ServerOptimizer("adamw", lr=0.01, betas=(0.9, 0.999), weight_decay=0.1), x0, ds)
    p = torch.nn.Parameter(x0.clone())
    opt = torch.optim.AdamW([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for d in ds:
        p.grad = -d
        opt.step()
    assert torch.allclose(ours, p.detach(), atol=1e-6)


def test_state_round_trips():
    x0, ds = torch.randn(2, 5), _deltas(4)
    full = _run(ServerOptimizer("yogi", lr=0.1), x0, ds)
    first = ServerOptimizer("yogi", lr=0.1)
    half = _run(first, x0, ds[:2])
    second = ServerOptimizer("yogi", lr=0.1)
    second.load_state_dict(first.state_dict())
    assert torch.equal(_run(second, half, ds[2:]), full)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("server.optimizer=lamb", "server.optimizer"),
        ("server.weighting=median", "server.weighting"),
        ("server.fraction=0", "server.fraction"),
        ("server.lr=-1", "server.lr"),
        ("server.betas=[0.9,1.0]", "server.betas"),
    ],
)
def test_bad_server_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_fraction_and_clients_per_round_together_are_refused():
    with pytest.raises(ConfigError, match="set only one"):
        load_config(None, ["algorithm.name=fedavg", "server.fraction=0.5", "algorithm.clients_per_round=2"])


def test_sampling_is_seeded_per_round_and_fraction_one_is_everyone():
    cfg = load_config(None, ["algorithm.name=fedavg", "nodes=10", "server.fraction=0.3"])
    rounds = [participants(cfg, t) for t in range(5)]
    assert all(int(r.sum()) == 3 for r in rounds)
    assert torch.equal(rounds[2], participants(cfg, 2)) and not all(torch.equal(rounds[0], r) for r in rounds)
    assert bool(participants(load_config(None, ["algorithm.name=fedavg", "nodes=10"]), 0).all())


# ---------------------------------------------------------------- one round on the tiny BERT


def _round(exp, t: int = 0) -> dict:
    """Local training of the planned nodes, then the algorithm's aggregation; the nodes' tensors."""
    plan = exp.algorithm.plan(t)
    active = torch.ones(exp.n, dtype=torch.bool) if plan.active is None else plan.active
    exp.trainer.local_work(active, list(exp.fed.tensors(plan.train)), 1, "steps")
    before = {k: v.detach().clone() for k, v in exp.fed.tensors().items()}
    exp.algorithm.communicate(round_context(exp, t))
    return before


def _after(exp) -> dict:
    return {k: v.detach().clone() for k, v in exp.fed.tensors().items()}


def _close(a: dict, b: dict, atol: float = 1e-6) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["fedavg", "ffa_lora", "rolora", "fslora", "hetlora", "flexlora"])
def test_sgd_lr1_equals_averaging_for_every_server_algorithm(name, tiny_bert, tiny_data, tmp_path):
    runs = {}
    for rule in ("average", "sgd"):
        exp = tiny_experiment(
            tiny_bert, tiny_data, tmp_path / rule, f"algorithm.name={name}", f"server.optimizer={rule}"
        )
        perturb(exp)
        _round(exp, 0)
        _round(exp, 1)
        runs[rule] = _after(exp)
    _close(runs["sgd"], runs["average"], atol=1e-5)


def test_fedavg_weighting_size_and_uniform_on_unequal_data(tiny_bert, tiny_data, tmp_path):
    for rule in ("uniform", "size"):
        exp = tiny_experiment(
            tiny_bert,
            tiny_data,
            tmp_path / rule,
            "algorithm.name=fedavg",
            "partition.kind=quantity_skew",
            f"server.weighting={rule}",
        )
        sizes = torch.tensor([len(p) for p in exp.parts], dtype=torch.float32)
        assert len(set(sizes.tolist())) > 1  # the test needs unequal data
        before = _round(exp)
        p = sizes / sizes.sum() if rule == "size" else torch.full((exp.n,), 1 / exp.n)
        for k, v in exp.fed.tensors().items():
            want = torch.einsum("n,n...->...", p, before[k])
            torch.testing.assert_close(v.detach(), want.expand_as(v), atol=1e-6, rtol=0)


def test_fedadam_moves_from_the_server_model_and_every_node_holds_it(tiny_bert, tiny_data, tmp_path):
    exp = tiny_experiment(
        tiny_bert, tiny_data, tmp_path, "algorithm.name=fedavg", "server.optimizer=adam", "server.lr=0.05"
    )
    perturb(exp)
    x0 = {k: v.detach()[0].clone() for k, v in exp.fed.tensors().items()}
    before = _round(exp)
    for k, v in exp.fed.tensors().items():
        d = before[k].mean(0) - x0[k]
        m, sq = 0.1 * d, (0.01 * d * d).sqrt()
        want = x0[k] + 0.05 * m / (sq + 1e-3)
        torch.testing.assert_close(v.detach(), want.expand_as(v), atol=1e-6, rtol=1e-5)
    assert set(exp.algorithm.state_dict()) >= {f"server/{k}" for k in x0}


def test_hetlora_with_full_ranks_and_averaging_is_fedavg(tiny_bert, tiny_data, tmp_path):
    out = {}
    for name in ("fedavg", "hetlora"):
        exp = tiny_experiment(
            tiny_bert, tiny_data, tmp_path / name, f"algorithm.name={name}", "server.optimizer=average"
        )
        perturb(exp)
        _round(exp)
        out[name] = _after(exp)
    _close(out["hetlora"], out["fedavg"])


def test_sampled_round_trains_only_the_sample_and_everyone_gets_the_server_model(
    tiny_bert, tiny_data, tmp_path
):
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=fedavg", "server.fraction=0.5")
    perturb(exp)
    plan = exp.algorithm.plan(3)
    assert int(plan.active.sum()) == 2 and torch.equal(plan.active, participants(exp.cfg, 3))
    exp.exchange.ledger.start_round()
    before = _round(exp, 3)
    for k, v in exp.fed.tensors().items():
        torch.testing.assert_close(v.detach(), before[k][plan.active].mean(0).expand_as(v), atol=1e-6, rtol=0)
    up = exp.exchange.ledger.edges.diagonal()
    assert torch.equal(up > 0, plan.active)  # only the sample uploads
    assert exp.exchange.ledger.server_sent == 4 * int(up.max())  # the new model goes to all 4 (fp32)


def test_fraction_one_is_no_sampling(tiny_bert, tiny_data, tmp_path):
    out = {}
    for extra in ((), ("server.fraction=1.0",)):
        exp = tiny_experiment(
            tiny_bert, tiny_data, tmp_path / str(len(extra)), "algorithm.name=fedavg", *extra
        )
        assert exp.algorithm.plan(0).active is None
        _round(exp)
        out[len(extra)] = _after(exp)
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k])


@pytest.mark.parametrize("name", ["fedavg", "fslora", "hetlora", "flexlora"])
def test_a_trained_head_follows_size_weighting_like_the_factors(name, tiny_bert, tiny_data, tmp_path):
    overrides = (f"algorithm.name={name}", "partition.kind=quantity_skew", "server.weighting=size")
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, *overrides, "server.optimizer=average")
    sizes = torch.tensor([len(p) for p in exp.parts], dtype=torch.float32)
    assert len(set(sizes.tolist())) > 1  # the test needs unequal data
    before = _round(exp)
    for k, v in exp.fed.tensors(("head",)).items():
        want = torch.einsum("n,n...->...", sizes / sizes.sum(), before[k])
        torch.testing.assert_close(v.detach(), want.expand_as(v), atol=1e-6, rtol=0, msg=k)


SERVED = ["fedavg", "ffa_lora", "rolora", "fedprox", "scaffold", "fedsa_lora", "fedex_lora", "flora"]
SERVED += ["hetlora", "fslora", "flexlora", "fed_sb"]


def _offline_round(exp, t: int, online: Tensor) -> None:
    plan = exp.algorithm.plan(t)
    active = online if plan.active is None else plan.active & online
    exp.trainer.local_work(active, list(exp.fed.tensors(plan.train)), 1, "steps")
    ctx = round_context(exp, t)
    ctx.online = online
    exp.algorithm.communicate(ctx)


@pytest.mark.parametrize("name", SERVED)
def test_a_node_offline_in_a_round_holds_the_server_model_after_it(name, tiny_bert, tiny_data, tmp_path):
    """Whoever missed the broadcast holds what the server holds, so acc_server scores the server model and
    the next round starts from it on every node (RoLoRA's frozen factor stays the same everywhere)."""
    exp = tiny_experiment(
        tiny_bert, tiny_data, tmp_path, f"algorithm.name={name}", "algorithm.switch_interval=1"
    )
    perturb(exp, same=True)
    online = torch.tensor([True, True, True, False])
    _offline_round(exp, 0, online)
    server = exp.algorithm.server_tensors(exp.fed)
    for k, v in exp.fed.tensors(("A", "B", "head")).items():
        if name == "fedsa_lora" and ".lora_A" not in k:
            continue  # FedSA keeps each node's own B and head
        torch.testing.assert_close(v.detach()[3], v.detach()[0], atol=1e-6, rtol=0, msg=k)
        if server is not None and k in server:  # FedSA: no one server model (each node keeps its B)
            torch.testing.assert_close(server[k][0], v.detach()[0], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["fedavg", "fedex_lora", "scaffold"])
def test_a_node_coming_back_books_one_download_of_what_it_missed(name, tiny_bert, tiny_data, tmp_path):
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, f"algorithm.name={name}")
    perturb(exp)
    all_on, one_off = torch.ones(4, dtype=torch.bool), torch.tensor([True, True, True, False])
    ledger = exp.exchange.ledger
    sent = []
    for t, online in enumerate([all_on, one_off, one_off, all_on, all_on]):
        before = ledger.total
        _offline_round(exp, t, online)
        sent.append(ledger.total - before)
    factors = sum(v[0].numel() * 4 for v in exp.fed.tensors(("A", "B", "head")).values())
    dense = sum(4 * layer.B.shape[1] * layer.A.shape[2] for layer in exp.fed.lora.values())
    back = factors + (dense if name == "fedex_lora" else 0)  # FedEx: the missed residuals, summed
    back += factors if name == "scaffold" else 0  # SCAFFOLD: the server's control variate c too
    assert sent[3] - sent[4] == back  # round 3: node 3 fetches once what it missed in rounds 1 and 2
    assert sent[1] == sent[2] and sent[0] == sent[4]


def test_flora_books_the_uploads_and_the_stack_once(tiny_bert, tiny_data, tmp_path):
    """A FLoRA node starts each round from a fresh seeded adapter: it fetches nothing before training, so
    a round is each node's own slices up and the stack of all of them down to every node."""
    exp = tiny_experiment(tiny_bert, tiny_data, tmp_path, "algorithm.name=flora", "algorithm.ranks=[1,2,4,3]")
    ledger = exp.exchange.ledger
    before = ledger.total
    _round(exp)
    per_rank = sum(4 * (layer.A.shape[2] + layer.B.shape[1]) for layer in exp.fed.lora.values())
    head = sum(v[0].numel() * 4 for v in exp.fed.tensors(("head",)).values())
    stack = sum([1, 2, 4, 3]) * per_rank
    assert ledger.total - before == stack + 4 * stack + 2 * 4 * head  # up; the stack to 4 nodes; heads


def test_a_node_back_online_books_the_parts_it_missed_not_this_rounds(tiny_llama, tiny_data, tmp_path):
    """RoLoRA broadcasts B in one round and A in the next. On a layer that is not square the two differ in
    size, so the bytes tell which one a returning node is booked for: the latest version of every factor
    broadcast while it was away (fetched before it trains), beside this round's download."""
    from declora.engine import run

    exp = tiny_experiment(
        tiny_llama,
        tiny_data,
        tmp_path,
        "algorithm.name=rolora",
        "algorithm.switch_interval=1",
        "model.target_modules=[v_proj]",  # 32 -> 16 (grouped keys and values): A is r x 32, B is 16 x r
        "model.head=none",
        "task.kind=label_words",
        "task.label_words=[' zero', ' one']",
        "topology.node_dropout=0.4",
        "rounds=6",
        "eval.every=6",
        "seed=1",
    )
    size = {kind: sum(v[0].numel() * 4 for v in exp.fed.tensors((kind,)).values()) for kind in ("A", "B")}
    assert size["A"] == 2 * size["B"]
    records = run(exp)
    missed = {kind: torch.zeros(4, dtype=torch.bool) for kind in ("A", "B")}
    returned = 0
    for t, record in enumerate(records):
        online, kind = exp.schedule.online(t).cpu(), exp.algorithm.clock.phase(t)
        fetched = sum(int((missed[k] & online).sum()) * size[k] for k in ("A", "B"))
        returned += bool(fetched)
        assert record["bytes_round"] == 2 * int(online.sum()) * size[kind] + fetched, t
        missed = {k: (~online if k == kind else m & ~online) for k, m in missed.items()}
    assert returned >= 2  # the dropout schedule of seed 1 brings nodes back in several rounds
