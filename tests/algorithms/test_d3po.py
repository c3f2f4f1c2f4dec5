"""D3PO: the loss on hand-worked numbers, pairs from rewards, and a real gradient step on the tiny model."""

import math

import pytest
import torch

from rlfuse.advantages import pair_preferences
from rlfuse.algorithms.d3po import D3PO, d3po_loss

LOG_2 = math.log(2)


def test_loss_is_log_2_when_policy_equals_reference_and_on_ties():
    log_probs = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    loss, stats = d3po_loss(log_probs, log_probs.clone(), torch.tensor([1.0, -1.0, -1.0, 1.0]), beta=0.1, clip_range=0.1)
    assert loss.item() == pytest.approx(LOG_2)
    assert stats["reward_margin"].item() == 0.0 and stats["preference_accuracy"].item() == 0.0
    moved = torch.tensor([0.05, -0.05, 0.02, 0.01], requires_grad=True)
    loss, stats = d3po_loss(moved, torch.zeros(4), torch.zeros(4), beta=0.1, clip_range=0.1)  # two ties
    assert loss.item() == pytest.approx(LOG_2)
    loss.backward()
    assert torch.count_nonzero(moved.grad) == 0, "a tie gives no gradient"
    assert math.isnan(stats["preference_accuracy"].item())  # no decided pair to be accurate on


def test_loss_and_gradient_by_hand():
    # Pair (w, l) with log-ratios 0.05 and -0.03 (inside log(0.9), log(1.1)): margin m = 0.1 * 0.08 = 0.008.
    log_probs = torch.tensor([0.05, -0.03], requires_grad=True)
    loss, stats = d3po_loss(log_probs, torch.zeros(2), torch.tensor([1.0, -1.0]), beta=0.1, clip_range=0.1)
    margin = 0.1 * (0.05 + 0.03)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), rel=1e-6)
    assert stats["reward_margin"].item() == pytest.approx(margin) and stats["preference_accuracy"].item() == 1.0
    loss.backward()
    # d/dlog_w = -beta * sigmoid(-m); d/dlog_l = +beta * sigmoid(-m): descent raises w and lowers l.
    grad = 0.1 / (1 + math.exp(margin))
    torch.testing.assert_close(log_probs.grad, torch.tensor([-grad, grad]))


def test_a_gradient_step_raises_the_preferred_log_prob_and_lowers_the_other():
    log_probs = torch.zeros(2, requires_grad=True)  # a hand-built pair, both at the reference
    optimizer = torch.optim.SGD([log_probs], lr=0.5)
    loss, _ = d3po_loss(log_probs, torch.zeros(2), torch.tensor([-1.0, 1.0]), beta=0.1, clip_range=0.1)
    loss.backward()
    optimizer.step()
    assert log_probs[1].item() > 0 > log_probs[0].item()  # row 1 was preferred


def test_a_ratio_outside_the_clamp_gives_zero_gradient():
    # log-ratios 0.2 > log 1.1 and -0.2 < log 0.9: both clamped; the pair inside still learns.
    log_probs = torch.tensor([0.2, -0.2, 0.01, 0.0], requires_grad=True)
    loss, _ = d3po_loss(log_probs, torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, -1.0]), beta=0.1, clip_range=0.1)
    loss.backward()
    assert log_probs.grad[0] == 0 and log_probs.grad[1] == 0
    assert log_probs.grad[2] < 0 < log_probs.grad[3]


def test_a_policy_far_from_the_reference_gives_zero_not_nan_gradients():
    """exp(200) overflows float32: the clamp must not turn it into inf * 0 = NaN (seen in a full fine-tune)."""
    log_probs = torch.tensor([200.0, -200.0, 0.01, 0.0], requires_grad=True)
    loss, _ = d3po_loss(log_probs, torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, -1.0]), beta=0.1, clip_range=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[0] == 0 and log_probs.grad[1] == 0 and log_probs.grad[2] < 0


def test_pairs_take_the_better_reward_and_ties_give_zero():
    torch.testing.assert_close(pair_preferences(torch.tensor([1.0, 2.0, 5.0, 3.0, 4.0, 4.0])),
                               torch.tensor([-1.0, 1.0, 1.0, -1.0, 0.0, 0.0]))


def test_pareto_dominance_over_several_reward_terms():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0],    # first dominates (>= both, > one)
                            [1.0, 0.0], [0.0, 1.0],    # neither dominates: a tie
                            [2.0, 2.0], [2.0, 2.0]])   # equal: a tie
    torch.testing.assert_close(pair_preferences(rewards), torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))


def test_pairs_must_share_their_prompt():
    with pytest.raises(ValueError, match="share their prompt"):
        D3PO().advantages(["a", "b"], torch.tensor([1.0, 2.0]))


def test_step_on_the_tiny_model_starts_at_log_2_and_widens_the_margin(lora_policy, sample):
    """Through the real policy: LoRA starts equal to the reference, so the first loss is log 2; an
    optimizer step on the pair's loss raises beta (log r_w - log r_l) on the same transitions."""
    pipeline, policy = lora_policy
    objective = D3PO()
    batch = sample(pipeline, ["a cat", "a cat"])
    preferences, stats = objective.advantages(batch.prompts, torch.tensor([0.0, 1.0]))
    batch = batch.with_advantages(preferences)
    assert stats["pairs_decided"] == 1.0
    steps = torch.tensor([1, 1])
    loss, stats = objective.loss(policy, batch, steps)
    assert loss.item() == pytest.approx(LOG_2, abs=1e-6) and stats["reward_margin"].item() == pytest.approx(0, abs=1e-6)
    optimizer = torch.optim.SGD([p for p in pipeline.unet.parameters() if p.requires_grad], lr=1.0)
    loss.backward()
    optimizer.step()
    after, stats = objective.loss(policy, batch, steps)
    assert after.item() < LOG_2 and stats["reward_margin"].item() > 0 and stats["preference_accuracy"].item() == 1.0
