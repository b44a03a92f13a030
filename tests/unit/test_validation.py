"""Validation tables: every number has a range, resume overrides are sorted into safe and refused."""

from __future__ import annotations

import dataclasses
import errno
import re
import typing

import pytest

from declora.allowed import POSITIVE, RANGES, Range
from declora.config import Config, ConfigError, load_config
from declora.resume_rules import RESUME_SAFE, check_resume
from declora.runfolder import atomic_write_text, check_new_run

pytestmark = pytest.mark.unit
# Numbers checked with other keys (declora.validation CROSS_CHECKS, the _validate_* helpers, guard.py).
CHECKED_WITH_OTHER_KEYS = {
    "partition.proportions",
    "algorithm.switch_interval",
    "algorithm.ranks",
    "algorithm.sketch_ratios",
    "dist.node_slices",
    "train.warmup_rounds",  # in [0, rounds]
    "stragglers.speeds",  # validate_stragglers: one positive multiplier per node, or lognormal
    "server.betas",  # _validate_server
    *("privacy.clip", "privacy.noise_multiplier", "privacy.target_epsilon", "privacy.delta"),  # guard.py
    *("attack.nodes", "attack.scale"),  # guard.py; any finite scale is an attack
}


def _numeric_keys(cls: type = Config, prefix: str = "") -> typing.Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
        elif "int" in str(tp) or "float" in str(tp):
            yield prefix + f.name


def test_every_numeric_key_has_a_range():
    missing = set(_numeric_keys()) - set(RANGES) - set(POSITIVE) - CHECKED_WITH_OTHER_KEYS
    assert not missing, f"add these keys to allowed.RANGES (or POSITIVE): {sorted(missing)}"
    assert not (set(RANGES) - set(_numeric_keys())), "RANGES names a key that does not exist"


def test_ranges_hold_their_bounds_and_print_them():
    r = Range(0, 1, lo_open=True)
    assert [r.holds(x) for x in (0, 1e-12, 1, 1.0001)] == [False, True, True, False]
    assert str(r) == "(0, 1]" and str(Range(0)) == "[0, inf)"


def test_defaults_and_shipped_values_pass():
    load_config(None, [])


@pytest.mark.parametrize(
    "override",
    [
        "model.alpha=0",
        "train.lr=.nan",
        "train.betas=[0.9,1]",
        "threads=100000",  # torch would allocate that many threads' state and crash
        "dist.timeout_s=0.001",  # shorter than the rendezvous itself
        "dist.timeout_s=1e30",  # beyond what a timedelta holds
        "model.init_seed=18446744073709551616",  # torch.manual_seed takes a signed 64-bit integer
        "model.init_adapter=''",  # an empty name would mean no adapter, or the current folder
        "run_dir=''",
        "model.target_modules=['']",
    ],
)
def test_legal_but_mistaken_or_non_finite_values_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_alpha_zero_needs_the_documented_flag():
    assert load_config(None, ["model.alpha=0", "allow_degenerate=true"]).model.alpha == 0


@pytest.mark.parametrize("name", ["adf_lora", "tad_lora", "rolora", "rolora_dfl"])
def test_training_a_first_while_b_is_zero_and_the_head_frozen_is_refused(name):
    # B = 0 at init: A's gradient is zero, so the whole first phase would train nothing
    bad = [f"algorithm.name={name}", "algorithm.first_phase=A", "model.head=frozen"]
    with pytest.raises(ConfigError, match=r"algorithm\.first_phase=A .* nothing trains in the first phase"):
        load_config(None, bad)
    assert load_config(None, [*bad, "allow_degenerate=true"]).algorithm.first_phase == "A"
    assert load_config(None, bad[:2]).model.head == "train"  # a trained head learns in phase A


