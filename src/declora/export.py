"""The exported PEFT folders (RUN_DIR/adapters): the consensus adapter and, with export=all, every node's.

``export_round: final`` writes them after the last round; ``best`` writes them whenever an evaluated
round improves on the best ``eval.headline`` so far (highest accuracy, lowest perplexity), so the
folders always hold the best round seen, also across a resume. Each folder carries its card
(declora.adapter_card): labels, pooling, base, the round and the numbers there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from declora.adapter_card import AdapterCard
from declora.evaluate import with_all_nodes
from declora.experiment import Experiment
from declora.model import KEEP_FP32, as_run, averaged_factors, fold_middle, node_adapter
from declora.peft_io import export_peft
from declora.report import METRIC_PREFIXES, VALIDATION, lower_is_better, read_metrics
from declora.runfolder import replace_folder, restore_folder
from declora.tasks import label_words_of

# What an adapter's card shows of its round's record: scores (honest ones under attack too), bytes, loss,
# and, for a private run, what was spent (privacy_epsilon_max / _mean, privacy_delta, the noise multiplier).
CARD_KEYS = (*METRIC_PREFIXES, "bytes_total", "train_loss", "privacy_")


class AdapterExport:
    def __init__(self, exp: Experiment, resumed: bool) -> None:
        # export_round=best chooses by the validation rows where the run has them, never by the test rows
        validated = exp.validation is not None
        self.exp, self.key = exp, (VALIDATION if validated else "") + exp.cfg.eval.headline
        self.best = math.nan  # the best headline value whose adapters are on disk
        self.logged: dict[str, Any] = {}  # the last record before a resume: the checkpoint's round
        metrics = exp.run_dir / "metrics.jsonl"
        if resumed and exp.group.is_main:
            restore_folder(exp.run_dir / "adapters")
        if resumed and exp.group.is_main and metrics.is_file():  # rounds before the checkpoint
            for record in read_metrics(metrics):
                if record.get("event") == "eval" and self._improves(record):
                    self.best = record[self.key]
                if record.get("event") in ("round", "eval"):
                    self.logged = record
        self.best = exp.group.broadcast(self.best)  # every rank decides alike (the export gathers)

    def _improves(self, record: dict[str, Any]) -> bool:
        value = record.get(self.key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if math.isnan(self.best):
            return True
        return value < self.best if lower_is_better(self.key) else value > self.best

    def on_round(self, record: dict[str, Any]) -> None:
        if self.exp.cfg.export_round == "best" and record.get("event") == "eval" and self._improves(record):
            self.best = record[self.key]
            self.write(record)

    def finish(self, last: dict[str, Any] | None) -> None:
        """After the last round; ``last`` is None when this call ran no round (a finished run resumed,
        for instance to export every node with export=all): the adapters are then the checkpoint's, the
        last logged round's."""
        if self.exp.cfg.export_round == "final" or math.isnan(self.best):
            self.write(last or self.logged)

    def write(self, record: dict[str, Any]) -> None:
        """Every rank gathers the factors; rank 0 writes the folders (as a one-process run would)."""
        exp = self.exp
        if exp.cfg.export == "none":
            return
        raw = {k: exp.group.gather_nodes(v.detach()) for k, v in exp.fed.tensors().items()}
        stacked = fold_middle(raw)  # Fed-SB: B R is a plain LoRA B for PEFT
        gates = exp.fed.rank_mask.gate  # this process's rows: every node's are gathered, as the factors
        gates = None if gates is None else exp.group.gather_nodes(gates.detach())
        running = as_run(exp.fed, stacked, gates)  # what each node computes: its rank gate folded in
        server = None
        if gates is not None:  # HetLoRA, FlexLoRA: the stored model differs from every node's
            with with_all_nodes(exp.fed, raw):
                server = exp.algorithm.server_tensors(exp.fed)
        if not exp.group.is_main:
            return
        cfg, folder = exp.cfg, exp.run_dir / "adapters"
        numbers = {k: v for k, v in record.items() if k.startswith(CARD_KEYS) and isinstance(v, (int, float))}
        run, inputs = _how_made(exp)

        def card(what: str, own: dict[str, Any] | None = None) -> AdapterCard:
            names, shown = exp.label_names, {**(own or {}), **numbers}
            return AdapterCard(what, cfg.model.name, names, record.get("round"), shown, run, inputs)

        def write_all(into: Path) -> None:
            m = exp.task.metric  # acc | ppl: the keys its numbers have in metrics.jsonl
            consensus = f"the consensus adapter (averaged factors mean(B)·mean(A); {m}_avg_factors)"
            shown = folder.resolve() / "consensus"  # the README names the final place, absolute, not the .tmp
            export_peft(exp.fed, averaged_factors(running), into / "consensus", card(consensus), shown)
            if server is not None:  # rank-gated nodes run truncations of it: kept as the method's model
                what = f"the server model, at the full rank r the nodes truncate ({m}_server)"
                export_peft(exp.fed, server, into / "server", card(what), folder.resolve() / "server")
            if cfg.export == "all":
                for i in range(exp.n):
                    scores = record.get(f"{m}_node")  # every node's own score, when this round evaluated
                    own = {f"{m}_this_node": scores[i]} if isinstance(scores, list) else {}
                    spent = record.get("privacy_epsilon")  # every node's epsilon so far, in a private run
                    if isinstance(spent, list):
                        own["privacy_epsilon_this_node"] = spent[i]
                    what = f"node {i}'s own adapter ({m}_this_node; the other numbers are the run's)"
                    node = card(what, own)
                    name = f"node_{i:03d}"
                    adapter = node_adapter(exp.fed, stacked, i, gates)
                    export_peft(exp.fed, adapter, into / name, node, folder.resolve() / name)

        # All folders are replaced together: a kill mid-export never leaves adapters of two rounds.
        replace_folder(folder, write_all, "export")


