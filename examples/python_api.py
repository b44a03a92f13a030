"""declora from Python: a small sweep with a logger of your own and early stopping, then the results read
back from the run folders and the consensus adapter in memory.

    python examples/python_api.py            # 4 runs of configs/smoke.yaml, about a minute on 2 cores
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from declora.config import load_config
from declora.engine import StopRun, run
from declora.experiment import build_experiment
from declora.model import averaged_factors, fold_middle
from declora.report import read_metrics, summarize


def sweep(
    base: str = "configs/smoke.yaml", out: str = "runs/python_api", stop_at: float = 0.65, **settings: Any
) -> dict:
    """Two methods x two seeds; each stops once its consensus adapter reaches ``stop_at`` on the held-out
    set. ``settings``: more overrides for every run (``threads=2``, say)."""
    finals = {}
    for algorithm in ("dec_lora", "fedavg"):
        for seed in (0, 1):
            run_dir = Path(out) / f"{algorithm}-seed{seed}"
            # Overrides as a mapping of dotted keys to Python values (None, tuples, numbers as they are).
            cfg = load_config(
                base, {"algorithm.name": algorithm, "seed": seed, "run_dir": str(run_dir), **settings}
            )
            exp = build_experiment(cfg)  # loads the frozen base once for all nodes, and the data

            def on_round(record: dict, name: str = f"{algorithm} seed {seed}") -> None:
                """Called after each round is logged (and checkpointed when due): your own logger here."""
                if "acc_avg_factors" in record:  # an evaluated round
                    print(f"{name} round {record['round']}: {record['acc_avg_factors']:.3f}")
                    if record["acc_avg_factors"] >= stop_at:
                        raise StopRun  # checkpoint, adapters and report are written; run() returns

            records = run(exp, on_round=on_round, overwrite=True)  # the rounds' metrics.jsonl records
            consensus = averaged_factors(fold_middle(exp.fed.tensors()))  # {name: (1, ...)}: in memory
            summary = summarize(read_metrics(run_dir / "metrics.jsonl"))  # what `declora report` shows
            finals[algorithm, seed] = {
                "rounds": records[-1]["round"],
                "acc_avg_factors": summary["accuracy"]["acc_avg_factors"]["final"],
                "stopped_early": summary["stopped_early"],  # (round reached, rounds planned) or None
                "adapter_tensors": len(consensus),
            }
    return finals


if __name__ == "__main__":
    for key, value in sweep(threads=2).items():
        print(key, value)
