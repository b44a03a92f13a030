"""Codecs: unbiasedness and error bounds, exact byte counts, top-k selection and error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from declora.comm.codecs import CODECS, Codec, Encoded, QuantizeCodec, TopKCodec, build_codec

pytestmark = pytest.mark.unit

ALL_CODECS: list[tuple[str, dict]] = [
    ("fp32", {}),
    ("fp16", {}),
    ("bf16", {}),
    *[("quantize", {"bits": b}) for b in range(2, 9)],
    *[("quantize", {"bits": b, "block_size": 16}) for b in (2, 3, 5, 8)],
    ("topk", {"fraction": 0.1}),
    ("topk", {"fraction": 0.3, "value_dtype": "fp16", "error_feedback": True}),
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def message(n: int = 3, rows: int = 4, cols: int = 37, seed: int = 0) -> torch.Tensor:
    """(n, rows, cols) with a last dim that 16 does not divide, to exercise the short last block."""
    return torch.randn(n, rows, cols, generator=gen(seed))


def block_ranges(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """Per-entry max - min of the entry's block, same shape as x: blocks are last-dim rows (None) or run
    over each node's flattened message."""
    if block is not None:
        return _row_ranges(x.reshape(x.shape[0], -1), block).reshape(x.shape)
    return _row_ranges(x, x.shape[-1])


def _row_ranges(x: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], block):
        chunk = x[..., start : start + block]
        spread = chunk.amax(-1, keepdim=True) - chunk.amin(-1, keepdim=True)
        out[..., start : start + block] = spread.expand_as(chunk)
    return out


# ---------------------------------------------------------------- stochastic quantization


