"""The evaluate stage: held-out prompts at fixed seeds (the same noise at every evaluation), split
over processes, scored by the trained reward (and the monitors' panel, diversity and drift:
rlfuse.engine.monitors); grids written by rank 0, and at the end the held-out images before and
after training beside their captions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlfuse.dynamics import Sampler
from rlfuse.engine.monitors import MonitorSettings, Watch, chain_kl, mean_pairwise_distance
from rlfuse.families import ModelFamily
from rlfuse.images import captioned_pairs, grid_cells, grid_columns
from rlfuse.rewards.base import Reward, score
from rlfuse.rollout import rollout
from rlfuse.seeding import seed_for


@dataclass(frozen=True)
class EvalSettings:
    """prompts: held-out prompts (cycled); num_images: images per evaluation; seed: their noise seed;
    num_steps, guidance_scale: the sampler's."""

    prompts: list[str]
    num_images: int
    seed: int
    num_steps: int
    guidance_scale: float


@dataclass
class Evaluation:
    """metrics: eval_reward_mean, eval_reward_std, eval_reward_<criterion>, eval_<panel reward>,
    eval_drift_kl; images (n, 3, H, W) and prompts of every process, in image order; scores: per image,
    in image order, "reward" (the trained one), each panel reward's and "drift_kl" (filled on every process)."""

    metrics: dict[str, float]
    images: torch.Tensor
    prompts: list[str]
    scores: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Monitoring:
    """What the monitors keep between evaluations: their settings, the reference policy (drift KL), the
    warnings' memory, and the base model's held-out images (drift in pixels)."""

    settings: MonitorSettings
    reference: object | None = None
    watch: Watch | None = None
    base_images: torch.Tensor | None = None


