"""Early stopping (``eval.patience``): a run stops once its headline's score on the validation rows
(``val_<eval.headline>``, data.validation_fraction) has not improved for that many evaluations in a row.
The validation rows choose, never the test rows. The run then ends as a finished one: a ``stopped`` line
in metrics.jsonl, a checkpoint of its last round, its adapters (with export_round=best, those of the
round the validation rows chose) and its report. A resume with a larger eval.patience, or none, goes on;
with the same, it is refused, since it would stop again at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from declora.config import Config, ConfigError
from declora.report import STOPPED, VALIDATION, lower_is_better, number_at


def evaluations_since_best(evals: list[dict[str, Any]], key: str) -> int:
    """How many evaluations of ``key`` came after its best one (a tie is no improvement)."""
    values = [v for r in evals if (v := number_at(r, key)) is not None and math.isfinite(v)]
    if not values:
        return 0
    best = min(values) if lower_is_better(key) else max(values)
    return len(values) - 1 - values.index(best)


class Patience:
    """Counts a run's evaluations without a better validation score; ``logged``: the evaluations of the
    rounds before a resume."""

    def __init__(self, cfg: Config, logged: Sequence[dict[str, Any]] = ()) -> None:
        self.limit, self.key = cfg.eval.patience, VALIDATION + cfg.eval.headline
        self.evals = [r for r in logged if r.get("event") == "eval"]

    def spent(self) -> bool:
        return self.limit is not None and evaluations_since_best(self.evals, self.key) >= self.limit

    def after(self, record: dict[str, Any]) -> bool:
        """Whether the run stops after this round's record."""
        if record.get("event") == "eval":
            self.evals.append(record)
        return self.spent()

    def line(self, round_done: int) -> dict[str, Any]:
        """The metrics.jsonl line that says why the run stopped."""
        since = evaluations_since_best(self.evals, self.key)
        reason = f"no better {self.key} in {since} evaluations (eval.patience={self.limit})"
        return {"event": STOPPED, "round": round_done, "reason": reason}


def check_patience_left(cfg: Config, logged: Sequence[dict[str, Any]], run_dir: object) -> None:
    """A resume that would stop again at once (the same patience, already spent) is refused."""
    patience = Patience(cfg, logged)
    if patience.spent():
        since = evaluations_since_best(patience.evals, patience.key)
        raise ConfigError(
            f"{run_dir} stopped early: no better {patience.key} in its last {since} evaluations "
            f"(eval.patience={cfg.eval.patience}); resume with a larger eval.patience, or "
            "eval.patience=null, to go on"
        )
