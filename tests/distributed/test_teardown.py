"""After ``Distributed.close()`` no thread of the process group is left: a group still alive at the
interpreter's exit runs its gloo threads into the teardown, where they can abort a finished rank
(SIGABRT, which torchrun reports as a failed run)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from dist_helpers import launch, tiny_overrides

DP_SGD = ["privacy.level=example", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"]
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names from /proc"),
]
# Tiny runs on each rank (building a model imports what once kept the group alive; privacy and a
# quantized base import more), then close() and the names of the threads still running.
SCRIPT = """
import json, os, sys
from declora.config import DistConfig, load_config
from declora.dist import Distributed
from declora.engine import run
from declora.experiment import build_experiment

group = Distributed(DistConfig(timeout_s=60))
with group.guard():
    for overrides in json.loads(sys.argv[1]):
        run(build_experiment(load_config(None, overrides), None, group))
group.close()
names = []
for task in os.listdir("/proc/self/task"):
    try:
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    except OSError:  # a thread that ended while listed
        pass
print(f"rank {group.rank} threads after close: {sorted(names)}", flush=True)
"""


def test_close_leaves_no_thread_of_the_process_group(tiny_bert, tmp_path):
    script = tmp_path / "close_then_list.py"
    script.write_text(SCRIPT)
    runs = [
        tiny_overrides(tiny_bert, tmp_path / "gossip", "dec_lora"),
        tiny_overrides(tiny_bert, tmp_path / "dp_sgd", "fedavg", *DP_SGD),
        tiny_overrides(tiny_bert, tmp_path / "int8", "centralized", "model.base_quantization=int8"),
    ]
    result = launch([str(script), json.dumps(runs)], 2)
    assert result.returncode == 0, result.digest
    left = dict(re.findall(r"rank (\d) threads after close: (\[.*\])", result.output))
    assert sorted(left) == ["0", "1"], result.digest
    for rank, names in left.items():
        assert "gloo" not in names, f"rank {rank}: {names}"  # gloo_tcp_loop, pt_gloo_runloop
