"""The online source: each epoch, roll out the current policy on drawn prompts, decode and reward."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rlfuse.dynamics import Sampler
from rlfuse.families import ModelFamily
from rlfuse.prompts import draw_prompts
from rlfuse.rewards.base import Reward, score
from rlfuse.rollout import rollout
from rlfuse.seeding import seed_for
from rlfuse.sources import EpochBatch
from rlfuse.trajectories import Trajectories


@dataclass(frozen=True)
class OnlineSettings:
    """seed: the run's seed; batches_per_epoch, batch_size: sampling batches per process and their size;
    images_per_prompt: K images of each drawn prompt in a batch; same_noise_per_prompt: the K share x_T;
    num_steps, guidance_scale: the sampler's; grid_images: images kept for the log's grid.
    window_size: 0, or the number of consecutive stochastic steps (the others deterministic), the only
    steps stored and trained; window_range: (first, last + 1) steps the window may cover;
    window_shift_every: 0 draws the window's start anew for every sampling batch (Flow-GRPO-Fast),
    N > 0 moves it one step later every N epochs, back to the first after the last (MixGRPO)."""

    seed: int
    batches_per_epoch: int
    batch_size: int
    images_per_prompt: int
    same_noise_per_prompt: bool
    num_steps: int
    guidance_scale: float
    grid_images: int
    window_size: int = 0
    window_range: tuple[int, int] = (0, 0)
    window_shift_every: int = 0
    clean: bool = False

    @property
    def pairs(self) -> bool:
        """Rows 2i, 2i+1 are two images of one prompt from one initial noise."""
        return self.same_noise_per_prompt and self.images_per_prompt % 2 == 0


def batch_plan(settings: OnlineSettings, prompts: list[str], epoch: int, batch: int, rank: int, world: int,
               prompt_rng: np.random.Generator) -> tuple[list[str], list[int], list[int], list[int]]:
    """(prompts, sample ids, noise seeds, step seeds) of this process's share of sampling batch `batch`.

    Prompts and seeds belong to a sample's place in the batch of all processes (rank r takes the r-th
    slice of each global batch), so a run draws the same samples whatever its number of processes at
    the same global batch size. prompt_rng draws the epoch's prompts (the same stream on every rank).
    """
    k, size = settings.images_per_prompt, settings.batch_size
    global_batch = world * size
    global_prompts = [p for p in draw_prompts(prompts, global_batch // k, prompt_rng) for _ in range(k)]
    ids = [batch * global_batch + rank * size + i for i in range(size)]
    chosen = [global_prompts[i - batch * global_batch] for i in ids]
    noise_group = k if settings.same_noise_per_prompt else 1
    noise_seeds = [seed_for(settings.seed, epoch, 1, i - i % noise_group) for i in ids]
    step_seeds = [seed_for(settings.seed, epoch, 2, i) for i in ids]
    return chosen, ids, noise_seeds, step_seeds


def sde_window(settings: OnlineSettings, epoch: int, batch: int) -> tuple[int, int] | None:
    """(start, size) of the stochastic steps of sampling batch `batch` of `epoch`, the same on every
    process; None without a window. Flow-GRPO-Fast draws the start uniformly in [first, last + 1 -
    size] for every sampling call (flow_grpo scripts/train_sd3_fast.py); MixGRPO's progressive
    window moves one step every window_shift_every iterations and rolls back (Tencent-Hunyuan/MixGRPO
    fastvideo/utils/grpo_states.py)."""
    if settings.window_size == 0:
        return None
    first, end = settings.window_range
    starts = end - settings.window_size - first + 1                     # how many starts fit
    if settings.window_shift_every > 0:
        return first + ((epoch - 1) // settings.window_shift_every) % starts, settings.window_size
    rng = np.random.default_rng(seed_for(settings.seed, epoch, 6, batch))
    return first + int(rng.integers(starts)), settings.window_size


# A window of no stochastic steps: the whole chain is the deterministic ODE (clean sampling).
NO_STOCHASTIC_STEPS = (0, 0)


class OnlineSource:
    """Samples of the current policy, rewarded. network: the trained denoiser as sampling calls it
    (unwrapped); autocast: the run's mixed-precision context; sampling: the context rollouts run in
    (a likelihood-free algorithm's old policy), or None."""

    def __init__(self, network: torch.nn.Module, family: ModelFamily, sampler: Sampler, reward: Reward,
                 prompts: list[str], latent_shape: tuple[int, ...], settings: OnlineSettings, rank: int, world: int,
                 device: torch.device, autocast: Callable[[], AbstractContextManager], progress: bool = False,
                 sampling: Callable[[], AbstractContextManager] | None = None):
        self.network, self.family, self.sampler, self.reward = network, family, sampler, reward
        self.prompts, self.latent_shape, self.settings = prompts, latent_shape, settings
        self.rank, self.world, self.device, self.autocast, self.progress = rank, world, device, autocast, progress
        self.sampling = sampling or nullcontext
        self.pairs = settings.pairs

    def epoch(self, epoch: int) -> EpochBatch:
        """The epoch's chains (every step, or the window of stochastic steps) with their log-probs at
        sampling time, or only their clean samples (settings.clean), and the rewards."""
        settings = self.settings
        self.network.eval()
        prompt_rng = np.random.default_rng(seed_for(settings.seed, epoch, 0))
        batches, images, details = [], [], {}
        for b in tqdm(range(settings.batches_per_epoch), desc=f"epoch {epoch} sample", disable=not self.progress,
                      leave=False):
            prompts, ids, noise_seeds, step_seeds = batch_plan(settings, self.prompts, epoch, b, self.rank,
                                                               self.world, prompt_rng)
            window = NO_STOCHASTIC_STEPS if settings.clean else sde_window(settings, epoch, b)
            with self.sampling():
                sampled = rollout(self.network, self.family, self.sampler, prompts, noise_seeds, step_seeds,
                                  self.latent_shape, settings.num_steps, settings.guidance_scale, self.device,
                                  self.autocast, window)
            scored = score(self.reward, sampled.images, prompts)
            rewards = scored.scores.to(self.device).float()                                       # (B,)
            terms = torch.stack([v.float() for v in scored.terms.values()], dim=1).to(self.device) \
                if scored.terms else None                                                          # (B, R)
            for name, values in scored.details.items():
                details.setdefault(name, []).extend(float(v) for v in values[:len(prompts)])
            ids_tensor = torch.tensor(ids, device=self.device)
            batches.append(sampled.clean_trajectories(prompts, ids_tensor, rewards, terms) if settings.clean
                           else sampled.trajectories(prompts, ids_tensor, rewards, terms, window))
            if sum(len(i) for i in images) < settings.grid_images:  # the first images of the epoch, for the log
                images.append(sampled.images[:settings.grid_images].cpu())
        grid = torch.cat(images)[:settings.grid_images] if images else torch.zeros(0, 3, 1, 1)
        return EpochBatch(Trajectories.cat(batches), grid, details)