def nanmean(values: list[float]) -> float:
    """Mean over the values that are not NaN (NaN if none are)."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(network: torch.nn.Module, family: ModelFamily, sampler: Sampler, reward: Reward | None,
             settings: EvalSettings, latent_shape: tuple[int, ...], rank: int, world: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager], monitors: MonitorSettings | None = None,
             reference=None) -> Evaluation:
    """Sample and score this process's share (images rank, rank + world, ...) and gather everything.
    reward None: images only. monitors: also its panel rewards and, with a reference, the drift KL."""
    from accelerate.utils import gather_object

    indices = list(range(rank, settings.num_images, world))
    prompts = [settings.prompts[i % len(settings.prompts)] for i in indices]
    panel = monitors.panel if monitors is not None else {}
    with_kl = monitors is not None and monitors.drift and reference is not None
    network.eval()
    images, scores, details = torch.zeros(0, 3, 1, 1), {}, {}
    if prompts:
        sampled = rollout(network, family, sampler, prompts, [seed_for(settings.seed, 0, i) for i in indices],
                          [seed_for(settings.seed, 1, i) for i in indices], latent_shape, settings.num_steps,
                          settings.guidance_scale, device, autocast)
        images = sampled.images
        if reward is not None:
            scored = score(reward, images, prompts)
            scores["reward"] = scored.scores.float().cpu().tolist()
            details = {name: [float(v) for v in values[:len(prompts)]] for name, values in scored.details.items()}
        for name, panel_reward in panel.items():
            scores[name] = score(panel_reward, images, prompts).scores.float().cpu().tolist()
        if with_kl:
            with autocast():
                scores["drift_kl"] = chain_kl(network, reference, family, monitors.kl_sampler, sampled.chains,
                                              sampled.timesteps, sampled.conditioning, settings.guidance_scale).tolist()
    names = (["reward"] if reward is not None else []) + list(panel) + (["drift_kl"] if with_kl else [])
    all_details = {name: gather_object(values) for name, values in details.items()}
    all_images, all_indices = gather_object(list(images.cpu())), gather_object(indices)
    order = np.argsort(all_indices, kind="stable")
    gathered = {name: gather_object(scores.get(name, [])) for name in names}
    all_scores = {name: [values[i] for i in order] for name, values in gathered.items()}
    metrics = {}
    if reward is not None:
        metrics = {"eval_reward_mean": float(np.mean(all_scores["reward"])),
                   "eval_reward_std": float(np.std(all_scores["reward"])),
                   **{f"eval_reward_{name}": nanmean(values) for name, values in all_details.items()}}
    metrics.update({f"eval_{name}": nanmean(all_scores[name]) for name in names if name != "reward"})
    return Evaluation(metrics, torch.stack([all_images[i] for i in order]),
                      [settings.prompts[all_indices[i] % len(settings.prompts)] for i in order], all_scores)


def save_eval_images(run_dir: Path, evaluation: Evaluation, epoch: int, final: bool) -> torch.Tensor:
    """Write eval/epoch_NNNN.png (a grid in image order) and, after the last epoch, eval/before_after.png
    (each held-out caption beside its image at the first and the last evaluation). Returns the grid."""
    from torchvision.utils import make_grid, save_image

    images = evaluation.images
    grid = make_grid(images, nrow=grid_columns(len(images)))
    folder = run_dir / "eval"
    folder.mkdir(exist_ok=True)
    save_image(grid, folder / f"epoch_{epoch:04d}.png")
    before = folder / "epoch_0000.png"
    if final and epoch > 0 and before.is_file():
        from torchvision.io import ImageReadMode, read_image

        first = read_image(str(before), ImageReadMode.RGB).float() / 255
        first_images = grid_cells(first, len(images), images.shape[-2], images.shape[-1])
        captioned_pairs(first_images, images, evaluation.prompts).save(folder / "before_after.png")
    return grid


def evaluation_stage(network: torch.nn.Module, family: ModelFamily, sampler: Sampler, reward: Reward,
                     settings: EvalSettings, latent_shape: tuple[int, ...], accelerator, run_dir: Path, logbook,
                     epoch: int, final: bool, monitoring: Monitoring | None = None) -> dict[str, float]:
    """Evaluate on every process; rank 0 writes the grids (and logs the grid to the trackers) and the
    monitors' warnings. Returns the evaluation's metrics."""
    share = (accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.autocast)
    monitors = monitoring.settings if monitoring is not None else None
    result = evaluate(network, family, sampler, reward, settings, latent_shape, *share, monitors,
                      monitoring.reference if monitoring is not None else None)
    metrics = dict(result.metrics)
    if accelerator.is_main_process:
        logbook.eval_grid(save_eval_images(run_dir, result, epoch, final), epoch)
    if monitors is None or not monitors.active:
        return metrics
    diversity = None
    if monitors.diversity_space is not None:  # its own images: the first held-out prompts, several seeds each
        prompts = [p for p in settings.prompts[:monitors.diversity_prompts] for _ in range(monitors.diversity_images)]
        images = evaluate(network, family, sampler, None, EvalSettings(prompts, len(prompts), settings.seed + 1,
                          settings.num_steps, settings.guidance_scale), latent_shape, *share).images
        diversity = metrics["eval_diversity"] = mean_pairwise_distance(images, len(prompts) // monitors.diversity_images,
                                                                       monitors.diversity_space, monitors.clip)
    if monitors.drift:
        if monitoring.base_images is None:  # the first evaluation: the base model's, or a resumed run's epoch 0 grid
            monitoring.base_images = base_images(run_dir, result) if epoch > 0 else result.images
        metrics["eval_drift_pixel"] = float(((result.images - monitoring.base_images) ** 2).mean().sqrt())
    if accelerator.is_main_process:
        for line in monitoring.watch.warnings(epoch, {k: v for k, v in result.scores.items() if k != "drift_kl"},
                                              diversity):
            logging.getLogger("rlfuse").warning(line)
    return metrics


def base_images(run_dir: Path, evaluation: Evaluation) -> torch.Tensor:
    """The held-out images of the base model from eval/epoch_0000.png (8-bit), for a run resumed past
    its first evaluation; this evaluation's own images when the grid is not there."""
    from torchvision.io import ImageReadMode, read_image

    path, images = run_dir / "eval" / "epoch_0000.png", evaluation.images
    if not path.is_file():
        return images
    grid = read_image(str(path), ImageReadMode.RGB).float() / 255
    return grid_cells(grid, len(images), images.shape[-2], images.shape[-1])
