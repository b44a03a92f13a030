"""The processes of one run: which nodes each rank hosts, the few collectives the engine needs, and
failures that name the rank and the round.

``torchrun ... -m declora run CONFIG`` starts P processes (ranks); rank k hosts the contiguous slice
``layout.nodes_of(k)`` of the nodes with its own frozen base. Everything global (partitions, W(t), data
seeds, A's init) is derived by every rank from (seed, round), so ranks only exchange adapter tensors.
``Solo`` is the same interface for one process without torch.distributed: the engine has one code path.

Faults: every rank stamps its progress (round, phase) in the launcher's key-value store and a watchdog
thread beats there. The first rank that catches an error (a peer's connection reset, a timeout of
``dist.timeout_s``, a monitored barrier that a rank missed) works out which rank stopped beating or is
stuck behind, and posts one message naming it and its round; every other rank's watchdog sees the post
and exits at once with the same message (non-zero).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from declora.config import ConfigError, DistConfig

log = logging.getLogger(__name__)
FAULT_ENV = "DECLORA_FAULT"  # tests: "kill|abort|hang:RANK:ROUND" (ROUND counted from 1)
PHASES = ("start", "round", "train", "communicate", "evaluate", "checkpoint", "finish")
REFUSED = "refused the run before it started"  # a peer's bad input: the others exit 2 too, as for input
JOB_STOPPED = "the launcher stopped every rank (SIGTERM), none of which had failed"


class AgreedStop(Exception):
    """An error every rank raises at the same point, from numbers they reduced together (a NaN the health
    check found): no rank is at fault, so each says it as one process would."""


class DistributedRunError(RuntimeError):
    """A multi-process run stopped because a rank died, hung or failed; the message names it."""


class Stopped(Exception):
    """The launcher asked this rank to stop (SIGTERM): another rank of the run has failed, or the whole
    job was stopped (a batch scheduler's time limit, a kill of torchrun): ``guard`` tells them apart."""


class JobStopped(BaseException):
    """Every rank was asked to stop and none had failed: the job was stopped from outside, as Ctrl-C or a
    kill stops one process (the command line says how to go on and exits 143)."""


class PeerError(RuntimeError):
    """A communication call failed (a peer's connection reset, a timeout, a missed barrier): the fault
    is probably another rank's."""


@contextmanager
def talking() -> Iterator[None]:
    """Mark errors of the torch.distributed calls inside as PeerError."""
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as err:
        raise PeerError(_short(err)) from err


@dataclass(frozen=True)
class Layout:
    """Contiguous node slices: rank k hosts nodes [starts[k], starts[k] + counts[k])."""

    counts: tuple[int, ...]

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.counts[:k]) for k in range(len(self.counts)))

    def nodes_of(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank] + self.counts[rank])

    def owners(self) -> Tensor:
        """(n,) long: the rank hosting each node."""
        return torch.repeat_interleave(torch.arange(len(self.counts)), torch.tensor(self.counts))


