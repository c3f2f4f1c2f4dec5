"""DPOK: the per-step KL to the reference, the loss by hand, and the learned value baseline."""

import math

import pytest
import torch

from rlfuse.algorithms.dpok import DPOK, dpok_loss, gaussian_kl, noise_kl
from rlfuse.dynamics.ddim import Transition


def test_gaussian_kl_by_hand():
    std = torch.tensor(0.5)
    policy = Transition(torch.tensor([[1.0, 2.0]]), std)
    reference = Transition(torch.tensor([[0.0, 2.0]]), std)
    # mean over 2 dims of (1^2 / (2 * 0.25), 0) = (2 + 0) / 2
    torch.testing.assert_close(gaussian_kl(policy, reference), torch.tensor([1.0]))
    deterministic = Transition(torch.tensor([[1.0]]), torch.tensor(0.0))
    assert gaussian_kl(deterministic, Transition(torch.tensor([[0.0]]), torch.tensor(0.0))).item() == 0.0


def test_loss_by_hand_with_the_clamp_of_dpok():
    log_probs = torch.tensor([0.0, 0.5], requires_grad=True)
    kl = torch.tensor([0.2, 0.4])
    loss, stats = dpok_loss(log_probs, torch.zeros(2), torch.tensor([1.0, 1.0]), kl,
                            reward_weight=10.0, kl_weight=0.5, clip_range=0.1)
    # ratios 1 and e^0.5 -> clamped to 1.1: -10 * (1 + 1.1) / 2 + 0.5 * 0.3
    assert loss.item() == pytest.approx(-10 * 2.1 / 2 + 0.5 * 0.3, rel=1e-6)
    assert stats["clipfrac"].item() == 0.5 and stats["kl"].item() == pytest.approx(0.3)
    loss.backward()
    assert log_probs.grad[1] == 0 and log_probs.grad[0] == pytest.approx(-10 * 1 / 2)


