"""Early stopping (`train.patience`, fairseq's --patience, HF's EarlyStoppingCallback): the run ends
after N validations in a row without a better `train.best_metric`; best.safetensors is its result.

The count and the best validation's step go into every checkpoint (trainer.json), so a resumed
run continues the count exactly. Validation runs on rank 0 only; its count and decision reach the
other ranks through one small all-reduce at validation time (which also stands for the barrier
that makes them wait for it), never an extra collective per step.
"""
from __future__ import annotations

import math

from tfx.config import HIGHER_IS_BETTER
from tfx.errors import UsageError
from tfx.train import distributed as dist


def natural(best: float, metric: str) -> float:
    """The trainer keeps `best` as a number to lower; the metric's own value (accuracy, not -accuracy)."""
    return -best if metric in HIGHER_IS_BETTER else best


def check(cfg, *, validation: bool = True) -> str | None:
    """Refuse train.patience where the run never validates before its end (UsageError, exit 2);
    a note (or None) where it validates too few times for the patience to run out."""
    if not cfg.patience:
        return None
    why, fix = None, "set train.eval_every below train.steps"
    if not validation:
        why, fix = "the data has no validation split", "set data.valid, or data.holdout (a fraction of train)"
    elif cfg.eval_every == 0:
        why = "train.eval_every = 0 validates only once, at the end"
    elif cfg.eval_every >= cfg.steps:
        why = (f"train.eval_every ({cfg.eval_every}) is not below train.steps ({cfg.steps}): the only validation "
               f"is the last step's")
    if why:
        raise UsageError(f"train.patience = {cfg.patience} stops a run after {cfg.patience} validations without a "
                         f"better train.best_metric, but {why}: {fix}, or drop train.patience")
    validations = math.ceil(cfg.steps / cfg.eval_every)
    if validations <= cfg.patience:
        return (f"note: train.patience = {cfg.patience} cannot stop this run: it validates {validations} times "
                f"in train.steps = {cfg.steps} (every {cfg.eval_every})")
    return None


class EarlyStop:
    """Validations in a row without improvement (`bad`), the best validation's step, and the step
    where the patience ran out (None while it has not)."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.bad, self.best_step, self.stopped_at = 0, None, None

    def observe(self, step: int, improved: bool) -> None:
        """One validation's outcome (on rank 0)."""
        self.bad, self.best_step = (0, step) if improved else (self.bad + 1, self.best_step)
        self.stopped_at = step if self.spent() else None

    def spent(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def share(self, rank: int) -> bool:
        """Rank 0's count, best step and decision on every rank (one all-reduce of three numbers, a
        no-op with one process); whether to stop now."""
        best_step = -1 if self.best_step is None else self.best_step
        mine = (self.bad, best_step, self.stopped_at or 0) if rank == 0 else (0, 0, 0)
        bad, best_step, stopped_at = (int(x) for x in dist.sum_numbers(*map(float, mine)))
        self.bad, self.best_step, self.stopped_at = bad, None if best_step < 0 else best_step, stopped_at or None
        return self.stopped_at is not None

    def state(self) -> dict:
        """For trainer.json."""
        return {"bad_validations": self.bad, "best_step": self.best_step, "early_stopped": self.stopped_at}

    def restore(self, trainer: dict, *, same_metric: bool) -> None:
        """From a checkpoint's trainer.json (an older one has none of it: a count of 0); a change of
        train.best_metric starts the count afresh, as it does the best score."""
        if same_metric:
            self.bad, self.best_step = trainer.get("bad_validations", 0), trainer.get("best_step")
            self.stopped_at = trainer.get("early_stopped") if self.spent() else None

    def record(self, step: int, metric: str, best: float) -> dict:
        """The metrics.jsonl line of the stop."""
        return {"step": step, "early_stop": True, "best_step": self.best_step, "best_metric": metric,
                "best": natural(best, metric), "patience": self.patience}

    def stop_line(self, step: int, metric: str, best: float) -> str:
        return (f"early stop at step {step}: no better valid {metric} in {self.bad} validations (best "
                f"{natural(best, metric):.4f} at step {self.best_step}); the run's result is best.safetensors")

    def spent_line(self, step: int, metric: str, best: float) -> str:
        """Why a resumed run whose patience is spent does nothing, and the way on."""
        where = f"the run stopped early at step {step}" if self.stopped_at else f"the run is at step {step}"
        return (f"nothing to do: {where}, with no better valid {metric} in its last {self.bad} validations (best "
                f"{natural(best, metric):.4f} at step {self.best_step}) and train.patience = {self.patience}; "
                f"raising train.steps does not change that. To train on, raise the patience above {self.bad} "
                f"(--set train.patience={self.bad + self.patience})")