def make_layout(n: int, world: int, counts: tuple[int, ...] | None = None) -> Layout:
    """An even split (the first n mod P ranks host one node more), or the configured counts."""
    if counts is None:
        if n < world:
            raise ConfigError(f"nodes={n} cannot be split over {world} processes: every rank needs a node")
        counts = tuple(n // world + (k < n % world) for k in range(world))
    if len(counts) != world or sum(counts) != n or min(counts) < 1:
        launch = (
            "this launch has 1 process: dist.node_slices splits the nodes of a torchrun launch, and a "
            "one-process run of the same config needs it removed (dist.node_slices=null)"
        )
        entries = f"gives {len(counts)} counts for {world} processes; it " if len(counts) != world else ""
        raise ConfigError(
            f"dist.node_slices={list(counts)} {entries}must give each process at least one node and sum "
            f"to nodes={n}" + (f"; {launch}" if world == 1 else "")
        )
    return Layout(tuple(counts))


class Solo:
    """One process hosts every node: the collectives are identities."""

    rank, world, is_main = 0, 1, True
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.layout = Layout((0,))  # set by set_nodes once the node count is known

    def set_nodes(self, n: int, counts: tuple[int, ...] | None = None) -> None:
        self.layout = make_layout(n, self.world, counts)

    @property
    def nodes(self) -> Tensor:
        """(n_local,) global ids of the nodes this process hosts."""
        return torch.tensor(list(self.layout.nodes_of(self.rank)), dtype=torch.long)

    def gather_nodes(self, x: Tensor) -> Tensor:
        return x

    def all_sum(self, x: Tensor) -> Tensor:
        return x

    def all_max(self, x: Tensor) -> Tensor:
        return x

    def share_of(self, m: int) -> slice:
        return slice(0, m)

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return [obj]

    def enter(self, round: int, phase: str) -> None:
        return None

    def barrier(self) -> None:
        return None

    def stop_together(self) -> None:
        return None

    @contextmanager
    def guard(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        return None


class Distributed(Solo):
    """This rank of a torch.distributed run (gloo on CPU; nccl when every rank has its own GPU)."""

    def __init__(
        self, cfg: DistConfig, on_fatal: Callable[[str], None] | None = None, device: str = "auto"
    ) -> None:
        self.timeout = timedelta(seconds=cfg.timeout_s)
        # Imported now, before the group exists: this module's functions take ``group=group.WORLD`` as a
        # default argument, so a first import after init_process_group (transformers imports it while it
        # builds a model) would hold the group forever. destroy_process_group then could not free it, and
        # its gloo threads ran on into the interpreter's exit, where such threads can abort the process.
        import torch.distributed.nn.functional  # noqa: F401

        store, rank, world = next(dist.rendezvous("env://", timeout=self.timeout))
        self.rank, self.world, self.is_main = rank, world, rank == 0
        local_rank, local_world = (
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )
        self.backend = pick_backend(cfg.backend, local_world, device)
        self.device = torch.device("cpu")
        if self.backend == "nccl":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world, timeout=self.timeout)
        # Barriers and small objects always go over gloo (monitored_barrier is gloo-only).
        self.ctrl = None if self.backend == "gloo" else dist.new_group(backend="gloo", timeout=self.timeout)
        self.store = dist.PrefixStore("declora/", store)
        self.at = (0, "start")
        self.on_fatal = on_fatal or _exit_with
        self.layout = Layout((0,))
        self._failing = False  # this rank is diagnosing (and posting) a failure itself
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="declora-watchdog", daemon=True)
        self._watchdog.start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        # A rank killed by a fatal signal (an abort in a library's threads, a segfault) leaves every thread's
        # Python stack on its stderr, which torchrun shows: otherwise all it says is "Signal 6".
        if not faulthandler.is_enabled():
            faulthandler.enable()
        log.info("rank %d of %d (backend %s, device %s)", rank, world, self.backend, self.device)

    # ---------------------------------------------------------------- collectives

    def gather_nodes(self, x: Tensor) -> Tensor:
        """Every rank's rows (n_k, ...) laid end to end in node order: (n, ...) on every rank."""
        width = max(self.layout.counts)
        kind = x.dtype
        pad = torch.zeros(width, *x.shape[1:], dtype=torch.uint8 if kind == torch.bool else kind)
        pad[: x.shape[0]] = x
        pad = pad.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        with talking():
            dist.all_gather(parts, pad)
        rows = [p[:c] for p, c in zip(parts, self.layout.counts, strict=True)]
        return torch.cat(rows).to(x.device, kind)

    def all_sum(self, x: Tensor) -> Tensor:
        y = x.to(self.device, copy=True)
        with talking():
            dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def all_max(self, x: Tensor) -> Tensor:
        y = x.to(self.device, copy=True)
        with talking():
            dist.all_reduce(y, op=dist.ReduceOp.MAX)
        return y.to(x.device)

    def share_of(self, m: int) -> slice:
        """This rank's contiguous share of m items (evaluation examples), as even as possible."""
        return slice(self.rank * m // self.world, (self.rank + 1) * m // self.world)

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        with talking():
            dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        with talking():
            dist.all_gather_object(out, obj, group=self.ctrl)
        return out

    def barrier(self) -> None:
        with talking():
            dist.monitored_barrier(group=self.ctrl, timeout=self.timeout, wait_all_ranks=True)

    # ---------------------------------------------------------------- progress and faults

    def stop_together(self) -> None:
        """Every rank found the same error in numbers they reduced together (an AgreedStop): meet once
        more, so that rank 0 has written why the run stopped before any rank leaves, and from here on let
        SIGTERM wait. Otherwise the first rank to exit makes torchrun stop the others on the way to their
        own line, and they would report the stop as a peer's failure."""
        self._failing = True
        self.barrier()

    def enter(self, round: int, phase: str) -> None:
        """Stamp where this rank is; a new round starts with a monitored barrier (all ranks meet)."""
        self.at = (round, phase)
        self.store.set(f"at/{self.rank}", f"{round} {PHASES.index(phase)}")
        if phase == "round":
            self.barrier()
        if phase == "train":
            _inject_fault(self.rank, round)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn any error of this rank into one DistributedRunError that names the rank at fault."""
        try:
            yield
        except DistributedRunError:
            raise
        except Exception as err:
            self._failing = True  # from here on SIGTERM waits: the diagnosis takes a few seconds
            if isinstance(err, AgreedStop):  # the others stop at the same point with the same error
                self._post(_short(err))  # (a rank somehow still running learns it from the store)
                raise
            if self.at[1] == "start" and isinstance(err, (ConfigError, FileNotFoundError)):
                # A bad value or file, found before any training: every rank that sees it says so in the
                # CLI's one line (exit 2); the others learn it through the store and stop.
                self._post(f"rank {self.rank} {REFUSED}: {_short(err)}")
                raise
            message = self._diagnose(err)
            if message == JOB_STOPPED:
                raise JobStopped(message) from err
            raise DistributedRunError(message) from err

    def _post(self, message: str) -> None:
        with suppress(Exception):  # no store: the other ranks time out instead
            self.store.compare_set("fail", "", message)

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join(timeout=2)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        dist.destroy_process_group()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._failing:  # while diagnosing, finish the diagnosis first
            raise Stopped("stopped by the launcher (SIGTERM): another rank of this run failed")

    def _watch(self) -> None:
        store = self.store.clone() if hasattr(self.store, "clone") else self.store
        while not self._stop.wait(0.5):
            try:
                store.add(f"beat/{self.rank}", 1)
                if store.check(["fail"]):
                    message = store.get("fail").decode()
                    if not (self._stop.is_set() or self._failing):
                        self.on_fatal(message)
            except Exception:  # noqa: BLE001 - the store's host is gone: the main thread will see it too
                continue

    def _read(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _diagnose(self, err: BaseException) -> str:
        """Find the rank at fault, post one message for every rank, and return it."""
        round, phase = self.at
        here = f"rank {self.rank} stopped in round {round + 1} ({phase})"
        own = not isinstance(err, (Stopped, PeerError, dist.DistError))
        try:
            self.store.set(
                f"failed/{self.rank}", "own" if own else "stop" if isinstance(err, Stopped) else "peer"
            )
            culprit = self._culprit(own, stopped=isinstance(err, Stopped))
            if culprit == JOB_STOPPED:
                # A polite stop posts nothing. A peer that posted a failure (this rank hung, and its SIGTERM
                # came after the peer had named the hang) is the story, not the stop that followed it.
                return self._read("fail") or JOB_STOPPED
            message = f"{culprit}; {here}: {type(err).__name__}: {_short(err)}"
            return self.store.compare_set("fail", "", message).decode()
        except Exception:  # noqa: BLE001 - no store: say what this rank knows
            return f"{here}: {type(err).__name__}: {_short(err)}"

    def _culprit(self, own: bool, stopped: bool = False) -> str:
        if own:
            return f"rank {self.rank} failed in round {self.at[0] + 1} ({self.at[1]})"
        others = [k for k in range(self.world) if k != self.rank]
        beats = {k: self._read(f"beat/{k}") for k in others}
        grace = time.monotonic() + min(3.0, self.timeout.total_seconds())
        while time.monotonic() < grace and not all(self._read(f"failed/{k}") for k in others):
            time.sleep(0.2)
        reports = {k: self._read(f"failed/{k}") for k in others}
        if any(r == "own" for r in reports.values()):
            k = next(k for k, r in reports.items() if r == "own")
            return f"rank {k} failed in round {self._where(k)}"
        silent = [k for k in others if reports[k] is None]
        dead = [k for k in silent if self._read(f"beat/{k}") == beats[k]]
        if not dead and (stopped or "stop" in reports.values()):
            # torchrun sends SIGTERM to the ranks when one fails (it reported "own", or died) or when it
            # is stopped itself (a scheduler's limit): none failed, so the job is being stopped. A rank
            # that is still silent sits in a collective, where its SIGTERM handler waits to run.
            return JOB_STOPPED
        if dead:
            return ", ".join(f"rank {k} died in round {self._where(k)}" for k in dead)
        if silent:
            behind = min(self._progress(k) for k in silent)
            stuck = [k for k in silent if self._progress(k) == behind]
            return ", ".join(f"rank {k} hung in round {self._where(k)}" for k in stuck)
        return "a peer failed (every rank reported an error)"

    def _progress(self, rank: int) -> tuple[int, int]:
        stamp = self._read(f"at/{rank}") or "0 0"
        round, phase = stamp.split()
        return int(round), int(phase)

    def _where(self, rank: int) -> str:
        round, phase = self._progress(rank)
        return f"{round + 1} ({PHASES[phase]})"


def launched() -> bool:
    """True under torchrun (or any env:// launcher): RANK and WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_backend(choice: str, local_world: int, device: str = "auto") -> str:
    """auto: nccl when the run is on GPUs (``device`` auto or cuda) and this machine has one for each of
    its ranks, else gloo. ``device=cpu`` keeps the tensors on the CPU, which nccl cannot carry; a fixed
    ``cuda:K`` would put every rank of the machine on one GPU while nccl gives each its own."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ":" in device and local_world > 1:
        raise ConfigError(
            f"device={device} under torchrun with {local_world} ranks on this machine: each rank takes its "
            "own GPU, cuda:LOCAL_RANK; use device=cuda (or auto)"
        )
    if device == "cpu":
        if choice == "nccl":
            raise ConfigError(
                "dist.backend=nccl with device=cpu: nccl carries GPU tensors only; use gloo or auto"
            )
        return "gloo"
    if choice == "auto":
        return "nccl" if gpus >= local_world > 0 and dist.is_nccl_available() else "gloo"
    if choice == "nccl" and gpus < local_world:
        raise ConfigError(f"dist.backend=nccl needs a GPU per rank: {local_world} ranks here, {gpus} GPUs")
    return choice


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _exit_with(message: str) -> None:
    log.critical("%s", message)
    logging.shutdown()
    os._exit(1)


def _inject_fault(rank: int, round: int) -> None:
    """Tests only: DECLORA_FAULT=kill:RANK:ROUND (SIGKILL itself), abort:RANK:ROUND (SIGABRT, as a
    library's failing thread would) or hang:RANK:ROUND (sleep)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    mode, who, when = spec.split(":")
    if int(who) == rank and int(when) == round + 1:
        log.warning("injected fault: %s in round %d", mode, round + 1)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "abort":
            os.abort()
        while mode == "hang":
            time.sleep(1)
