"""Algorithm maths on raw tensors: DeCAF's product mix and TSVD, the phase clock, TAD's auto interval."""

from __future__ import annotations

import pytest
import torch

from declora.algorithms.alternating import PhaseClock, auto_interval, build_clock
from declora.algorithms.decaf import neighbour_table, product_mix
from declora.algorithms.tad_lora import TADLoRA
from declora.config import AlgorithmConfig, Config, TopologyConfig
from declora.schedules import build_schedule

pytestmark = pytest.mark.unit


def _factors(n: int, d_out: int, d_in: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, d_in, generator=g, dtype=torch.float64)  # (n, r, d_in)
    B = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)  # (n, d_out, r)
    return A, B


def _ring(n: int) -> torch.Tensor:
    W = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        W[i, i] = W[i, (i + 1) % n] = W[i, (i - 1) % n] = 1 / 3
    return W


def _tsvd(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_decaf_complete_graph_gives_rank_r_truncation_of_mean_product(split):
    n, d_out, d_in, r = 4, 12, 10, 3
    A, B = _factors(n, d_out, d_in, r)
    W = torch.full((n, n), 1 / n, dtype=torch.float64)
    A2, B2 = product_mix(A, B, W, split)
    assert A2.shape == A.shape and B2.shape == B.shape
    target = _tsvd((B @ A).mean(0), r)  # dense reference, (d_out, d_in)
    for i in range(n):
        torch.testing.assert_close(B2[i] @ A2[i], target, atol=1e-10, rtol=1e-10)
    if split == "balanced":  # B^T B = A A^T = diag(S): the singular values split evenly
        torch.testing.assert_close(B2.mT @ B2, A2 @ A2.mT, atol=1e-10, rtol=1e-10)


def test_decaf_is_exact_when_the_mixed_product_has_rank_r():
    n, d_out, d_in, r = 5, 9, 11, 2
    A, B = _factors(n, d_out, d_in, r, seed=1)
    A = A[:1].expand_as(A).clone()  # one shared A: every sum_j W_ij B_j A has rank <= r
    W = _ring(n)
    A2, B2 = product_mix(A, B, W)
    expected = torch.einsum("ij,jab->iab", W, B @ A)  # (n, d_out, d_in): sum_j W_ij B_j A_j
    torch.testing.assert_close(B2 @ A2, expected, atol=1e-10, rtol=1e-10)


def test_decaf_uses_received_factors_for_neighbours_and_exact_ones_for_itself():
    n, d_out, d_in, r = 3, 6, 5, 2
    A, B = _factors(n, d_out, d_in, r, seed=2)
    A = A[:1].expand_as(A).clone()
    noisy = B + 0.1
    W = torch.full((n, n), 1 / n, dtype=torch.float64)
    A2, B2 = product_mix(A, B, W, received=(A, noisy))
    for i in range(n):
        mixed = sum(W[i, j] * (B[j] if j == i else noisy[j]) @ A[j] for j in range(n))
        torch.testing.assert_close(B2[i] @ A2[i], mixed, atol=1e-10, rtol=1e-10)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thin QRs: extra threads only spin on busy cores
    yield
    torch.set_num_threads(threads)


def test_decaf_never_forms_the_dense_matrix(one_thread):
    # 200_000 x 200_000 in fp32 is 160 GB per node; the factored TSVD only touches (d, n r) matrices.
    n, d, r = 3, 200_000, 4
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(1, r, d, generator=g) / d**0.5).expand(n, r, d).contiguous()  # shared A: exact mix
    B = torch.randn(n, d, r, generator=g)
    W = torch.full((n, n), 1 / n, dtype=torch.float64)
    A2, B2 = product_mix(A, B, W)
    assert A2.shape == (n, r, d) and B2.shape == (n, d, r) and A2.dtype == torch.float32
    probe = torch.randn(d, 2, generator=g)  # compare (B A) x without forming B A
    got = B2 @ (A2 @ probe)  # (n, d, 2)
    want = B.mean(0) @ (A[0] @ probe)
    torch.testing.assert_close(got, want.expand_as(got), atol=1e-4, rtol=1e-4)