def _how_made(exp: Experiment) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every card of a run says: how the run was made (algorithm, nodes, privacy, attack, robust
    rule), and what the numbers also depend on (how inputs were cut and built, the base's quantization)."""
    cfg = exp.cfg
    run = {
        "algorithm": cfg.algorithm.name,
        "nodes": exp.n,
        "rounds": cfg.rounds,
        "folder": str(exp.run_dir.resolve()),  # usable from anywhere, as the load lines are
    }
    if cfg.privacy.level != "none":  # a private release says how it was made private
        noise = "secure" if cfg.privacy.secure_noise else "seeded"
        run["privacy"] = f"{cfg.privacy.level} level, clip {cfg.privacy.clip:g}, {noise} noise"
    if cfg.attack.kind != "none":  # and an attacked one what it withstood (its acc_honest_* numbers)
        nodes = cfg.attack.nodes
        run["attack"] = f"{cfg.attack.kind} by {list(nodes) if isinstance(nodes, tuple) else nodes} nodes"
    if cfg.robust.aggregator != "mean":
        run["robust"] = cfg.robust.aggregator

    inputs: dict[str, Any] = {"max_length": cfg.model.max_length}
    inputs["base_quantization"] = cfg.model.base_quantization
    if cfg.model.base_quantization == "nf4":  # stock transformers must leave the same layers unquantized
        inputs["kept_fp32"] = list(KEEP_FP32)
    if cfg.precision != "fp32":
        inputs["precision"] = cfg.precision
    if cfg.data.pair_column is not None:  # two texts a row: the card says how to tokenize them
        inputs["pair_column"] = cfg.data.pair_column
    if cfg.train.logit_adjustment:  # its logits leave out the label prior: the card says how to add one
        inputs["logit_adjustment"] = cfg.train.logit_adjustment
    if cfg.task.kind == "instruction":  # its rows are cut at the prompt's start: the card says how
        inputs["task"] = "instruction"
        inputs["chat_template"] = bool(getattr(getattr(exp.task, "tokenizer", None), "chat_template", None))
    if cfg.task.kind == "label_words":  # the prompt and the words build_task used
        inputs["template"] = cfg.task.template
        inputs["label_words"] = list(label_words_of(cfg.task, exp.label_names))
    return run, inputs