def test_kl_is_zero_at_initialisation_and_positive_after_an_update(lora_policy, sample):
    pipeline, policy = lora_policy
    objective = DPOK(reward_weight=100.0, kl_weight=0.01, clip_range=0.2, baseline="batch")
    batch = sample(pipeline, ["a cat", "a dog", "a cow", "a hen"], shared_noise_pairs=False)
    advantages, _ = objective.advantages(batch.prompts, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    batch = batch.with_advantages(advantages)
    steps = torch.tensor([0, 1, 2, 3])
    loss, stats = objective.loss(policy, batch, steps)
    assert stats["kl"].item() == 0.0  # LoRA starts equal to the base model
    optimizer = torch.optim.SGD([p for p in pipeline.unet.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    optimizer.step()
    _, stats = objective.loss(policy, batch, steps)
    assert stats["kl"].item() > 0
    assert math.isfinite(stats["kl"].item())


def test_value_baseline_learns_and_survives_a_state_round_trip(lora_policy, sample):
    pipeline, policy = lora_policy
    objective = DPOK(baseline="value", value_learning_rate=1e-2)
    batch = sample(pipeline, ["a cat", "a dog"], shared_noise_pairs=False)
    rewards, _ = objective.advantages(batch.prompts, torch.tensor([3.0, -1.0]))
    batch = batch.with_advantages(rewards)  # baseline=value: the raw rewards
    torch.testing.assert_close(rewards, torch.tensor([3.0, -1.0]))
    steps = torch.tensor([2, 2])
    losses = [objective.loss(policy, batch, steps)[1]["value_loss"].item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses  # V(x_t, t, c) fits the rewards it sees
    restored = DPOK(baseline="value", value_learning_rate=1e-2)
    restored.load_state_dict(objective.state_dict())
    next_original = objective.loss(policy, batch, steps)[1]["value_loss"]
    next_restored = restored.loss(policy, batch, steps)[1]["value_loss"]
    assert next_restored.item() == pytest.approx(next_original.item(), rel=1e-6)


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline='critic'"):
        DPOK(baseline="critic")


def test_a_ratio_that_would_overflow_gives_zero_not_nan_gradient():
    log_probs = torch.tensor([0.0, 200.0], requires_grad=True)  # exp(200) overflows float32
    loss, _ = dpok_loss(log_probs, torch.zeros(2), torch.tensor([1.0, 1.0]), torch.zeros(2),
                        reward_weight=10.0, kl_weight=0.5, clip_range=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-10 * 2.1 / 2, rel=1e-6)
    assert torch.isfinite(log_probs.grad).all() and log_probs.grad[1] == 0


def test_noise_kl_by_hand():
    prediction = torch.tensor([[1.0, 3.0], [0.0, 0.0]], requires_grad=True).reshape(2, 2, 1, 1)
    reference = torch.tensor([[0.0, 1.0], [0.0, 2.0]]).reshape(2, 2, 1, 1)
    # rows: (1 + 4) / 2 and (0 + 4) / 2
    torch.testing.assert_close(noise_kl(prediction, reference), torch.tensor([2.5, 2.0]))


def trained_away_from_reference(pipeline, policy, batch, steps):
    """One SGD step of the LoRA adapters so that the policy differs from its reference."""
    objective = DPOK(baseline="batch", clip_range=0.2)
    loss, _ = objective.loss(policy, batch, steps)
    loss.backward()
    with torch.no_grad():
        for parameter in (p for p in pipeline.unet.parameters() if p.requires_grad):
            parameter -= 1e-2 * parameter.grad
            parameter.grad = None


def test_the_two_kl_forms_are_the_noise_difference_and_the_gaussian_kl(lora_policy, sample):
    """kl=noise is the mean squared difference of the guided predictions (the reference: adapters off);
    kl=exact the Gaussian KL of the two steps, r_t = c_t^2 / (2 std_t^2) times the noise form."""
    pipeline, policy = lora_policy
    batch = sample(pipeline, ["a cat", "a dog"], shared_noise_pairs=False).with_advantages(torch.tensor([1.0, -1.0]))
    steps = torch.tensor([0, 2])
    trained_away_from_reference(pipeline, policy, batch, steps)
    rows = torch.arange(2)
    latents, timesteps = batch.latents[rows, steps], batch.timesteps[rows, steps]
    with torch.no_grad():
        ours = policy.family.predict(pipeline.unet, latents, timesteps, batch.conditioning, 5.0)
        with policy.reference() as base:
            theirs = policy.family.predict(base, latents, timesteps, batch.conditioning, 5.0)
    noise = ((ours - theirs) ** 2).mean(dim=(1, 2, 3))                           # (2,) by hand
    assert (noise > 0).all()
    noise_stat = DPOK(kl="noise", baseline="batch").loss(policy, batch, steps)[1]["kl"]
    torch.testing.assert_close(noise_stat, noise.mean(), rtol=1e-4, atol=0)
    # exact: mean (mu - mu_ref)^2 / (2 std^2), and for epsilon prediction r_t times the noise form
    scheduler = policy.sampler.scheduler
    step_ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[timesteps]
    previous = timesteps - step_ratio
    alpha_prev = torch.where(previous >= 0, scheduler.alphas_cumprod[previous.clamp(min=0)],
                             scheduler.final_alpha_cumprod)
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)        # eta 1
    c = (1 - alpha_prev - variance).sqrt() - (alpha_prev * (1 - alpha) / alpha).sqrt()
    exact = c**2 / (2 * variance) * noise
    exact_stat = DPOK(kl="exact", baseline="batch").loss(policy, batch, steps)[1]["kl"]
    torch.testing.assert_close(exact_stat, exact.mean(), rtol=1e-3, atol=0)
    transition, reference = policy.transition(batch, steps), policy.transition(batch, steps, reference=True)
    torch.testing.assert_close(gaussian_kl(transition, reference).detach(), exact, rtol=1e-3, atol=0)


def test_unknown_kl_form_is_refused():
    with pytest.raises(ValueError, match="kl='squared'"):
        DPOK(kl="squared")
