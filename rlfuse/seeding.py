"""Randomness that follows (seed, epoch, sample id, purpose): the same draws whatever the process count."""

from __future__ import annotations

import numpy as np
import torch


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, purpose, ...): independent streams, no state."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generators(seeds: list[int]) -> list[torch.Generator]:
    """CPU generators: noise is drawn on the CPU and moved, so it is the same on every device."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """(B, *shape) standard normal x_T, one sample per seed, drawn on the CPU."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators(seeds)])


def draw_train_steps(steps: torch.Tensor, seeds: list[int], count: int) -> torch.Tensor:
    """(U, count) the steps trained on for U trajectories (or pairs): `count` distinct entries of
    steps (T',), in an order drawn from each one's seed."""
    return torch.stack([steps[torch.randperm(len(steps), generator=torch.Generator().manual_seed(seed))[:count]]
                        for seed in seeds])
