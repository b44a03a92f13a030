"""Two "hosts": two torchrun launches on this machine (loopback) join one run, each host with its own
working directory (no shared file system): rank 0's host gets the run folder, the other its shards."""

from __future__ import annotations

import time

import pytest
from dist_helpers import (
    CONFIG,
    assert_same_adapters,
    assert_same_metrics,
    finish,
    free_port,
    tiny_overrides,
    torchrun,
)

from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment

pytestmark = pytest.mark.distributed


def test_two_launches_join_one_run_with_the_simulators_numbers(tiny_bert, tmp_path):
    hosts = [tmp_path / "host_a", tmp_path / "host_b"]
    args = ["-m", "declora", "run", str(CONFIG), *tiny_overrides(tiny_bert, "runs/two-hosts", "dec_lora")]
    for _attempt in range(3):  # the free port may be taken by another process before the launch binds it
        port, began = free_port(), time.monotonic()
        procs = []
        for node_rank, cwd in enumerate(hosts):
            cwd.mkdir(exist_ok=True)
            procs.append(torchrun(args, 1, port=port, hosts=(node_rank, 2), cwd=cwd))
        results = [finish(p, began) for p in procs]
        if not any("address already in use" in r.output.lower() for r in results):
            break
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    main, other = (host / "runs" / "two-hosts" for host in hosts)
    assert {"metrics.jsonl", "report.md", "adapters", "rank_0.log"} <= {p.name for p in main.iterdir()}
    assert sorted(p.name for p in other.iterdir()) == ["rank_1.log", "state"]
    assert all(".rank_1." in p.name for p in (other / "state").iterdir())

    simulated = tmp_path / "sim"
    run(build_experiment(load_config(CONFIG, tiny_overrides(tiny_bert, simulated, "dec_lora"))))
    assert_same_metrics(simulated, main)
    assert_same_adapters(simulated, main)
