"""RWR: weights on hand-worked numbers, their effective sample size, and the weighted denoising loss."""

import math

import pytest
import torch

from rlfuse.algorithms.rwr import RWR, effective_sample_size, rwr_weights, weighted_denoising_loss


def test_softmax_weights_by_hand():
    weights = rwr_weights(torch.tensor([0.0, 1.0, 2.0]), None, temperature=1.0, weighting="weighted", quantile=0.9,
                          normalize=False)
    total = 1 + math.e + math.e**2
    torch.testing.assert_close(weights, torch.tensor([3 / total, 3 * math.e / total, 3 * math.e**2 / total]))
    assert weights.sum().item() == pytest.approx(3.0)  # softmax * N averages to 1


def test_normalised_weights_do_not_depend_on_the_reward_scale():
    rewards = torch.tensor([0.0, 1.0, 3.0])
    a = rwr_weights(rewards, None, 0.5, "weighted", 0.9)
    b = rwr_weights(rewards * 1000 - 7, None, 0.5, "weighted", 0.9)
    torch.testing.assert_close(a, b)


def test_per_prompt_weights_sum_to_each_group_size():
    # Group "a": rewards 0, ln 3 at temperature 1 -> softmax (1/4, 3/4) * 2; group "b" alone -> 1.
    weights = rwr_weights(torch.tensor([0.0, 5.0, math.log(3)]), ["a", "b", "a"], 1.0, "weighted", 0.9,
                          normalize=False)
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0, 1.5]))


def test_sparse_weights_keep_the_top_quantile_unweighted():
    # The 0.5 quantile of [1, 2, 3, 4] is 2.5: the two best samples get weight 1.
    weights = rwr_weights(torch.tensor([3.0, 1.0, 4.0, 2.0]), None, 1.0, "sparse", 0.5)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_effective_sample_size_by_hand():
    assert effective_sample_size(torch.ones(8)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_sample_size(torch.tensor([3.0, 1.0])) == pytest.approx(16 / 10)
    _, stats = RWR(weighting="sparse", quantile=0.5).advantages(["a"] * 4, torch.tensor([3.0, 1.0, 4.0, 2.0]))
    assert stats["weight_ess"] == pytest.approx(2.0)


def test_weighted_denoising_loss_by_hand():
    prediction = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).reshape(2, 2, 1, 1)
    target = torch.zeros(2, 2, 1, 1)
    # per-sample mse: (1 + 1) / 2 = 1 and (0 + 4) / 2 = 2; weights 2 and 0.5 -> (2 + 1) / 2
    loss, stats = weighted_denoising_loss(prediction, target, torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx(1.5) and stats["denoising_mse"].item() == pytest.approx(1.5)


def test_loss_on_the_tiny_model_is_zero_without_weight_and_trains_with_it(lora_policy, sample):
    pipeline, policy = lora_policy
    batch = sample(pipeline, ["a cat", "a dog"], shared_noise_pairs=False)
    params = [p for p in pipeline.unet.parameters() if p.requires_grad]
    for weights, trains in ((torch.tensor([0.0, 0.0]), False), (torch.tensor([0.0, 2.0]), True)):
        loss, stats = RWR().loss(policy, batch.with_advantages(weights), torch.tensor([1, 1]))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        moved = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert moved == trains and stats["denoising_mse"].item() > 0


def test_the_guided_loss_regresses_the_prediction_sampling_makes(lora_policy, sample):
    """Same x_0, timestep and noise: RWR's prediction is the rollout's guided prediction (the family's
    predict at the sampler's input and guidance 5), and the conditional option is guidance 1."""
    pipeline, policy = lora_policy
    batch = sample(pipeline, ["a cat", "a dog"], shared_noise_pairs=False).with_advantages(torch.tensor([1.0, 1.0]))
    step = torch.tensor([1, 2])
    samples, timesteps = batch.next_latents[:, -1], batch.timesteps[torch.arange(2), step]
    for prediction, scale in (("guided", 5.0), ("conditional", 1.0)):
        torch.manual_seed(7)
        loss, _ = RWR(prediction=prediction).loss(policy, batch, step)
        torch.manual_seed(7)
        noise = torch.randn(samples.shape)
        noisy = policy.sampler.scheduler.add_noise(samples, noise, timesteps)
        with torch.no_grad():  # as the rollout calls it
            sampled = policy.family.predict(pipeline.unet, policy.sampler.model_input(noisy, timesteps), timesteps,
                                            batch.conditioning, scale)
        torch.testing.assert_close(loss.detach(), ((sampled - noise) ** 2).mean(), rtol=1e-5, atol=1e-7)
    torch.manual_seed(7)
    guided = RWR().loss(policy, batch, step)[0]
    torch.manual_seed(7)
    conditional = RWR(prediction="conditional").loss(policy, batch, step)[0]
    assert abs(guided.item() - conditional.item()) > 1e-4  # guidance 5 changes the prediction


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction='unguided'"):
        RWR(prediction="unguided")
