"""The log stage (rank 0): metrics.jsonl, the trackers (TensorBoard, W&B, MLflow through accelerate's
tracker classes: scalars every epoch, image grids, the resolved config as run parameters), the
one-line summary."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class TrackerSettings:
    """names: any of tensorboard, wandb, mlflow; project: the W&B project and MLflow experiment;
    mlflow_uri: MLflow's tracking URI; run_config: the resolved config, stored as the run's parameters."""

    names: tuple[str, ...] = ("tensorboard",)
    project: str = "rlfuse"
    mlflow_uri: str | None = None
    run_config: dict = field(default_factory=dict)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and None as text (tracker parameters take scalars only)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def make_tracker(name: str, run_dir: Path, first_epoch: int, settings: TrackerSettings):
    """One accelerate tracker writing for run_dir, started. TensorBoard writes run_dir/tensorboard (a
    resume purges the points of the epochs that run again); W&B writes run_dir/wandb under a run id made
    from the folder, so that a resume continues the same W&B run; MLflow logs to settings.mlflow_uri."""
    from accelerate import PartialState, tracking

    PartialState()  # accelerate's trackers log through its state (made by the Accelerator in a run)
    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker("tensorboard", run_dir, purge_step=first_epoch if first_epoch > 1 else None)
    elif name == "wandb":
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        tracker = tracking.WandBTracker(settings.project, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow")
    elif name == "mlflow":
        import mlflow

        artifacts = None
        if settings.mlflow_uri:
            mlflow.set_tracking_uri(settings.mlflow_uri)
            if settings.mlflow_uri.startswith("sqlite:///"):  # a local store: images beside it, not in ./mlruns
                artifacts = (Path(settings.mlflow_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        tracker = tracking.MLflowTracker(settings.project, logging_dir=artifacts, run_name=run_dir.name)
    else:
        raise ValueError(f"no tracker {name!r}")
    tracker.start()
    return tracker


class Logbook:
    """Rank 0's record of a run in run_dir: metrics.jsonl, grids, and each tracker of trackers
    (default: TensorBoard alone). first_epoch > 1: a resume."""

    def __init__(self, run_dir: Path, first_epoch: int, epochs: int, progress: bool,
                 trackers: TrackerSettings | None = None):
        self.run_dir, self.epochs, self.progress = run_dir, epochs, progress
        self.metrics_path = run_dir / "metrics.jsonl"
        settings = trackers or TrackerSettings()
        self.trackers = {name: make_tracker(name, run_dir, first_epoch, settings) for name in settings.names}
        parameters = {**flatten(settings.run_config), "run_dir": str(run_dir.resolve())}
        for name, tracker in self.trackers.items():
            if name == "tensorboard":  # TensorBoard's hparams take few types; the run folder as text is enough
                tracker.log({"run_dir": parameters["run_dir"]}, step=first_epoch - 1)
            else:
                tracker.store_init_configuration(parameters)

    def record(self, metrics: dict) -> None:
        """One line of metrics.jsonl, and its numbers to every tracker at step = the epoch."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        scalars = {name if name.startswith("eval") else f"train/{name}": float(value)
                   for name, value in metrics.items() if name != "epoch" and isinstance(value, (int, float))}
        for tracker in self.trackers.values():
            tracker.log(scalars, step=metrics["epoch"])

    def epoch(self, metrics: dict, samples_grid: torch.Tensor | None) -> None:
        """An epoch's metrics everywhere, its samples' grid (if any) in TensorBoard and samples/, and
        the summary line."""
        from torchvision.utils import save_image

        epoch = metrics["epoch"]
        self.record(metrics)
        if samples_grid is not None:
            self.image("samples", samples_grid, epoch)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            save_image(samples_grid, self.run_dir / "samples" / f"epoch_{epoch:04d}.png")
        line = summary_line(metrics, self.epochs)
        tqdm.write(line) if self.progress else log.info(line)

    def image(self, name: str, grid: torch.Tensor, epoch: int) -> None:
        """A (3, H, W) grid in [0, 1] to every tracker."""
        pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
        for tracker_name, tracker in self.trackers.items():
            if tracker_name == "tensorboard":
                tracker.log_images({name: pixels[None]}, step=epoch)   # (1, 3, H, W)
            elif tracker_name == "wandb":
                tracker.log_images({name: [pixels.permute(1, 2, 0).numpy()]}, step=epoch)
            elif tracker_name == "mlflow":
                import mlflow

                mlflow.log_image(pixels.permute(1, 2, 0).numpy(), key=name.replace("/", "_"), step=epoch)

    def eval_grid(self, grid: torch.Tensor, epoch: int) -> None:
        self.image("eval/images", grid, epoch)

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
        if "wandb" in self.trackers:  # stop W&B's background service now, not at interpreter exit
            import wandb

            wandb.teardown()


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
