"""The one rollout: seeded x_T and sampler noise, log-probs that training re-scores, decoded images."""

import torch

from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.policy import Policy
from rlfuse.rollout import rollout
from rlfuse.seeding import initial_noise

CPU = torch.device("cpu")


def test_seeds_fix_the_chain_and_training_rescores_its_log_probs():
    family = StableDiffusion(build_tiny_pipeline(seed=0))
    sampler = family.sampler(1.0)
    prompts = ["a cat", "a dog", "a cat"]
    args = (family.network, family, sampler, prompts, [1, 2, 1], [10, 11, 12], family.latent_shape(32), 4, 5.0, CPU)
    first, second = rollout(*args), rollout(*args)
    assert torch.equal(first.chains, second.chains) and torch.equal(first.log_probs, second.log_probs)
    assert first.chains.shape == (3, 5, 4, 16, 16) and first.log_probs.shape == (3, 4)
    assert first.images.shape == (3, 3, 32, 32) and 0 <= first.images.min() and first.images.max() <= 1
    # x_T is the seed's noise (times the scheduler's initial sigma, 1 for DDIM); samples 0 and 2 share it
    torch.testing.assert_close(first.chains[:, 0], initial_noise((4, 16, 16), [1, 2, 1]))
    assert not torch.equal(first.chains[0, -1], first.chains[2, -1])   # other sampler noise
    # identical prompts share one encoding; the empty prompt is the negative
    torch.testing.assert_close(first.conditioning["prompt_embeds"][0], first.conditioning["prompt_embeds"][2])
    samples = first.trajectories(prompts, torch.arange(3), torch.zeros(3))
    policy = Policy(family.network, family, sampler, 5.0)
    with torch.no_grad():
        rescored = torch.stack([policy.log_prob(samples, torch.full((3,), j)) for j in range(4)], dim=1)
    torch.testing.assert_close(rescored, first.log_probs, atol=1e-5, rtol=0)
    assert samples.reward_terms.shape == (3, 0)


def test_a_resolution_the_vae_cannot_make_is_refused():
    import pytest

    from rlfuse.errors import UserError

    family = StableDiffusion(build_tiny_pipeline(seed=0))
    assert family.latent_shape(36) == (4, 18, 18)
    with pytest.raises(UserError, match="model.resolution=33: must be a multiple of 2"):
        family.latent_shape(33)


def test_outside_a_window_the_steps_are_deterministic_with_no_log_prob():
    family = StableDiffusion(build_tiny_pipeline(seed=0))
    sampler = family.sampler(1.0)
    args = (family.network, family, sampler, ["a cat"], [1], [2], family.latent_shape(32), 5, 5.0, CPU)
    windowed = rollout(*args, window=(1, 2))
    assert (windowed.log_probs[0, 1:3] != 0).all()
    assert (windowed.log_probs[0, [0, 3, 4]] == 0).all()
    # the steps before the window are those of a fully deterministic chain from the same x_T
    ode = family.sampler(1e-12)
    deterministic = rollout(family.network, family, ode, ["a cat"], [1], [2], family.latent_shape(32), 5, 5.0, CPU)
    torch.testing.assert_close(windowed.chains[:, 1], deterministic.chains[:, 1], atol=1e-5, rtol=0)
    stored = windowed.trajectories(["a cat"], torch.arange(1), torch.zeros(1), window=(1, 2))
    assert torch.equal(stored.latents[0], windowed.chains[0, 1:3]) and torch.equal(stored.next_latents[0],
                                                                                     windowed.chains[0, 2:4])
