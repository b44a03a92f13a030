"""Several tiny experiments in one torchrun launch (one process group), for the equivalence tests.

    torchrun --nproc-per-node P tests/distributed/worker.py CASES.json

CASES.json maps a label to the config overrides of one run (run_dir included); they run in order. A case
{"resume": RUN_DIR, "overrides": [...]} resumes RUN_DIR (its config.yaml, with the overrides) instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from declora.config import DistConfig, load_config
from declora.dist import Distributed
from declora.engine import run
from declora.experiment import build_experiment


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    group = Distributed(DistConfig(timeout_s=60))
    with group.guard():
        for case in cases.values():
            if isinstance(case, dict):
                folder = Path(case["resume"])
                cfg = load_config(folder / "config.yaml", case["overrides"])
                run(build_experiment(cfg, folder, group), resume=True)
            else:
                run(build_experiment(load_config(None, case), None, group))
    group.close()


if __name__ == "__main__":
    main()
