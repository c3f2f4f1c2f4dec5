"""The replay source: a labelled feedback dataset's sampled chains, replayed as D3PO pairs (feedback=human).

Each epoch takes every labelled pair (group g, winner w, loser l) from `preference_pairs`, with
repeats when several votes agree, and makes rows 2i (the winner's chain) and 2i + 1 (the loser's)
with rewards 1 and 0, so that D3PO's pair_preferences gives +1 and -1. Both chains start from the
group's shared initial noise, as D3PO's pairs do. The dataset format is in rlfuse/feedback.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlfuse.errors import UserError
from rlfuse.families import ModelFamily
from rlfuse.feedback import TRAJECTORIES, load_trajectories
from rlfuse.seeding import seed_for
from rlfuse.sources import EpochBatch
from rlfuse.trajectories import Conditioning, Trajectories


@dataclass
class ReplaySource:
    """The labelled pairs of a feedback dataset, as D3PO training batches (see the module docstring).

    labelled_pairs: (group, winner k, loser k), repeated by their net votes; latents (N, T+1, C, h, w),
    log_probs (N, T), timesteps (T,): the stored chains, row g * K + k, on the training device;
    conditioning: one row per group. seed, rank, world: the run's; grid_images: images kept for the log.
    """

    pairs = True  # the source's capability: winner and loser chains of one prompt from one initial noise

    labelled_pairs: list[tuple[int, int, int]]
    images_per_prompt: int
    prompts: list[str]
    image_files: list[list[Path]]
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning
    seed: int
    rank: int = 0
    world: int = 1
    grid_images: int = 16

    def epoch(self, epoch: int) -> EpochBatch:
        """This process's share of every pair, in an order shuffled per epoch, and the first
        grid_images of its images as they were labelled.

        Returns Trajectories of 2P rows: 2i the winner, 2i + 1 the loser (rewards 1 and 0). Each
        process takes an equal, contiguous slice (pairs beyond a multiple of `world` wait for
        another epoch); sample ids are places in the shuffled list, so runs repeat exactly.
        """
        rank = self.rank
        shuffle = torch.Generator().manual_seed(seed_for(self.seed, epoch, 5))
        order = torch.randperm(len(self.labelled_pairs), generator=shuffle)
        share = len(order) // self.world
        chosen = [self.labelled_pairs[p] for p in order[rank * share:(rank + 1) * share].tolist()]
        device, k_images = self.latents.device, self.images_per_prompt
        rows = torch.tensor([[g * k_images + w, g * k_images + loser] for g, w, loser in chosen], device=device).reshape(-1)
        groups = torch.tensor([g for g, _, _ in chosen], device=device).repeat_interleave(2)   # (2P,)
        chains = self.latents[rows]                                                          # (2P, T+1, C, h, w)
        count = len(rows)
        rewards = torch.tensor([1.0, 0.0], device=device).repeat(len(chosen))               # winner, loser
        ids = torch.tensor([[2 * (rank * share + i), 2 * (rank * share + i) + 1] for i in range(len(chosen))],
                           device=device).reshape(-1)
        batch = Trajectories(
            conditioning=self.conditioning.select(groups), latents=chains[:, :-1], next_latents=chains[:, 1:],
            timesteps=self.timesteps.expand(count, -1), log_probs=self.log_probs[rows], rewards=rewards,
            reward_terms=rewards.new_zeros(count, 0), advantages=torch.zeros_like(rewards),
            prompts=[self.prompts[g] for g in groups.tolist()], sample_ids=ids,
        )
        return EpochBatch(batch, self.images(rows[:self.grid_images].tolist()), {})

    def images(self, rows: list[int]) -> torch.Tensor:
        """(n, 3, H, W) in [0, 1]: the PNGs of the given rows, as the annotators saw them."""
        from PIL import Image

        k_images = self.images_per_prompt
        pixels = [np.asarray(Image.open(self.image_files[r // k_images][r % k_images]).convert("RGB")) for r in rows]
        if not pixels:
            return torch.zeros(0, 3, 1, 1)
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255


def load_replay(path: str, family: ModelFamily, device: torch.device, seed: int, rank: int = 0, world: int = 1,
                grid_images: int = 16) -> ReplaySource:
    """The dataset's pairs and chains on `device`, with each group's prompt encoded by the family's
    (frozen) text encoder. The dataset was checked by rlfuse.feedback.check_dataset."""
    from rlfuse.annotate.dataset import load_dataset
    from rlfuse.annotate.store import preference_pairs

    root = Path(path).expanduser()
    dataset = load_dataset(root, check_images=False)
    pairs = preference_pairs(root)
    if len(pairs) < world:
        raise UserError(f"feedback.path={path}: {len(pairs)} labelled pairs cannot be shared by {world} processes; "
                        f"label more, or train with fewer processes")
    chains = load_trajectories(root / TRAJECTORIES)
    prompts = [group.prompt for group in dataset.groups]
    chunk = 64  # prompts encoded at a time
    conditioning = Conditioning.cat([family.encode_prompts(prompts[i:i + chunk], device)
                                     for i in range(0, len(prompts), chunk)])
    return ReplaySource(
        labelled_pairs=pairs, images_per_prompt=dataset.images_per_prompt, prompts=prompts,
        image_files=[list(group.files) for group in dataset.groups],
        latents=chains["latents"].to(device), log_probs=chains["log_probs"].to(device),
        timesteps=chains["timesteps"].to(device), conditioning=conditioning,
        seed=seed, rank=rank, world=world, grid_images=grid_images,
    )
