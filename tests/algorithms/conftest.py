"""Shared pieces for the algorithm tests: a LoRA policy on the tiny pipeline and trajectories it sampled."""

import pytest
import torch

from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.lora import ReferencePolicy, add_lora
from rlfuse.policy import Policy
from rlfuse.rollout import rollout
from rlfuse.trajectories import Trajectories

NUM_STEPS = 4


def sampled_trajectories(pipeline, prompts: list[str], seed: int = 0, shared_noise_pairs: bool = True) -> Trajectories:
    """Trajectories of `prompts` under the pipeline's current UNet, sampled through the one rollout;
    with shared_noise_pairs, rows 2i and 2i+1 start from the same noise (D3PO pairs)."""
    family = StableDiffusion(pipeline)
    noise_seeds = [seed * 1000 + (i - i % 2 if shared_noise_pairs else i) for i in range(len(prompts))]
    step_seeds = [seed * 100 + i for i in range(len(prompts))]
    sampled = rollout(pipeline.unet, family, family.sampler(1.0), prompts, noise_seeds, step_seeds,
                      family.latent_shape(32), NUM_STEPS, 5.0, torch.device("cpu"))
    return sampled.trajectories(prompts, torch.arange(len(prompts)), torch.zeros(len(prompts)))


@pytest.fixture
def lora_policy():
    """(pipeline, policy): the tiny pipeline with fresh LoRA adapters; the reference is adapters off."""
    pipeline = build_tiny_pipeline(seed=0)
    pipeline.text_encoder.requires_grad_(False)
    pipeline.vae.requires_grad_(False)
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    reference = ReferencePolicy(pipeline.unet, "lora", torch.device("cpu"))
    family = StableDiffusion(pipeline)
    return pipeline, Policy(pipeline.unet, family, family.sampler(1.0), 5.0, reference)


@pytest.fixture
def sample():
    """sampled_trajectories, for tests that need trajectories of their own policy."""
    return sampled_trajectories
