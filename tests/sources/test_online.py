"""The online source alone: the same samples whatever the process count, rewards and details per sample."""

from contextlib import nullcontext

import numpy as np
import torch

from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.rewards.multi import MultiReward
from rlfuse.rewards.jpeg import JpegReward
from rlfuse.seeding import seed_for
from rlfuse.sources.online import OnlineSettings, OnlineSource, batch_plan

PROMPTS = ["a cat", "a dog", "a fox", "an owl", "a bee"]


def settings(batch_size: int, **changes) -> OnlineSettings:
    values = dict(seed=3, batches_per_epoch=2, batch_size=batch_size, images_per_prompt=2,
                  same_noise_per_prompt=True, num_steps=3, guidance_scale=5.0, grid_images=4)
    return OnlineSettings(**{**values, **changes})


def plan(batch_size: int, rank: int, world: int, epoch: int = 1):
    """Every batch of an epoch for one process: {sample id: (prompt, noise seed, step seed)}."""
    rng = np.random.default_rng(seed_for(3, epoch, 0))
    out = {}
    for b in range(2):
        prompts, ids, noise, steps = batch_plan(settings(batch_size), PROMPTS, epoch, b, rank, world, rng)
        out.update({i: (p, n, s) for i, p, n, s in zip(ids, prompts, noise, steps)})
    return out


def test_one_process_of_8_and_two_of_4_draw_the_same_samples():
    one = plan(8, rank=0, world=1)
    two = {**plan(4, rank=0, world=2), **plan(4, rank=1, world=2)}
    assert one == two and sorted(one) == list(range(16))
    assert set(plan(4, rank=0, world=2)).isdisjoint(plan(4, rank=1, world=2))


def test_the_images_of_a_prompt_share_their_initial_noise_and_not_their_sampler_noise():
    samples = plan(8, rank=0, world=1)
    for i in range(0, 16, 2):
        assert samples[i][0] == samples[i + 1][0]                      # one prompt ...
        assert samples[i][1] == samples[i + 1][1]                      # ... one x_T ...
        assert samples[i][2] != samples[i + 1][2]                      # ... its own sampler noise
    assert samples[0][1] != samples[2][1]
    assert plan(8, rank=0, world=1, epoch=2) != samples                 # every epoch draws anew


def test_an_epoch_of_the_tiny_model_carries_rewards_terms_and_details():
    family = StableDiffusion(build_tiny_pipeline(seed=0))
    reward = MultiReward({"jpeg": {"weight": 2.0, "fn": JpegReward()}})
    source = OnlineSource(family.network, family, family.sampler(1.0), reward, PROMPTS, family.latent_shape(32),
                          settings(4), rank=0, world=1, device=torch.device("cpu"), autocast=nullcontext)
    assert source.pairs  # two images of a prompt from one noise
    samples, images, details = source.epoch(1)
    assert len(samples) == 8 and samples.sample_ids.tolist() == list(range(8))
    assert samples.latents.shape == (8, 3, 4, 16, 16) and samples.log_probs.shape == (8, 3)
    assert torch.equal(samples.latents[0, 0], samples.latents[1, 0])
    assert samples.reward_terms.shape == (8, 1)
    torch.testing.assert_close(samples.rewards, 2.0 * samples.reward_terms[:, 0])
    assert details["jpeg"] == samples.reward_terms[:, 0].tolist()
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    again = source.epoch(1)
    assert torch.equal(again.samples.next_latents, samples.next_latents)  # seeded by (seed, epoch, sample id)