@pytest.mark.parametrize("block_size", [None, 8, 16])
@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_is_unbiased_and_within_one_step(bits: int, block_size: int | None) -> None:
    draws = 2000
    x = message(n=2, rows=3, cols=37)  # (2, 3, 37)
    codec = QuantizeCodec(bits=bits, block_size=block_size)
    # Stacking the same message `draws` times along the node axis gives independent draws in one call.
    decoded, _ = codec.roundtrip(x.repeat(draws, 1, 1), gen(bits))  # (draws * 2, 3, 37)
    decoded = decoded.reshape(draws, *x.shape)
    step = block_ranges(x, block_size) / (2**bits - 1)  # (2, 3, 37)
    # Each draw lies in [x - step, x + step]: Hoeffding puts the mean within step * sqrt(ln(2/d) / (2 draws))
    # with probability 1 - d per entry; d = 1e-6 over ~2000 entries keeps the seeded test far from flaky.
    assert ((decoded - x).abs() <= step * (1 + 1e-5) + 1e-6).all()
    bound = step * math.sqrt(math.log(2 / 1e-6) / (2 * draws))
    assert ((decoded.mean(0) - x).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("block_size", [None, 5])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_constant_rows_are_exact(bits: int, block_size: int | None) -> None:
    x = message(n=3, rows=4, cols=10)
    x[:, 1] = 0.37  # constant rows (also constant blocks)
    x[0, 2] = -5.0
    decoded, _ = QuantizeCodec(bits=bits, block_size=block_size).roundtrip(x, gen())
    assert torch.equal(decoded[:, 1], x[:, 1])
    assert torch.equal(decoded[0, 2], x[0, 2])


def test_quantize_handles_one_entry_per_node_and_block_larger_than_row() -> None:
    x = torch.randn(4, generator=gen())  # (n,): one scalar per node is a constant block
    decoded, nbytes = QuantizeCodec(bits=3).roundtrip(x, gen())
    assert torch.equal(decoded, x) and nbytes == 1 + 8
    y = message(rows=1, cols=7)  # one 7-entry row: a 64-entry block is the whole message
    wide, _ = QuantizeCodec(bits=8, block_size=64).roundtrip(y, gen(1))
    rowwise, _ = QuantizeCodec(bits=8).roundtrip(y, gen(1))
    assert torch.equal(wide, rowwise)


# ---------------------------------------------------------------- byte counts


def payload_bytes_per_node(enc: Encoded) -> int:
    """Independent count: slice out node 0's message and add up its tensors' bytes."""
    return sum(part[0].numel() * part[0].element_size() for part in enc.parts.values())


@pytest.mark.parametrize(("name", "params"), ALL_CODECS)
def test_bytes_equal_the_payload(name: str, params: dict) -> None:
    codec = build_codec(name, **params)
    assert isinstance(codec, Codec)
    x = message()
    enc = codec.encode(x, gen(), key="layer0.A")
    assert enc.shape == tuple(x.shape)
    assert all(part.shape[0] == x.shape[0] for part in enc.parts.values())
    assert enc.nbytes_per_node() == payload_bytes_per_node(enc)
    decoded, nbytes = build_codec(name, **params).roundtrip(x, gen(), key="layer0.A")
    assert nbytes == enc.nbytes_per_node()
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block_size", [None, 16])
def test_quantize_bytes_formula(bits: int, block_size: int | None) -> None:
    n, rows, cols = 3, 4, 37
    _, nbytes = QuantizeCodec(bits=bits, block_size=block_size).roundtrip(message(n, rows, cols), gen())
    blocks = rows if block_size is None else math.ceil(rows * cols / block_size)
    assert nbytes == math.ceil(rows * cols * bits / 8) + blocks * 2 * 4  # packed codes + fp32 (lo, scale)


def test_eight_bit_is_a_quarter_of_fp32_plus_exact_scale_overhead() -> None:
    n, rows, cols, block = 4, 8, 256, 64
    x = message(n, rows, cols)
    _, fp32 = build_codec("fp32").roundtrip(x)
    _, q8 = build_codec("quantize", bits=8, block_size=block).roundtrip(x, gen())
    overhead = rows * (cols // block) * 2 * 4  # one fp32 lo and one fp32 scale per block
    assert fp32 == 4 * rows * cols
    assert q8 == fp32 // 4 + overhead
    assert q8 / fp32 == pytest.approx(0.25 * (1 + 8 / block))


def test_cast_bytes_per_entry() -> None:
    x = message()
    m = x[0].numel()
    assert [build_codec(d).roundtrip(x)[1] for d in ("fp32", "fp16", "bf16")] == [4 * m, 2 * m, 2 * m]


# ---------------------------------------------------------------- casts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_roundtrip_within_epsilon(dtype: torch.dtype) -> None:
    x = message() * 10
    decoded, _ = build_codec({torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]).roundtrip(x)
    info = torch.finfo(dtype)
    # Round to nearest: relative error <= eps / 2 for normal numbers, half a subnormal step below them.
    assert ((decoded - x).abs() <= info.eps / 2 * x.abs() + info.smallest_normal * info.eps / 2).all()
    assert torch.equal(build_codec("fp32").roundtrip(x)[0], x)


def test_fp32_payload_does_not_alias_the_input() -> None:
    x = message()
    enc = build_codec("fp32").encode(x, None)
    x.add_(1.0)
    assert not torch.equal(enc.parts["values"], x)


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_k_largest_per_node(fraction: float) -> None:
    x = message(n=5)  # (5, 4, 37): 148 entries per node, all distinct and non-zero
    m = x[0].numel()
    codec = TopKCodec(fraction=fraction)
    decoded, nbytes = codec.roundtrip(x)
    k = math.ceil(fraction * m)
    assert codec.k(m) == k
    flat_x, flat_d = x.reshape(5, -1), decoded.reshape(5, -1)
    assert ((flat_d != 0).sum(1) == k).all()
    expected = flat_x.abs().topk(k, dim=1).indices.sort(1).values
    kept = (flat_d != 0).nonzero()[:, 1].reshape(5, k)
    assert torch.equal(kept, expected)
    assert torch.equal(flat_d.gather(1, kept), flat_x.gather(1, kept))
    assert nbytes == k * (4 + 4)


def test_topk_sends_the_lower_index_among_ties_whatever_the_rows_beside_it() -> None:
    """Adam's first steps are nearly all of one size: which tied entries cross the cut must not depend on
    how many nodes a process batches (torchrun's slices), or the runs part ways."""
    codec = TopKCodec(fraction=0.25)
    row = torch.tensor([[0.5, -1.0, 1.0, 0.2, -1.0, 1.0, 0.1, 0.3]])  # four tied at 1.0, two are kept
    alone = codec.encode(row).parts["indices"]
    assert alone.tolist() == [[1, 2]]
    batched = codec.encode(torch.cat([torch.randn(3, 8), row, torch.randn(2, 8)])).parts["indices"]
    assert batched[3].tolist() == [1, 2]


def test_topk_fraction_times_size_is_not_inflated_by_float_error() -> None:
    assert TopKCodec(fraction=0.1).k(100) == 10  # 0.1 * 100 is 10.000000000000002 in floating point
    assert TopKCodec(fraction=1e-6).k(100) == 1


def test_error_feedback_sends_the_signal_over_rounds() -> None:
    signal = message(n=3, rows=4, cols=25)  # (3, 4, 25), 100 entries per node
    codec = TopKCodec(fraction=0.05, error_feedback=True)
    sent = torch.zeros_like(signal)
    worst = []
    for t in range(1, 401):
        decoded, _ = codec.roundtrip(signal, key="layer0.A")
        sent += decoded
        worst.append((t * signal - sent).norm().item())  # equals the residual norm
    residual = codec.state_dict()["residual.layer0.A"]
    assert torch.allclose(400 * signal - sent, residual, atol=1e-3)
    assert max(worst[200:]) <= 1.01 * max(worst[:200])  # bounded: no growth in the second half
    assert (400 * signal - sent).norm() / (400 * signal).norm() < 0.05


def test_error_feedback_state_is_per_key_and_checkpointable() -> None:
    a, b = message(seed=1), message(n=2, rows=3, cols=5, seed=2)
    codec = TopKCodec(fraction=0.1, error_feedback=True)
    for _ in range(3):
        codec.encode(a, key="layer0.A")
        codec.encode(b, key="layer0.B")
    state = codec.state_dict()
    assert sorted(state) == ["residual.layer0.A", "residual.layer0.B"]
    assert state["residual.layer0.A"].shape == a.shape and state["residual.layer0.B"].shape == b.shape
    resumed = TopKCodec(fraction=0.1, error_feedback=True)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.roundtrip(a, key="layer0.A")[0], codec.roundtrip(a, key="layer0.A")[0])
    with pytest.raises(ValueError, match="key="):
        codec.encode(a)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(b, key="layer0.A")
    with pytest.raises(ValueError, match="residual."):
        resumed.load_state_dict({"oops": a})


def test_stateless_codecs_refuse_state() -> None:
    codec = build_codec("quantize")
    assert codec.state_dict() == {}
    with pytest.raises(ValueError, match="stateless"):
        codec.load_state_dict({"residual.x": torch.zeros(1)})


# ---------------------------------------------------------------- errors and determinism


@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("quantize", {"bits": 1}, r"bits.*\[2, 8\].*1"),
        ("quantize", {"bits": 9}, r"bits.*\[2, 8\].*9"),
        ("quantize", {"bits": 4.0}, r"bits.*\[2, 8\].*4\.0"),
        ("quantize", {"block_size": 0}, r"block_size.*>= 1.*0"),
        ("topk", {"fraction": 0}, r"fraction.*\(0, 1\].*0"),
        ("topk", {"fraction": 1.5}, r"fraction.*\(0, 1\].*1\.5"),
        ("topk", {"value_dtype": "int8"}, r"value_dtype.*fp16.*fp32.*int8"),
        ("nope", {}, r"'nope'.*bf16.*fp16.*fp32.*quantize.*topk"),
        ("fp16", {"bits": 8}, r"'fp16'.*bits.*none"),
        ("quantize", {"fraction": 0.1}, r"'quantize'.*fraction.*bits.*block_size"),
    ],
)
def test_bad_names_and_params_raise(name: str, params: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_codec(name, **params)


def test_registry_is_a_plain_dict_of_factories() -> None:
    assert sorted(CODECS) == ["bf16", "fp16", "fp32", "quantize", "topk"]
    assert all(isinstance(CODECS[name](), Codec) for name in CODECS)


@pytest.mark.parametrize(("name", "params"), ALL_CODECS)
def test_same_seed_same_encoding(name: str, params: dict) -> None:
    x = message()
    one = build_codec(name, **params).encode(x, gen(7), key="k")
    two = build_codec(name, **params).encode(x, gen(7), key="k")
    assert one.parts.keys() == two.parts.keys()
    assert all(torch.equal(one.parts[p], two.parts[p]) for p in one.parts)


def test_different_seeds_give_different_quantization() -> None:
    x = message()
    codec = QuantizeCodec(bits=2)
    assert not torch.equal(codec.encode(x, gen(1)).parts["codes"], codec.encode(x, gen(2)).parts["codes"])


@pytest.mark.parametrize("block_size", [None, 16])
def test_quantize_encodes_all_nodes_at_once_as_it_would_each_alone(block_size):
    # One generator per node row: the batched encoding draws what each node would draw alone, so the
    # simulator (all rows), torchrun (a slice) and the node-by-node code agree bit for bit.
    from declora.seeding import torch_generator

    codec = QuantizeCodec(bits=4, block_size=block_size)
    x = torch.randn(5, 7, 9, generator=torch.Generator().manual_seed(1))
    gens = [torch_generator(0, "codec", 3, "w", i) for i in range(5)]
    batched, nbytes = codec.roundtrip(x, gens)
    alone = [codec.roundtrip(x[i : i + 1], torch_generator(0, "codec", 3, "w", i)) for i in range(5)]
    assert torch.equal(batched, torch.cat([d for d, _ in alone])) and nbytes == alone[0][1]
    assert not torch.equal(batched[0], codec.roundtrip(x[:1], torch_generator(0, "codec", 3, "w", 1))[0])


def test_error_feedback_of_a_masked_upload_keeps_each_slice_s_residual():
    """A masked upload whose slices change every round (FSLoRA's sketch of rank components): what a
    component did not send comes back when that component is sent again, not with whichever component
    sits at its position in the next round's draw. So, entry by entry, the sum of the signal minus the
    sum of what the server decoded is exactly what the codec holds back."""
    from declora.comm.exchange import LocalExchange

    codec = TopKCodec(fraction=0.5, error_feedback=True)
    exchange = LocalExchange(2, codec)
    one = torch.tensor([[[10.0, 10.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]).expand(2, -1, -1)
    keep = torch.tensor([[True, True, False, False]] * 2)
    first = exchange.upload_masked({"A": (one, 1)}, keep, torch.ones(2, dtype=torch.bool), 0, True)
    assert first["A"][0].tolist() == [[10.0, 10.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    # round 1 draws components 2 and 3, which changed by nothing: component 1's [1, 1] stays held
    nothing = exchange.upload_masked(
        {"A": (torch.zeros(2, 4, 2), 1)}, ~keep, torch.ones(2, dtype=torch.bool), 1, True
    )
    assert not nothing["A"].any()
    assert codec.state_dict()["residual.A@0"][0].tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]

    g = torch.Generator().manual_seed(0)
    signal, decoded = one.clone(), first["A"].clone()
    for t in range(2, 12):
        drawn = torch.rand(2, 4, generator=g).argsort(1)[:, :2]  # two of the four components per node
        keep = torch.zeros(2, 4, dtype=torch.bool).scatter(1, drawn, True)
        x = torch.randn(2, 4, 2, generator=g) * keep[..., None]  # only the drawn components changed
        out = exchange.upload_masked({"A": (x, 1)}, keep, torch.ones(2, dtype=torch.bool), t, True)
        assert not out["A"][~keep].any()  # nothing arrives for a component not drawn
        signal, decoded = signal + x, decoded + out["A"]
    held = torch.cat([codec.state_dict()[f"residual.A@{i}"] for i in range(2)])
    torch.testing.assert_close(signal - decoded, held, atol=1e-5, rtol=0)  # float32 sums near 10


@pytest.mark.parametrize("exchange_kind", ["local", "dist"])
@pytest.mark.parametrize("rule", ["server_mean", "server_reduce"])
def test_error_feedback_of_a_server_upload_keeps_the_residual_of_nodes_that_do_not_upload(
    exchange_kind: str, rule: str
) -> None:
    """Under client sampling a node that does not upload sends nothing: its residual waits for its next
    upload. So the sum of what the nodes meant to send in the rounds they uploaded, minus the sum of what
    the server decoded from them, is what the codec holds back (node by node where the server sees each
    upload, in total where it sees only the mean)."""
    from declora.comm.dist_exchange import DistExchange
    from declora.comm.exchange import LocalExchange
    from declora.dist import Solo

    codec = TopKCodec(fraction=0.25, error_feedback=True)
    if exchange_kind == "local":
        exchange = LocalExchange(3, codec)
    else:  # one process of a torchrun launch: its own code path, the same numbers
        group = Solo()
        group.set_nodes(3)
        exchange = DistExchange(group, 3, codec)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    meant, decoded = torch.zeros(3, 8), torch.zeros(3, 8)
    for t in range(12):
        x = torch.randn(3, 8, generator=g)
        senders = torch.rand(3, generator=g) < 0.5
        senders[t % 3] = True
        if rule == "server_mean":  # equal weights: the mean times the count is the senders' decoded sum
            decoded[0] += exchange.server_mean({"A": x}, senders.float(), t)["A"] * senders.sum()
            meant[0] += x[senders].sum(0)
        else:
            table = exchange.server_reduce({"A": x}, senders.float(), t, lambda up, w: up)["A"]
            decoded[senders] += table[senders]
            meant[senders] += x[senders]
    held = codec.state_dict()["residual.A"]
    assert held.abs().sum() > 1  # top-k of a quarter held much back
    if rule == "server_mean":
        torch.testing.assert_close(meant[0] - decoded[0], held.sum(0), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(meant - decoded, held, atol=1e-5, rtol=0)
