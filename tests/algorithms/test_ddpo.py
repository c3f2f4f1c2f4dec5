"""DDPO's PPO and score-function losses and per-prompt statistics, on numbers worked by hand."""

import math

import pytest
import torch

from rlfuse.advantages import PerPromptStatTracker, normalize_batch
from rlfuse.algorithms.ddpo import DDPO, ppo_clipped_loss, score_function_loss


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage_with_zero_kl_and_clipfrac():
    log_probs = torch.tensor([-1.0, -2.0, -3.0])
    advantages = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = ppo_clipped_loss(log_probs, log_probs.clone(), advantages, clip_range=0.1)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0 and stats["ratio"].item() == 1.0


def test_ppo_loss_clips_on_the_pessimistic_side_by_hand():
    # ratio = e^0.5 = 1.6487 for sample 0 (A = +1): clipped to 1.2 -> -1.2 is larger than -1.6487.
    # ratio = e^-0.5 = 0.6065 for sample 1 (A = +1): unclipped -0.6065 is larger than -0.8 -> kept.
    # ratio = e^0.5 for sample 2 (A = -1): unclipped 1.6487 is larger than 1.2 -> kept.
    old = torch.zeros(3)
    new = torch.tensor([0.5, -0.5, 0.5], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = ppo_clipped_loss(new, old, advantages, clip_range=0.2)
    expected = (-1.2 + -math.exp(-0.5) + math.exp(0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1.0)  # all three ratios are outside [0.8, 1.2]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 0.25)
    loss.backward()
    # The clipped term has no gradient; the two kept terms have d/dlogp (-A r) = -A r.
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -math.exp(-0.5) / 3, math.exp(0.5) / 3]))


def test_ppo_gradient_raises_log_prob_of_positive_advantage():
    log_probs = torch.zeros(2, requires_grad=True)
    loss, _ = ppo_clipped_loss(log_probs, torch.zeros(2), torch.tensor([2.0, -2.0]), clip_range=1e-4)
    loss.backward()
    assert log_probs.grad[0] < 0 < log_probs.grad[1]  # descent raises sample 0, lowers sample 1


def test_ddpo_clips_advantages(lora_policy, sample):
    pipeline, policy = lora_policy
    batch = sample(pipeline, ["a cat", "a dog"]).with_advantages(torch.tensor([10.0, -3.0]))
    objective = DDPO(adv_clip_max=1.0, advantages="batch")
    loss, stats = objective.loss(policy, batch, torch.tensor([1, 2]))
    # The policy is the one that sampled: ratio 1, so the loss is -mean(clip(A)) = -(1 - 1) / 2.
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and stats["ratio"].item() == pytest.approx(1.0, abs=1e-6)


def test_score_function_loss_and_gradient_by_hand():
    log_probs = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, stats = score_function_loss(log_probs, log_probs.detach().clone(), torch.tensor([2.0, -1.0]))
    assert loss.item() == pytest.approx(-(2.0 * -1.0 + -1.0 * -2.0) / 2)  # -mean(A log p) = 0
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([-1.0, 0.5]))  # -A / B: descent raises A > 0
    assert stats["ratio"].item() == 1.0


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="estimator='sf'"):
        DDPO(estimator="sf")


def test_stat_tracker_uses_batch_statistics_until_min_count_then_its_own():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    # Epoch 1: "a" has 2 rewards (< 3): batch stats over [1, 3, 10, 20] -> mean 8.5, std sqrt(57.25).
    adv = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 20.0]))
    batch_std = math.sqrt(((1 - 8.5) ** 2 + (3 - 8.5) ** 2 + (10 - 8.5) ** 2 + (20 - 8.5) ** 2) / 4)
    assert adv[0].item() == pytest.approx((1 - 8.5) / (batch_std + 1e-6), rel=1e-5)
    # Epoch 2: "a" gets 5 -> buffer [1, 3, 5] (3 >= min_count): mean 3, std sqrt(8/3).
    adv = tracker.update(["a", "b"], torch.tensor([5.0, 0.0]))
    assert adv[0].item() == pytest.approx((5 - 3) / (math.sqrt(8 / 3) + 1e-6), rel=1e-5)
    # "b": buffer [10, 20, 0] -> mean 10, std sqrt(200/3).
    assert adv[1].item() == pytest.approx((0 - 10) / (math.sqrt(200 / 3) + 1e-6), rel=1e-5)
    # Buffers keep only the last buffer_size rewards: "a" gets 7, 9 -> [3, 5, 7, 9].
    tracker.update(["a", "a"], torch.tensor([7.0, 9.0]))
    assert list(tracker.buffers["a"]) == [3.0, 5.0, 7.0, 9.0]


def test_stat_tracker_state_round_trips():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["a", "b", "a"], torch.tensor([1.0, 2.0, 3.0]))
    restored = PerPromptStatTracker(buffer_size=1, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    rewards = torch.tensor([4.0, 5.0])
    torch.testing.assert_close(restored.update(["a", "b"], rewards), tracker.update(["a", "b"], rewards))


def test_batch_normalisation_by_hand():
    adv = normalize_batch(torch.tensor([1.0, 2.0, 3.0]))
    std = math.sqrt(2 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1 / std, 0.0, 1 / std]), rtol=1e-5, atol=1e-5)
