"""The best evaluation so far, and when to stop: checkpoint.best keeps the checkpoint of the best
value of one logged metric; early_stop ends a run whose metric has not improved for a while."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rlfuse.errors import UserError


@dataclass
class BestTracker:
    """Follows one metric over a run's evaluations.

    metric: its name in metrics.jsonl (eval_reward_mean, ...); mode: "max" or "min"; patience:
    evaluations without an improvement of more than min_delta before the run stops (0: never).
    best, best_epoch: the best value so far and its epoch (nan, -1 before any): any improvement
    counts, so the best checkpoint is the best evaluated one. stale: evaluations since the metric last
    beat `anchor` (the best value at that time) by more than min_delta: only such gains hold off the stop.
    """

    metric: str
    mode: str = "max"
    patience: int = 0
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = -1
    stale: int = 0
    anchor: float = math.nan

    def gain(self, value: float, over: float) -> float:
        """How much value improves on `over` in the metric's direction (inf when over is not yet set)."""
        if not math.isfinite(over):
            return math.inf
        return value - over if self.mode == "max" else over - value

    def update(self, value: float, epoch: int) -> bool:
        """Record an evaluation's value; returns True when it is the new best. A NaN or infinite value
        never is, and counts as an evaluation without improvement."""
        finite = math.isfinite(value)
        if finite and self.gain(value, self.anchor) > self.min_delta:
            self.anchor, self.stale = float(value), 0
        else:
            self.stale += 1
        if finite and self.gain(value, self.best) > 0:
            self.best, self.best_epoch = float(value), epoch
            return True
        return False

    def observe(self, metrics: dict, epoch: int) -> bool:
        """update() with the metric's value in an evaluation epoch's metrics; returns True on a new best.
        A metric that only training logs is absent before training (epoch 0): skipped there."""
        if self.metric not in metrics:
            if epoch == 0:
                return False
            raise UserError(f"checkpoint.best={self.metric}: not a logged metric; choose one of "
                            f"{', '.join(sorted(name for name in metrics if name != 'epoch'))}")
        return self.update(float(metrics[self.metric]), epoch)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def stop_reason(self) -> str:
        return (f"early stop: {self.metric} has not improved by more than {self.min_delta:g} over the last "
                f"{self.stale} evaluations (early_stop.patience={self.patience}); best {self.best:.4f} at epoch "
                f"{self.best_epoch}")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Take the best value, its epoch and the stale count of a checkpoint (the settings stay this run's)."""
        self.best, self.best_epoch, self.stale, self.anchor = (state["best"], state["best_epoch"], state["stale"],
                                                               state["anchor"])

    def note(self) -> dict:
        """best.json of the best checkpoint: which metric, its value, the epoch."""
        return {"metric": self.metric, "mode": self.mode, "value": self.best, "epoch": self.best_epoch}
