"""GRPO: group-relative advantages, the clipped loss and its KL by hand; the KL is 0 at the start."""

import pytest
import torch

from rlfuse.algorithms.grpo import GRPO, group_advantages, grpo_loss, step_kl


def test_group_advantages_by_hand_with_the_groups_std_or_the_batchs():
    prompts = ["a", "a", "b", "b"]
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    own = group_advantages(prompts, rewards, global_std=False)
    # group a: mean 2, std 1 -> (-1, +1) / (1 + 1e-4); group b: all equal -> 0
    torch.testing.assert_close(own, torch.tensor([-1, 1, 0, 0]) / (1 + 1e-4))
    batch = group_advantages(prompts, rewards, global_std=True)
    std = rewards.std(unbiased=False)
    torch.testing.assert_close(batch, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (std + 1e-4))
    advantages, stats = GRPO(global_std=False).advantages(prompts, rewards)
    assert torch.equal(advantages, own) and stats["groups_without_signal"] == 0.5


def test_loss_by_hand_with_the_clip_and_the_kl():
    log_probs = torch.tensor([0.0, 0.5], requires_grad=True)
    loss, stats = grpo_loss(log_probs, torch.zeros(2), torch.tensor([1.0, -2.0]), torch.tensor([0.2, 0.4]),
                            clip_range=0.1, beta=0.5)
    # ratios 1 and e^0.5; sample 2 has A = -2: max(2 e^0.5, 2 * 1.1) = 2 e^0.5 (unclipped, the larger loss)
    expected = (-1.0 + 2 * torch.exp(torch.tensor(0.5)).item()) / 2 + 0.5 * 0.3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clipfrac"].item() == 0.5 and stats["kl"].item() == pytest.approx(0.3)
    loss.backward()
    # d/dlogp of the mean: sample 1 -A * r / 2 = -0.5; sample 2: 2 e^0.5 / 2
    torch.testing.assert_close(log_probs.grad, torch.tensor([-0.5, torch.exp(torch.tensor(0.5)).item()]))


def test_step_kl_is_the_gaussian_kl_of_equal_std_steps():
    mean = torch.tensor([[1.0, 2.0]])
    reference = torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(step_kl(mean, reference, torch.tensor(0.5)), torch.tensor([1.0]))
    assert step_kl(mean, reference, torch.tensor(0.0)).item() == 0.0
    p, q = torch.distributions.Normal(mean, 0.5), torch.distributions.Normal(reference, 0.5)
    torch.testing.assert_close(step_kl(mean, reference, torch.tensor(0.5)),
                               torch.distributions.kl_divergence(p, q).mean(dim=1))


def test_kl_to_the_reference_is_zero_at_the_start_and_positive_after_an_update(lora_policy, sample):
    pipeline, policy = lora_policy
    batch = sample(pipeline, ["a cat", "a cat", "a dog", "a dog"])
    algorithm = GRPO(clip_range=0.2, beta=1.0)
    batch = batch.with_advantages(algorithm.advantages(batch.prompts, torch.tensor([1.0, 0.0, 0.5, 0.2]))[0])
    step = torch.tensor([1, 1, 2, 2])
    loss, stats = algorithm.loss(policy, batch, step)
    assert stats["kl"].item() == 0.0 and stats["approx_kl"].item() < 1e-10
    optimizer = torch.optim.SGD([p for p in pipeline.unet.parameters() if p.requires_grad], lr=1.0)
    loss.backward()
    optimizer.step()
    _, after = algorithm.loss(policy, batch, step)
    assert after["kl"].item() > 0
    assert GRPO(beta=0).needs_reference is False and algorithm.needs_reference is True


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="clip_range=0"):
        GRPO(clip_range=0)