def test_resume_allows_the_safe_keys_and_names_the_rest():
    saved = load_config(None, ["rounds=4"])
    safe = load_config(None, ["rounds=8", "eval.every=2", "checkpoint_every=2", "threads=1", "export=none"])
    changed = check_resume(saved, safe, rounds_done=4)
    assert changed == {
        "rounds": (4, 8),
        "eval.every": (saved.eval.every, 2),
        "checkpoint_every": (saved.checkpoint_every, 2),
        "threads": (saved.threads, 1),
        "export": (saved.export, "none"),
    }
    assert set(changed) <= set(RESUME_SAFE)
    with pytest.raises(ConfigError, match=r"model\.rank cannot change on resume \(8 -> 4\)"):
        check_resume(saved, load_config(None, ["rounds=4", "model.rank=4"]))
    with pytest.raises(ConfigError, match="rounds=2 is below the 3 rounds already done"):
        check_resume(saved, load_config(None, ["rounds=2"]), rounds_done=3)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")

    def full(p):
        p.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from declora.runfolder import atomic_write

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, full)
    assert path.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["config.yaml"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_new_run_folder_rules(tmp_path):
    check_new_run(tmp_path / "fresh", overwrite=False)  # absent: fine
    (tmp_path / "run").mkdir()
    check_new_run(tmp_path / "run", overwrite=False)  # empty: fine
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_new_run(tmp_path / "run", overwrite=False)
    check_new_run(tmp_path / "run", overwrite=True)


def test_every_choice_list_matches_the_module_that_implements_it():
    # The config's allowed values are listed once for early, cheap checks; the modules that apply them
    # keep their own registries. A value added to one and not the other would be accepted and then fail
    # mid-run, or be refused though implemented.
    from declora import (
        attack,
        device,
        grouped,
        lr_schedule,
        partition,
        pooling,
        quantize_bnb,
        robust,
        server_opt,
    )
    from declora.algorithms import decaf
    from declora.allowed import CHOICES

    implemented = {
        "train.lora_product": grouped.PRODUCTS,
        "model.pooling": pooling.POOLINGS,
        "model.quant_backend": quantize_bnb.BACKENDS,
        "train.schedule": lr_schedule.SHAPES,
        "algorithm.svd_split": decaf.SPLITS,
        "server.optimizer": ("auto", *server_opt.RULES),  # auto: each algorithm's own default
        "robust.aggregator": robust.SERVER_AGGREGATORS,
        "partition.kind": (*partition.PARTITIONERS, "column"),  # column: partition.by_column
        "attack.kind": ("none", *attack.MESSAGE_ATTACKS, *attack.DATA_ATTACKS),
        "precision": tuple(device.PRECISIONS),
    }
    for key, values in implemented.items():
        assert set(CHOICES[key]) == set(values), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.prompt_column=question"],
            "data.prompt_column='question' has no effect with task.kind=sequence_cl",
        ),
        (
            ["task.kind=causal_lm", "model.head=none", "data.label_column=stars"],
            "data.label_column='stars' has no effect with task.kind=causal_lm",
        ),
        (
            ["data.dataset=rows.csv", "data.test_file=held_out.csv", "data.test_fraction=0.5"],
            "data.test_fraction=0.5 has no effect with data.test_file",
        ),
    ],
)
def test_data_keys_the_task_or_the_files_never_read_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_node_slice_messages_point_at_the_fix():
    from declora.dist import make_layout
    from declora.resume_rules import check_resume

    with pytest.raises(
        ConfigError, match=r"\[1, 1\] does not apply to algorithm.name=centralized, a single-node"
    ):
        load_config(None, ["algorithm.name=centralized", "nodes=4", "dist.node_slices=[1,1]"])
    with pytest.raises(ConfigError, match=r"\[2, 1, 1\] gives 3 counts for 2 processes; it must give each"):
        make_layout(4, 2, (2, 1, 1))
    with pytest.raises(ConfigError, match=r"this launch has 1 process: .* needs it removed"):
        make_layout(4, 1, (2, 2))
    saved = load_config(None, ["nodes=4"])
    with pytest.raises(
        ConfigError, match=r"\(None -> \[3, 1\]\): .* made with the even split \(node_slices null\)"
    ):
        check_resume(saved, load_config(None, ["nodes=4", "dist.node_slices=[3,1]"]))


@pytest.mark.parametrize("algorithm", ["fedex_lora", "flora"])
def test_a_fold_into_the_base_needs_an_fp32_base(algorithm):
    """These methods add each round's aggregate into the frozen base: into bf16 weights most of FedEx-LoRA's
    small residual would round away (measured: about 90 % in one round), so bf16 is refused, as a quantized
    base is; fp32 is accepted."""
    ours = [f"algorithm.name={algorithm}", "export=none"]
    with pytest.raises(ConfigError, match=r"needs .*precision=fp32 .*; got precision='bf16'$"):
        load_config(None, [*ours, "precision=bf16"])
    assert load_config(None, ours).precision == "fp32"