def test_neighbour_table_pads_with_self_at_weight_zero():
    W = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0], [0.0, 0.25, 0.75, 0.0], [0, 0, 0, 1.0]])
    index, weight = neighbour_table(W.double())
    assert index.shape == (4, 3)
    assert index[0].tolist() == [0, 1, 0] and weight[0].tolist() == [0.5, 0.5, 0.0]
    assert index[1, 0] == 1 and dict(zip(index[1].tolist(), weight[1].tolist(), strict=True)) == {
        1: 0.25,
        0: 0.5,
        2: 0.25,
    }
    assert index[3].tolist() == [3, 3, 3] and weight[3].tolist() == [1.0, 0.0, 0.0]  # isolated node


def test_phase_clock_alternates_every_interval_from_the_first_phase():
    clock = PhaseClock(2, "B")
    assert [clock.phase(t) for t in range(7)] == ["B", "B", "A", "A", "B", "B", "A"]
    assert [clock.switches_after(t) for t in range(4)] == [False, True, False, True]
    assert [PhaseClock(1, "A").phase(t) for t in range(3)] == ["A", "B", "A"]
    with pytest.raises(ValueError, match="interval"):
        PhaseClock(0)


def test_auto_interval_rule():
    assert auto_interval(0.0, 1.0, 20) == 1
    assert auto_interval(0.75, 1.0, 20) == 2  # 1 / sqrt(0.25)
    assert auto_interval(0.99, 3.0, 20) == 20  # clipped
    assert auto_interval(1.0, 1.0, 7) == 7  # never mixes: the longest phase


def test_only_tad_lora_accepts_auto():
    acfg = AlgorithmConfig(switch_interval="auto")
    with pytest.raises(ValueError, match="tad_lora"):
        build_clock(acfg, None, "adf_lora")
    with pytest.raises(ValueError, match="schedule"):
        build_clock(acfg, None, "tad_lora", allow_auto=True)


def test_tad_auto_gives_longer_phases_on_sparser_dynamic_graphs():
    # auto_c = 3: with the default c = 1 both graphs round up to T = 2 (rho ~ 0.67 vs 0.17).
    cfg = Config(algorithm=AlgorithmConfig(name="tad_lora", switch_interval="auto", auto_c=3.0))
    algos = {
        p: TADLoRA(None, cfg=cfg, schedule=build_schedule(TopologyConfig(schedule="dynamic_er", p=p), 10, 0))
        for p in (0.1, 0.5)
    }
    assert algos[0.1].rho > algos[0.5].rho
    assert algos[0.1].interval > algos[0.5].interval >= 1
    assert algos[0.1].clock.interval == algos[0.1].interval
    # the run's start line records what "auto" chose (config.yaml only says "auto")
    from declora.algorithms.base import chosen_settings

    assert chosen_settings(algos[0.1]) == {"switch_interval": algos[0.1].interval, "rho": algos[0.1].rho}
    fixed = TADLoRA(None, cfg=Config(algorithm=AlgorithmConfig(name="tad_lora", switch_interval=3)))
    assert chosen_settings(fixed) == {"switch_interval": 3}


def test_decaf_factors_agree_in_sign_when_products_agree():
    """Two nodes re-factorizing the same product from differently ordered neighbours get equal factors."""
    from declora.algorithms.decaf import tsvd_factors

    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    A = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    P = torch.cat([B[i] for i in range(3)], 1)  # (6, 6)
    Qt = torch.cat([A[i] for i in range(3)], 0).mT  # (5, 6)
    order = [2, 0, 1]
    P2 = torch.cat([B[i] for i in order], 1)
    Qt2 = torch.cat([A[i] for i in order], 0).mT
    Bf, Af = tsvd_factors(torch.stack([P, P2]), torch.stack([Qt, Qt2]), 2)
    torch.testing.assert_close(Bf[0], Bf[1], atol=1e-9, rtol=0)
    torch.testing.assert_close(Af[0], Af[1], atol=1e-9, rtol=0)
