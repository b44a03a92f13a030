"""A rank that dies or hangs stops the whole run within dist.timeout_s, naming the rank and the round;
the last complete checkpoint then resumes to the uninterrupted run's numbers."""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime

import pytest
from dist_helpers import (
    CONFIG,
    assert_resumed,
    assert_same_adapters,
    assert_same_metrics,
    finish,
    finished_lines,
    launch,
    tiny_overrides,
    torchrun,
)

from declora.config import load_config
from declora.engine import run
from declora.experiment import build_experiment
from declora.runfolder import CRASH_ENV

pytestmark = pytest.mark.distributed
TIMEOUT = 10  # dist.timeout_s in these tests


def fault_time(run_dir, rank: int) -> float:
    """When the injected fault fired, from the rank's log line."""
    line = next(x for x in (run_dir / f"rank_{rank}.log").read_text().splitlines() if "injected fault" in x)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_rank_stops_every_rank_then_resume_equals_an_uninterrupted_run(tiny_bert, tmp_path):
    overrides = tiny_overrides(
        tiny_bert, tmp_path / "run", "dec_lora", "rounds=4", f"dist.timeout_s={TIMEOUT}"
    )
    killed = launch(["-m", "declora", "run", str(CONFIG), *overrides], 2, env={"DECLORA_FAULT": "kill:1:3"})
    stopped = time.time()
    assert killed.returncode != 0
    assert re.search(r"rank 1 died in round 3", killed.output), killed.digest
    assert "declora: error (rank 0)" in killed.output
    assert stopped - fault_time(tmp_path / "run", 1) < TIMEOUT
    assert json.loads((tmp_path / "run" / "state" / "latest.json").read_text())["round"] == 2

    before = folder_bytes(tmp_path / "run")
    refused = launch(["-m", "declora", "run", "--resume", str(tmp_path / "run")], 3)  # another split
    assert refused.returncode != 0
    assert "was saved by 2 processes (node slices [3, 2]); this launch has 3" in refused.output
    codes = re.findall(r"exitcode\s*: (-?\d+)", refused.output)  # torchrun's summary of failed ranks
    assert codes and set(codes) == {"2"}, refused.digest  # bad input on every rank, no abort
    assert "terminate called" not in refused.output
    assert folder_bytes(tmp_path / "run") == before  # no rank_2.log, nothing appended to the others

    written = finished_lines(tmp_path / "run")
    resumed = launch(["-m", "declora", "run", "--resume", str(tmp_path / "run")], 2)
    assert resumed.returncode == 0, resumed.digest
    assert_resumed(tmp_path / "run", [2], written)
    for rank in (0, 1):
        assert (
            f"resuming {tmp_path / 'run'} after round 2"
            in (tmp_path / "run" / f"rank_{rank}.log").read_text()
        )
    overrides = tiny_overrides(tiny_bert, tmp_path / "sim", "dec_lora", "rounds=4")
    uninterrupted = build_experiment(load_config(CONFIG, overrides))
    run(uninterrupted)
    assert_same_metrics(tmp_path / "sim", tmp_path / "run")
    assert_same_adapters(tmp_path / "sim", tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").glob("rank_*.log")) == ["rank_0.log", "rank_1.log"]


def test_an_aborted_rank_is_named_and_leaves_its_python_stack(tiny_bert, tmp_path):
    """A rank killed by SIGABRT (as a library's failing thread kills one) is named by its peers, and its
    own last words are every thread's Python stack, not just torchrun's "Signal 6"."""
    overrides = tiny_overrides(tiny_bert, tmp_path / "run", "dec_lora", f"dist.timeout_s={TIMEOUT}")
    aborted = launch(["-m", "declora", "run", str(CONFIG), *overrides], 2, env={"DECLORA_FAULT": "abort:1:2"})
    assert aborted.returncode != 0
    assert re.search(r"rank 1 died in round 2", aborted.output), aborted.digest
    assert "Fatal Python error: Aborted" in aborted.output, aborted.digest
    dump = aborted.output.split("Fatal Python error: Aborted")[1]
    assert re.search(r'File ".*dist\.py", line \d+ in _inject_fault', dump), aborted.digest
    assert aborted.digest.startswith("Fatal Python error: Aborted")  # what a failing test shows first


@pytest.mark.parametrize("rank", [1, 0])  # rank 0 also hosts the store, and torchrun stops it last
def test_hung_rank_stops_every_rank_after_the_timeout(tiny_bert, tmp_path, rank):
    overrides = tiny_overrides(tiny_bert, tmp_path / "run", "decaf", f"dist.timeout_s={TIMEOUT}")
    hung = launch(
        ["-m", "declora", "run", str(CONFIG), *overrides], 2, env={"DECLORA_FAULT": f"hang:{rank}:2"}
    )
    stopped = time.time()
    assert hung.returncode != 0
    assert re.search(rf"rank {rank} hung in round 2", hung.output), hung.digest
    assert "none of which had failed" not in hung.output  # not told as a polite stop by any rank
    assert TIMEOUT - 1 < stopped - fault_time(tmp_path / "run", rank) < 2 * TIMEOUT
    assert json.loads((tmp_path / "run" / "state" / "latest.json").read_text())["round"] == 1


def test_a_config_error_found_when_the_run_is_built_is_the_one_line_error_on_every_rank(tiny_bert, tmp_path):
    # asynchronous gossip is refused under torchrun only when the run is built (it needs the process count)
    overrides = tiny_overrides(
        tiny_bert, tmp_path / "run", "dec_lora", "stragglers.asynchronous=true", f"dist.timeout_s={TIMEOUT}"
    )
    refused = launch(["-m", "declora", "run", str(CONFIG), *overrides], 2)
    assert refused.returncode != 0
    # Each rank says it in the CLI's one line: as one process would, or, when a peer's refusal reached it
    # through the store first (rank 0 logs more before its check), as "rank 1 refused the run ...: <it>".
    said = "stragglers.asynchronous=true runs in one process only"
    lines = [x for x in refused.output.splitlines() if x.startswith("declora: error") and said in x]
    assert len(lines) == 2, refused.digest
    assert f"declora: error: {said}" in refused.output, refused.digest  # the rank that found it first
    assert "failed in round" not in refused.output  # not a crash in some round
    assert "src/declora" not in refused.output  # no traceback of ours (torchrun prints its own summary)


def test_a_config_error_found_at_launch_is_one_line_and_exit_2_on_every_rank(tiny_bert, tmp_path):
    """Refused before the run is built (here, an unknown algorithm): every rank leaves with 2, and the
    line is said once per host (launch), not once per rank; the process group's threads once aborted a
    rank at exit ("terminate called"), one launch in three."""
    overrides = tiny_overrides(tiny_bert, tmp_path / "run", "nope", f"dist.timeout_s={TIMEOUT}")
    for _ in range(3):
        refused = launch(["-m", "declora", "run", str(CONFIG), *overrides], 2)
        assert refused.output.count("declora: error: algorithm.name='nope' is not known") == 1, refused.output
        assert re.findall(r"exitcode\s+: (-?\d+)", refused.output) == ["2", "2"], refused.output[-3000:]
        assert "terminate called" not in refused.output and not (tmp_path / "run").exists()


def test_a_torchrun_stopped_by_sigterm_exits_143_on_every_rank_and_resumes_to_the_uninterrupted_numbers(
    tiny_bert, tmp_path
):
    """A batch scheduler's time limit: SIGTERM to the launcher, which passes it on to every rank. No rank
    failed, so the run says `terminated` once with the command that resumes it, and that command
    finishes the run to the numbers of one that was never stopped."""
    rounds = "rounds=30"  # more than the time to the signal: the run must still be going when it comes
    overrides = tiny_overrides(tiny_bert, tmp_path / "run", "dec_lora", rounds, f"dist.timeout_s={TIMEOUT}")
    began = time.monotonic()
    proc = torchrun(["-m", "declora", "run", str(CONFIG), *overrides], 2)
    latest = tmp_path / "run" / "state" / "latest.json"
    while not (latest.is_file() and json.loads(latest.read_text())["round"] >= 2):
        assert proc.poll() is None and time.monotonic() - began < 120, "no checkpoint of round 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stopped = finish(proc, began)
    saved = json.loads(latest.read_text())["round"]
    assert 2 <= saved < 30, stopped.digest
    assert stopped.output.count("declora: terminated; ") == 1, stopped.digest  # rank 0 says it
    assert "--resume" in stopped.output and str(tmp_path / "run") in stopped.output
    assert "failed in round" not in stopped.output and "died" not in stopped.output
    assert "declora: error" not in stopped.output  # no rank took the signal for a fault of another
    assert "Traceback" not in stopped.output.split("declora: terminated")[0], stopped.digest

    written = finished_lines(tmp_path / "run")
    resumed = launch(["-m", "declora", "run", "--resume", str(tmp_path / "run")], 2)
    assert resumed.returncode == 0, resumed.digest
    assert_resumed(tmp_path / "run", [saved], written)
    uninterrupted = build_experiment(
        load_config(CONFIG, tiny_overrides(tiny_bert, tmp_path / "sim", "dec_lora", rounds))
    )
    run(uninterrupted)
    assert_same_metrics(tmp_path / "sim", tmp_path / "run")
    assert_same_adapters(tmp_path / "sim", tmp_path / "run")


def test_a_run_that_diverges_stops_every_rank_with_the_one_process_line(tiny_bert, tmp_path, capsys):
    """A NaN is found by all ranks together (the health check reduces what each found): no rank is at
    fault, so the launch says the one line one process says, every rank exits 1, and the run folder
    records why it stopped. The attacker's message, scaled past float32's range, reaches node 0's rank
    here, so one process and the launch name the same node. Rank 0 is made to reach the stop 3 s after
    rank 1 (it writes the record first; a busy machine does the same): it still says the one line itself,
    not the line its watchdog would pass on from the peer's post, prefixed with its rank."""
    from declora.cli import main

    attack = ["attack.kind=scaled", "attack.nodes=[3]", "attack.scale=1e39"]
    alone = tmp_path / "alone"
    capsys.readouterr()
    assert main(["run", str(CONFIG), *tiny_overrides(tiny_bert, alone, "dec_lora", *attack)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("declora: error: round 1: node 0: tensor ") and "NaN or Inf" in line, line
    overrides = tiny_overrides(tiny_bert, tmp_path / "run", "dec_lora", *attack, "dist.node_slices=[3,2]")
    lag = {CRASH_ENV: "round.diverged", "DECLORA_CRASH_MODE": "lag"}
    began = time.monotonic()
    stopped = finish(torchrun(["-m", "declora", "run", str(CONFIG), *overrides], 2, env=lag), began)
    assert re.findall(r"exitcode\s+: (-?\d+)", stopped.output) == ["1", "1"], stopped.digest  # the summary
    errors = [x for x in stopped.output.splitlines() if x.startswith("declora: error")]
    assert errors == [line], stopped.digest  # once per host, and no rank named as failed, died or hung
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"event": "diverged", "round": 1, "reason": line.removeprefix("declora: error: ")}
    assert not (tmp_path / "run" / "state").exists()  # nothing non-finite was saved
