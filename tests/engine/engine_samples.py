"""Samples for the stage tests: the tiny policy's own trajectories, rewarded by JPEG size."""

import torch

from rlfuse.rewards.jpeg import JpegReward
from rlfuse.rollout import rollout

NUM_STEPS = 4
PROMPTS = ["a cat", "a cat", "a dog", "a dog", "a fox", "a fox", "an owl", "an owl"]


def draw_samples(family, prompts=PROMPTS, seed: int = 0):
    """Trajectories of prompts (pairs of rows share x_T), rewarded by JPEG size, sample ids 0..B-1."""
    noise_seeds = [seed * 1000 + i - i % 2 for i in range(len(prompts))]
    sampled = rollout(family.network, family, family.sampler(1.0), prompts, noise_seeds,
                      [seed * 1000 + 500 + i for i in range(len(prompts))], family.latent_shape(32), NUM_STEPS, 5.0,
                      torch.device("cpu"))
    rewards = JpegReward()(sampled.images, prompts).scores.float()
    return sampled.trajectories(prompts, torch.arange(len(prompts)), rewards)
