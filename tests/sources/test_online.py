"""The online source alone: the same samples whatever the process count, rewards and details per sample."""

from contextlib import nullcontext

import numpy as np
import torch

from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.rewards.multi import MultiReward
from rlfuse.rewards.jpeg import JpegReward
from rlfuse.seeding import seed_for
from rlfuse.sources.online import OnlineSettings, OnlineSource, batch_plan, sde_window

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


def test_a_fast_window_starts_anywhere_in_its_range_the_same_on_every_process():
    fast = settings(4, num_steps=10, window_size=3, window_range=(0, 5))
    starts = {sde_window(fast, epoch, batch)[0] for epoch in range(1, 30) for batch in range(2)}
    assert starts == {0, 1, 2}                                  # flow_grpo: randint(0, 5 - 3), both ends
    assert sde_window(fast, 4, 1) == sde_window(fast, 4, 1) and sde_window(fast, 4, 1)[1] == 3
    assert sde_window(settings(4), 1, 0) is None


def test_a_progressive_window_moves_one_step_every_n_epochs_and_rolls_back():
    mix = settings(4, num_steps=10, window_size=4, window_range=(0, 7), window_shift_every=2)
    assert [sde_window(mix, epoch, 0)[0] for epoch in range(1, 11)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]


def test_a_windowed_epoch_stores_and_scores_only_its_stochastic_steps():
    from rlfuse.policy import Policy

    family = StableDiffusion(build_tiny_pipeline(seed=0))
    sampler = family.sampler(1.0)
    source = OnlineSource(family.network, family, sampler, JpegReward(), PROMPTS, family.latent_shape(32),
                          settings(4, num_steps=6, window_size=2, window_range=(1, 5)), rank=0, world=1,
                          device=torch.device("cpu"), autocast=nullcontext)
    samples = source.epoch(1).samples
    start = sde_window(source.settings, 1, 1)[0]               # the last batch's window
    assert samples.latents.shape[1] == 2 and samples.log_probs.shape == (8, 2)
    assert (samples.log_probs != 0).all()                      # both stored steps are stochastic
    sampler.set_timesteps(6)
    assert torch.equal(samples.timesteps[4], sampler.scheduler.timesteps[start:start + 2])
    policy = Policy(family.network, family, sampler, 5.0)
    with torch.no_grad():
        rescored = torch.stack([policy.log_prob(samples, torch.full((8,), j)) for j in range(2)], dim=1)
    torch.testing.assert_close(rescored, samples.log_probs, atol=1e-5, rtol=0)
