"""Shared pieces for the algorithm tests: a LoRA policy on the tiny pipeline and trajectories it sampled."""

import pytest
import torch

from rlfuse.model import ReferencePolicy, add_lora, build_tiny_pipeline
from rlfuse.sampling import Policy, encode_prompts, sample_trajectories
from rlfuse.trajectories import Trajectories

NUM_STEPS = 4


def sampled_trajectories(pipeline, prompts: list[str], seed: int = 0, shared_noise_pairs: bool = True) -> Trajectories:
    """Trajectories of `prompts` under the pipeline's current UNet; with shared_noise_pairs, rows 2i and
    2i+1 start from the same noise (D3PO pairs)."""
    device = torch.device("cpu")
    prompt_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, prompts, device)
    negative_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [""], device).expand(len(prompts), -1, -1)
    noise = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    if shared_noise_pairs:
        noise[1::2] = noise[0::2]
    generators = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(prompts))]
    latents, log_probs, timesteps = sample_trajectories(
        pipeline.unet, pipeline.scheduler, prompt_embeds, negative_embeds, noise, NUM_STEPS, 5.0, 1.0, generators)
    return Trajectories(
        prompt_embeds=prompt_embeds.clone(), negative_embeds=negative_embeds.clone(),
        latents=latents[:, :-1].clone(), next_latents=latents[:, 1:].clone(),
        timesteps=timesteps.expand(len(prompts), -1).clone(), log_probs=log_probs.clone(),
        rewards=torch.zeros(len(prompts)), advantages=torch.zeros(len(prompts)), prompts=prompts,
        sample_ids=torch.arange(len(prompts)),
    )


@pytest.fixture
def lora_policy():
    """(pipeline, policy): the tiny pipeline with fresh LoRA adapters; the reference is adapters off."""
    pipeline = build_tiny_pipeline(seed=0)
    pipeline.text_encoder.requires_grad_(False)
    pipeline.vae.requires_grad_(False)
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    reference = ReferencePolicy(pipeline.unet, "lora", torch.device("cpu"))
    return pipeline, Policy(pipeline.unet, pipeline.scheduler, 5.0, 1.0, reference)


@pytest.fixture
def sample():
    """sampled_trajectories, for tests that need trajectories of their own policy."""
    return sampled_trajectories
