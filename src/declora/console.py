"""What a run shows while it runs: its opening line, the rounds progress bar (a line per round when
stderr is not a terminal) and, under torchrun, each rank's log file in the run folder."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

    from declora.dist import Solo
    from declora.experiment import Experiment


class RoundsBar:
    """The rounds progress bar (rank 0 only); when stderr is not a terminal (a log file, a batch job), one
    plain line per round instead of a bar redrawn with carriage returns."""

    def __init__(self, total: int, metric: str | None = None) -> None:
        self.total = total
        self.bar: tqdm | None = None  # drawn at the first round: a failed resume shows no bar
        self.metric = metric  # the run's headline or a grid's ranked metric, beside the consensus accuracy
        self.began = time.time()  # the bar's clock starts here, so that its rate covers the first round
        self.lines = not sys.stderr.isatty()

    def on_round(self, record: dict) -> None:
        from tqdm import tqdm

        if self.lines:
            shown = ", ".join(f"{k} {v}" for k, v in self._shown(record).items())
            # the run's own clock (metrics.jsonl's wall_s), which a resume continues
            seconds = record.get("wall_s", time.time() - self.began)
            # One write, newline included: print() writes the text and its newline apart, and a signal
            # between the two (Ctrl-C, SIGTERM, SIGHUP) left the stop's own line glued to the round's.
            sys.stderr.write(f"round {record['round']}/{self.total}: {shown} ({seconds:.0f} s)\n")
            sys.stderr.flush()
            return
        if self.bar is None:  # initial: the rounds a resume starts after, which the rate must not count
            first = record["round"] - 1
            self.bar = tqdm(total=self.total, initial=first, desc="rounds", unit="round", dynamic_ncols=True)
            self.bar.start_t = self.began
        self.bar.n = record["round"]
        self.bar.set_postfix(self._shown(record))
        self.bar.refresh()

    def _shown(self, record: dict) -> dict[str, str]:
        loss = record["train_loss"]  # None: no node trained this round
        shown = {"loss": "none trained" if loss is None else f"{loss:.3f}"}
        shown["MB"] = f"{record['bytes_total'] / 1e6:.1f}"
        shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
        if "acc_avg_factors" in record:
            shown["acc"] = f"{100 * record['acc_avg_factors']:.1f}"
        if "ppl_avg_factors" in record:  # task.kind=causal_lm
            shown["ppl"] = f"{record['ppl_avg_factors']:.2f}"
        if self.metric not in (None, "acc_avg_factors", "ppl_avg_factors") and self.metric in record:
            value = record[self.metric]
            shown[self.metric] = f"{value:.2f}" if self.metric.startswith("ppl_") else f"{100 * value:.1f}"
        return shown

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def announce_run(exp: Experiment, group: Solo) -> RoundsBar | None:
    if not group.is_main:
        return None
    cfg = exp.cfg
    from declora.replicas import Replicas

    where = ""
    if group.world > 1:
        where = f", {group.world} processes: nodes per rank {list(group.layout.counts)}"
    if isinstance(group, Replicas):
        where = f", {group.world} processes: data parallel (a replica each, a share of every batch)"
    t = cfg.topology  # other schedules draw each round's graph (periodic_full: t.graph between full averages)
    graph = {"static": t.graph, "periodic_full": f"periodic_full on {t.graph}"}.get(t.schedule, t.schedule)
    quantized = "" if cfg.model.base_quantization == "none" else f", {cfg.model.base_quantization} base"
    nodes = "1 node" if exp.n == 1 else f"{exp.n} nodes"
    mixing = "" if exp.n == 1 else f", {graph}"  # one node (centralized) mixes over no graph
    attackers = "" if exp.honest is None else f", attackers {(~exp.honest).nonzero().flatten().tolist()}"
    run = f"{nodes}, {cfg.algorithm.name}{mixing}, {exp.fed.device} {cfg.precision}{quantized}{where}"
    run += attackers
    print(f"run folder: {exp.run_dir}  ({run})")
    return RoundsBar(cfg.rounds, cfg.eval.headline)  # its value beside the consensus accuracy


class _EarlyRecords(logging.Handler):
    """Under torchrun, the records logged before a rank's rank_K.log opens (the config's and the data's
    warnings, from every rank, though only rank 0 shows them): held here and written first into the file.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:  # a bound, should a run log without end before its file opens
            self.records.append(record)

    def hold(self) -> None:
        """Catch INFO and up from now on; the console keeps its level."""
        _root_to_info().addHandler(self)

    def write_into(self, into: logging.Handler) -> None:
        logging.getLogger().removeHandler(self)
        for record in self.records:
            into.handle(record)
        self.records.clear()


EARLY_RECORDS = _EarlyRecords()


def _root_to_info() -> logging.Logger:
    """The root logger, letting INFO records through to handlers of their own level; the handlers it
    has (the console) keep the level they had."""
    root = logging.getLogger()
    for other in root.handlers:
        if other.level == logging.NOTSET:
            other.setLevel(root.level)
    root.setLevel(min(root.level, logging.INFO))
    return root


def log_to_file(path: Path) -> None:
    """Per-rank details (slice, phase times per round) in the run folder, whatever the console shows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    EARLY_RECORDS.write_into(handler)
    _root_to_info().addHandler(handler)


def say_error(err: BaseException, code: int) -> int:
    """One line on stderr (a KeyError's message without its quotes, newlines folded)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    sys.stderr.write(f"declora: error: {' '.join(str(text).split())}\n")  # one write: ranks do not interleave
    sys.stderr.flush()
    return code
