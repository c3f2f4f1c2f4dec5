"""The evaluate stage: held-out prompts at fixed seeds (the same noise at every evaluation), split
over processes, scored by the trained reward; grids written by rank 0, and at the end the held-out
images before and after training beside their captions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlfuse.dynamics import Sampler
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
    """metrics: eval_reward_mean, eval_reward_std, eval_reward_<criterion>; images (n, 3, H, W) and
    prompts of every process, in image order (filled on every process)."""

    metrics: dict[str, float]
    images: torch.Tensor
    prompts: list[str]


def nanmean(values: list[float]) -> float:
    """Mean over the values that are not NaN (NaN if none are)."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(network: torch.nn.Module, family: ModelFamily, sampler: Sampler, reward: Reward,
             settings: EvalSettings, latent_shape: tuple[int, ...], rank: int, world: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> Evaluation:
    """Sample and score this process's share (images rank, rank + world, ...) and gather everything."""
    from accelerate.utils import gather_object

    indices = list(range(rank, settings.num_images, world))
    prompts = [settings.prompts[i % len(settings.prompts)] for i in indices]
    network.eval()
    images, rewards, details = torch.zeros(0, 3, 1, 1), [], {}
    if prompts:
        sampled = rollout(network, family, sampler, prompts, [seed_for(settings.seed, 0, i) for i in indices],
                          [seed_for(settings.seed, 1, i) for i in indices], latent_shape, settings.num_steps,
                          settings.guidance_scale, device, autocast)
        images = sampled.images
        scored = score(reward, images, prompts)
        rewards = scored.scores.float().cpu().tolist()
        details = {name: [float(v) for v in values[:len(prompts)]] for name, values in scored.details.items()}
    all_rewards = gather_object(rewards)
    all_details = {name: gather_object(values) for name, values in details.items()}
    all_images, all_indices = gather_object(list(images.cpu())), gather_object(indices)
    order = np.argsort(all_indices, kind="stable")
    metrics = {"eval_reward_mean": float(np.mean(all_rewards)), "eval_reward_std": float(np.std(all_rewards)),
               **{f"eval_reward_{name}": nanmean(values) for name, values in all_details.items()}}
    return Evaluation(metrics, torch.stack([all_images[i] for i in order]),
                      [settings.prompts[all_indices[i] % len(settings.prompts)] for i in order])


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
                     epoch: int, final: bool) -> dict[str, float]:
    """Evaluate on every process; rank 0 writes the grids (and logs the grid to TensorBoard).
    Returns the evaluation's metrics."""
    result = evaluate(network, family, sampler, reward, settings, latent_shape, accelerator.process_index,
                      accelerator.num_processes, accelerator.device, accelerator.autocast)
    if accelerator.is_main_process:
        logbook.eval_grid(save_eval_images(run_dir, result, epoch, final), epoch)
    return result.metrics
