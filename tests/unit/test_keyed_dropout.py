"""LoRA dropout keyed by example: a row's mask is a hash of (row key, layer, position, feature), so it does
not depend on the micro-batch, the process, the device or a resume."""

from __future__ import annotations

import pytest
import torch
from unit_helpers import tiny_experiment

from declora.engine import MEASURED, run
from declora.keyed_dropout import KeyedDropout, keep_mask
from declora.lora import NodeRouting

pytestmark = pytest.mark.unit
M32 = 0xFFFFFFFF


def _mix32(v: int) -> int:  # the same hash on Python integers, written out independently
    for _ in range(2):
        v = ((v ^ (v >> 16)) * 0x45D9F3B) & M32
    return v ^ (v >> 16)


def _reference(key: int, salt: int, count: int, p: float) -> list[bool]:
    row = _mix32(_mix32((key & M32) ^ (key >> 32)) ^ salt)
    return [(_mix32((row + i * 0x9E3779B1) & M32) >> 8) >= round(p * 2**24) for i in range(count)]


def test_the_mask_is_the_hash_written_out_on_python_integers():
    keys = torch.tensor([0, 1, 12345, 2**62 + 987654321])
    mask = keep_mask(keys, salt=77, shape=(3, 5), p=0.3)
    for k, key in enumerate(keys.tolist()):
        assert mask[k].flatten().tolist() == _reference(key, 77, 15, 0.3)
    # pinned: a change of the hash changes every run's masks (and so its numbers); it must be deliberate
    assert mask[2].flatten().int().tolist() == [int(b) for b in "011001111010111"]


def test_the_kept_share_is_one_minus_p_and_layers_drop_different_elements():
    keys = torch.arange(200)
    a, b = keep_mask(keys, 1, (50, 100), 0.1), keep_mask(keys, 2, (50, 100), 0.1)  # a million elements
    assert a.float().mean().item() == pytest.approx(0.9, abs=0.002)
    # independent masks agree where both keep or both drop: 0.9² + 0.1² = 0.82
    assert (a == b).float().mean().item() == pytest.approx(0.82, abs=0.002)
    # neighbouring keys (consecutive examples of one batch) are as independent as two layers
    assert (a[:-1] == a[1:]).float().mean().item() == pytest.approx(0.82, abs=0.002)


def test_a_rows_mask_does_not_depend_on_its_batch_or_its_padding():
    alone = keep_mask(torch.tensor([5]), 9, (4, 8), 0.5)[0]
    among = keep_mask(torch.tensor([3, 5, 11]), 9, (7, 8), 0.5)[1]  # padded to 7 tokens, second row
    assert torch.equal(among[:4], alone)


def test_dropout_scales_what_it_keeps_and_is_off_in_evaluation():
    routing = NodeRouting()
    drop = KeyedDropout(0.25, "layer.query", routing)
    x = torch.ones(3, 4, 6)
    with pytest.raises(RuntimeError, match="one key per row of the 3-row batch"):
        drop(x)
    routing.keys = torch.tensor([4, 5, 6])
    y = drop(x)
    assert set(y.unique().tolist()) <= {0.0, torch.tensor(4 / 3).item()} and (y == 0).any()
    assert torch.equal(drop.eval()(x), x)


def test_micro_batch_size_does_not_change_a_run_with_dropout(tiny_bert, tiny_data, tmp_path):
    """The run's numbers with LoRA dropout, chunked 48 or 4096 tokens at a time (one row or the whole batch
    per forward), agree to float rounding; without dropout they would differ: dropout bites."""

    def trained(name: str, *extra: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
        exp = tiny_experiment(tiny_bert, tiny_data, tmp_path / name, "rounds=2", "eval.every=1", *extra)
        records = [{k: v for k, v in r.items() if k not in MEASURED} for r in run(exp)]
        return records, {k: v.detach().clone() for k, v in exp.fed.tensors().items()}

    small, small_tensors = trained("small", "model.dropout=0.3", "train.tokens_per_chunk=16")
    large, large_tensors = trained("large", "model.dropout=0.3", "train.tokens_per_chunk=4096")
    _, plain_tensors = trained("plain", "train.tokens_per_chunk=4096")
    assert len(small) == len(large) == 2
    for ours, ref in zip(small, large, strict=True):
        for key, value in ref.items():
            if isinstance(value, float):
                assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert gap(small_tensors, large_tensors) < 1e-6 < 1e-4 < gap(small_tensors, plain_tensors)


def test_the_mask_built_in_small_blocks_is_the_mask_built_at_once(monkeypatch):
    from declora import keyed_dropout

    keys = torch.arange(7) * 1000 + 3
    whole = keep_mask(keys, 11, (9, 13), 0.2)
    for block in (5, 117, 250):  # within a row, a row and a half, several rows
        monkeypatch.setattr(keyed_dropout, "_BLOCK", block)
        assert torch.equal(keep_mask(keys, 11, (9, 13), 0.2), whole), block
