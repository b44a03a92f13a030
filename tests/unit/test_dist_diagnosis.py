"""How a rank of a multi-process run names what stopped it, from what the ranks posted in the run's
store (a real torch.distributed HashStore): a rank's own error, a dead or hung rank, or a stop from
outside (torchrun passing on a scheduler's SIGTERM), which is not a failure."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from declora.dist import JOB_STOPPED, Distributed, Stopped

pytestmark = pytest.mark.unit


def _rank0_of_two() -> Distributed:
    """Rank 0's diagnosis, on a store without a process group (only the store is read)."""
    rank = object.__new__(Distributed)
    rank.store = dist.PrefixStore("declora/", dist.HashStore())
    rank.rank, rank.world, rank.timeout, rank.at = 0, 2, timedelta(seconds=1), (2, "communicate")
    rank.store.set("at/1", "2 3")
    rank.store.set("beat/1", "1")
    return rank


def test_a_stop_of_every_rank_is_not_a_failure():
    rank = _rank0_of_two()
    rank.store.set("failed/1", "stop")
    assert rank._culprit(own=False, stopped=True) == JOB_STOPPED
    assert rank._culprit(own=False, stopped=False) == JOB_STOPPED  # a collective broke: the peer stopped


def test_a_stopped_rank_whose_peer_is_alive_in_a_collective_is_a_stop():
    rank = _rank0_of_two()  # rank 1 beats but has not said anything: its SIGTERM waits in a collective
    beating = threading.Event()

    def beat():
        for k in range(2, 40):
            if beating.wait(0.1):
                return
            rank.store.set("beat/1", str(k))

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        assert rank._culprit(own=False, stopped=True) == JOB_STOPPED
    finally:
        beating.set()
        thread.join()


def test_a_failed_or_dead_peer_is_named_even_when_this_rank_was_stopped():
    rank = _rank0_of_two()
    rank.store.set("failed/1", "own")
    assert rank._culprit(own=False, stopped=True) == "rank 1 failed in round 3 (communicate)"
    silent = _rank0_of_two()  # no report and no heartbeat: it died (torchrun then stops the others)
    assert silent._culprit(own=False, stopped=True) == "rank 1 died in round 3 (communicate)"
    assert silent._culprit(own=True) == "rank 0 failed in round 3 (communicate)"


def test_a_hung_rank_stopped_after_its_peer_named_the_hang_reports_the_hang():
    """Rank 0 hangs; rank 1 times out, posts the hang and leaves; torchrun then stops rank 0 with SIGTERM.
    Rank 1 reported only a broken collective, so the stop alone looks polite: the posted hang decides."""
    rank = _rank0_of_two()
    rank.store.set("failed/1", "peer")
    posted = "rank 0 hung in round 3 (train); rank 1 stopped in round 3 (round): DistError: timed out"
    rank.store.set("fail", posted)
    assert rank._culprit(own=False, stopped=True) == JOB_STOPPED  # what the stop alone says
    assert rank._diagnose(Stopped("stopped by the launcher")) == posted
    assert rank.store.get("failed/0") == b"stop"


def test_a_polite_stop_posts_nothing():
    rank = _rank0_of_two()
    rank.store.set("failed/1", "stop")
    assert rank._diagnose(Stopped("stopped by the launcher")) == JOB_STOPPED
    assert not rank.store.check(["fail"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_ranks_shares_of_the_evaluation_cover_every_example_once(world):
    """Each rank scores its share of the held-out examples and the counts are summed: the shares must be
    disjoint, contiguous and cover them all (every metric is a ratio, so scoring some twice or not at all
    would not show in it), as even as possible."""
    for m in range(31):
        shares = []
        for rank in range(world):
            group = object.__new__(Distributed)
            group.rank, group.world = rank, world
            shares.append(group.share_of(m))
        assert [i for share in shares for i in range(m)[share]] == list(range(m)), (world, m)
        sizes = [len(range(m)[share]) for share in shares]
        assert max(sizes) - min(sizes) <= 1, (world, m, sizes)
