"""The log stage (rank 0): metrics.jsonl, TensorBoard scalars and image grids, the one-line summary."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("rlfuse")

# Diagnostics shown in the one-line summary when the algorithm logs them.
SUMMARY = ("approx_kl", "clipfrac", "kl", "preference_accuracy", "reward_margin", "weight_ess")


def drop_epochs_from(metrics_path: Path, first_epoch: int) -> None:
    """Keep only the lines of epochs before first_epoch (a resumed run logs the others again); torn
    or malformed lines are dropped. Rewritten atomically."""
    if not metrics_path.exists():
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] < first_epoch:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    staged = metrics_path.with_suffix(".jsonl.tmp")
    staged.write_text("".join(line + "\n" for line in kept))
    staged.replace(metrics_path)


def summary_line(metrics: dict, epochs: int) -> str:
    """epoch e/E | reward mean ± std | loss | diagnostics | seconds [| eval]."""
    shown = [n for n in SUMMARY if n in metrics]
    line = (f"epoch {metrics['epoch']}/{epochs} | reward {metrics['reward_mean']:.4f} ± {metrics['reward_std']:.4f}"
            f" | loss {metrics.get('loss', math.nan):.4g} | " + " | ".join(f"{n} {metrics[n]:.3g}" for n in shown)
            + f" | {metrics['seconds']:.1f}s")
    if "eval_reward_mean" in metrics:
        line += f" | eval {metrics['eval_reward_mean']:.4f}"
    return line


class Logbook:
    """Rank 0's record of a run in run_dir. first_epoch > 1 (a resume): TensorBoard points of the
    epochs that run again are purged."""

    def __init__(self, run_dir: Path, first_epoch: int, epochs: int, progress: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.epochs, self.progress = run_dir, epochs, progress
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_epoch if first_epoch > 1 else None)

    def record(self, metrics: dict) -> None:
        """One line of metrics.jsonl."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def epoch(self, metrics: dict, samples_grid: torch.Tensor | None) -> None:
        """An epoch's metrics everywhere, its samples' grid (if any) in TensorBoard and samples/, and
        the summary line."""
        from torchvision.utils import save_image

        epoch = metrics["epoch"]
        self.record(metrics)
        for name, value in metrics.items():
            if name != "epoch":
                self.writer.add_scalar(name if name.startswith("eval") else f"train/{name}", value, epoch)
        if samples_grid is not None:
            self.writer.add_image("samples", samples_grid, epoch)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            save_image(samples_grid, self.run_dir / "samples" / f"epoch_{epoch:04d}.png")
        self.writer.flush()
        line = summary_line(metrics, self.epochs)
        tqdm.write(line) if self.progress else log.info(line)

    def eval_grid(self, grid: torch.Tensor, epoch: int) -> None:
        self.writer.add_image("eval/images", grid, epoch)

    def close(self) -> None:
        self.writer.close()


def epoch_metrics(epoch: int, rewards: torch.Tensor, details: dict[str, list[float]], advantage_stats: dict,
                  train_stats: dict, skipped: dict, param_sync_error: float, transitions: int,
                  sample_seconds: float, train_seconds: float) -> dict:
    """The epoch's line of metrics.jsonl: rewards (P * N,) of every process and their per-criterion
    details, the algorithm's diagnostics, skipped updates, weight sync, throughput."""
    import numpy as np

    from rlfuse.engine.evaluation import nanmean

    return {
        "epoch": epoch,
        "reward_mean": nanmean(rewards.float().tolist()),
        "reward_std": float(np.nanstd(rewards.float().numpy(force=True))),
        **{f"reward_{name}": nanmean(values) for name, values in details.items()},
        **advantage_stats,
        **train_stats,
        **skipped,
        "param_sync_error": param_sync_error,
        "samples": len(rewards),
        "samples_per_s": len(rewards) / sample_seconds,
        "transitions_per_s": transitions / max(train_seconds, 1e-9),
        "sample_seconds": sample_seconds,
        "train_seconds": train_seconds,
    }
