"""How a run's folder begins: the metrics log (metrics.jsonl), a new run's first records, and a resume
from the last complete checkpoint, the log cut back to that round. Rank 0 alone writes the shared files;
every rank loads its own checkpoint shard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from declora.algorithms.base import chosen_settings
from declora.checkpoint import LATEST, load_checkpoint
from declora.config import ConfigError, load_config, save_config, to_dict
from declora.experiment import Experiment
from declora.inputs import check_started_in, fingerprints, warn_changed
from declora.patience import check_patience_left
from declora.quantize_bnb import uses_bitsandbytes
from declora.replicas import Replicas
from declora.report import record_problem
from declora.resume_rules import check_resume
from declora.runfolder import (
    atomic_write_text,
    check_checkpoint_kept,
    check_last_round_evaluated,
    check_log_covers,
    check_new_run,
    crash_point,
    empty_run_folder,
    record_resume,
    start_record,
)
from declora.schedules import describe
from declora.trackers import RUN_IDS, check_tracker_runs, reading_saved_config

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's round are dropped first (atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """The lines as written; a torn last line (a kill in the middle of an append) is dropped, a broken
        line anywhere else is an error naming the file and line."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as err:
                if i == len(lines) - 1:
                    break
                raise ConfigError(f"{self.path}:{i + 1}: not a JSON line ({err.msg})") from err
            if record is not None and (problem := record_problem(record)):
                raise ConfigError(f"{self.path}:{i + 1}: a record that {problem}")
            if record is not None:
                keep.append((line, record))
        return keep

    def truncate_after(self, round_done: int) -> None:
        keep = [line for line, record in self.records() if record.get("round", 0) <= round_done]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep), "metrics.rewrite")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as f:

                def torn() -> None:  # half the line, on disk
                    f.write(line[: len(line) // 2])
                    f.flush()

                crash_point("metrics.append", partial=torn)
                f.write(line)
        except OSError as err:  # a torn last line is dropped on resume
            raise OSError(err.errno, f"cannot append to {self.path} ({err.strerror})") from err


def start_new_run(exp: Experiment, metrics: MetricsLog, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    check_new_run(exp.run_dir, overwrite)
    empty_run_folder(exp.run_dir, keep)  # only reached when empty already or with overwrite
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(exp.cfg, exp.run_dir / "config.yaml")
    crash_point("start.config")
    metrics.path.write_text("")
    topology = {k: v for k, v in describe(exp.schedule).items() if not isinstance(v, (list, dict))}
    log.info("topology: %s", topology)
    start = {"event": "start", "round": 0, "nodes": exp.n, "config": to_dict(exp.cfg), "topology": topology}
    start["cwd"] = str(Path.cwd())  # relative input paths are opened from here (a resume checks it)
    start["inputs"] = fingerprints(exp.cfg)  # a resume warns when one changed
    # how many held-out examples each evaluation scores (the standard error of an accuracy depends on it)
    examples = {"consensus": len(exp.consensus_eval.labels), "node": len(exp.node_eval.labels)}
    if exp.validation is not None:  # the validation rows: all for the consensus models, some for each node
        examples["validation"] = len(exp.validation[0].labels)
    start["eval_examples"] = examples
    # the layout that ran (a 2-process folder looks like a 1-process one otherwise); null nodes_per_rank:
    # data parallel, every process a replica of the one node
    slices = None if isinstance(exp.group, Replicas) else list(exp.group.layout.counts)
    start["processes"] = {"world": exp.group.world, "nodes_per_rank": slices}
    if exp.honest is not None:  # which nodes attacked (attack.nodes may be a fraction, drawn from the seed)
        start["attackers"] = (~exp.honest).nonzero().flatten().tolist()
    model = exp.cfg.model
    if model.base_quantization != "none":  # what quant_backend=auto resolved to: it sets the speed
        use = uses_bitsandbytes(model.quant_backend, model.base_quantization, exp.fed.device)
        start["base_decoder"] = "bitsandbytes" if use else "declora"
    if chosen := chosen_settings(exp.algorithm):
        log.info("%s chose: %s", exp.cfg.algorithm.name, chosen)
        start["algorithm"] = chosen
    metrics.write(start)
    metrics.write({"event": "partition", "round": 0, "nodes": exp.partition_summary})
    for i, node in enumerate(exp.partition_summary):
        log.info("node %d: %s", i, node)


def resume_run(exp: Experiment, metrics: MetricsLog) -> tuple[int, float]:
    """Load the last complete checkpoint, drop later metrics, record the resume. Every rank reads its
    own checkpoint shard from the folder on its host; only rank 0 reads and rewrites metrics.jsonl and
    config.yaml. The CLI has already refused unsafe overrides."""
    group, main = exp.group, exp.group.is_main
    if main:  # again, under the lock
        check_folder(exp.run_dir, resume=True, overwrite=False)
    with reading_saved_config():  # only compared with: exp.cfg is the one checked and run
        saved = load_config(exp.run_dir / "config.yaml") if main else None
    changes = check_resume(saved, exp.cfg) if saved is not None else {}  # saved: on the main rank
    if main:  # what the CLI checks before any work, for a resume from Python too
        assert saved is not None  # read above on the main rank
        check_checkpoint_kept(exp.run_dir, saved.checkpoint_every, saved.rounds)
        begun = start_record(exp.run_dir)
        check_started_in(saved, begun.get("cwd"))
        warn_changed(begun.get("inputs"), saved)
        _check_same_partition(exp, metrics)
        check_tracker_runs(exp.cfg, exp.run_dir)
    if not group.broadcast((exp.run_dir / "state" / LATEST).is_file() if main else None):
        log.info("%s has no checkpoint yet: starting it again from round 0", exp.run_dir)
        if main:  # killed before its first checkpoint: nothing to keep but the tracker run it continues
            start_new_run(exp, metrics, overwrite=True, keep=RUN_IDS)
            record_resume(exp.run_dir, 0, changes)
        return 0, 0.0
    start, wall_before = load_checkpoint(exp)
    if main:
        assert saved is not None  # read above on the main rank
        check_resume(saved, exp.cfg, rounds_done=start)
        check_log_covers(exp.run_dir, start)
        check_last_round_evaluated(exp.run_dir, start, exp.cfg.rounds)
        check_patience_left(
            exp.cfg, [r for _, r in metrics.records() if r.get("round", 0) <= start], exp.run_dir
        )
        metrics.truncate_after(start)
        record_resume(exp.run_dir, start, changes)
        save_config(exp.cfg, exp.run_dir / "config.yaml")  # the folder describes the run as it goes on
    log.info("resuming %s after round %d", exp.run_dir, start)
    return start, wall_before


def _check_same_partition(exp: Experiment, metrics: MetricsLog) -> None:
    """The checkpointed batch streams index each node's rows and its head has one row per label: a resume
    on data that splits into other node sizes or has another label count (the file was edited) cannot go
    on with them."""
    recorded = next((r for _, r in metrics.records() if r.get("event") == "partition"), None)
    if recorded is None:
        return
    labels_before = len(recorded["nodes"][0].get("label_counts", [])) if recorded["nodes"] else 0
    labels_now = len(exp.partition_summary[0]["label_counts"]) if exp.partition_summary else 0
    if labels_before and labels_before != labels_now:  # else the checkpoint load fails on a head's shape
        raise ConfigError(
            f"the training data's labels changed since the run started ({labels_before} labels, now "
            f"{labels_now}: {list(exp.label_names)}): the checkpoint's classifier cannot go on with them; "
            "restore the data, or start a new run"
        )
    before = [node.get("size") for node in recorded["nodes"]]
    now = [node.get("size") for node in exp.partition_summary]  # the same node count: nodes cannot change
    changed = [i for i, (a, b) in enumerate(zip(before, now, strict=True)) if a != b]
    if changed:
        i = changed[0]
        raise ConfigError(
            f"the training data changed since the run started (node {i} had {before[i]} training rows, now "
            f"{now[i]}): the checkpoint cannot go on with it; restore the data, or start a new run"
        )


def check_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """What the command line checks before any work, for a run from Python too (checked again under the
    lock, where another process cannot change the folder in between)."""
    if resume and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: it holds no declora run (no config.yaml)")
    if not resume:
        check_new_run(run_dir, overwrite)
