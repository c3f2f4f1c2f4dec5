"""Diffusion-DPO: the loss and its gradient by hand, ties, the log 2 start, winner and loser noised alike,
the training noise levels of each sampler, and the moving reference adapter."""

import math

import pytest
import torch

from rlfuse.algorithms.diffusion_dpo import DiffusionDPO, denoising_error, dpo_loss
from rlfuse.dynamics.flow import FlowSampler
from rlfuse.trajectories import Conditioning, Trajectories


def by_hand(policy_errors, reference_errors, preferences, beta):
    """The paper's loss, pair by pair, in plain Python."""
    total, decided = 0.0, 0
    for i in range(0, len(preferences), 2):
        if preferences[i] == 0:
            continue
        w, l_ = (i, i + 1) if preferences[i] > 0 else (i + 1, i)
        inside = -beta / 2 * ((policy_errors[w] - policy_errors[l_]) - (reference_errors[w] - reference_errors[l_]))
        total += -math.log(1 / (1 + math.exp(-inside)))
        decided += 1
    return total / max(decided, 1)


def test_loss_by_hand_with_either_image_of_a_pair_the_winner():
    policy = torch.tensor([0.30, 0.32, 0.50, 0.47, 0.25, 0.21], dtype=torch.float64)
    reference = torch.tensor([0.31, 0.31, 0.49, 0.48, 0.22, 0.20], dtype=torch.float64)
    preferences = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    loss, stats = dpo_loss(policy, reference, preferences, beta=50.0)
    assert loss.item() == pytest.approx(by_hand(policy.tolist(), reference.tolist(), preferences.tolist(), 50.0))
    # inside = -25 ((w - l) - (w_ref - l_ref)): pair 1 -25 (-0.02 - 0) = 0.5; pair 2 (row 3 won)
    # -25 (-0.03 + 0.01) = 0.5; pair 3 -25 (0.04 - 0.02) = -0.5: two of three ranked right.
    assert stats["implicit_accuracy"].item() == pytest.approx(2 / 3)
    assert stats["reward_margin"].item() == pytest.approx(0.5 / 3)


def test_gradient_by_hand():
    """d L / d err_theta(w) = beta / 2 * sigmoid(-inside) / P and the opposite for the loser."""
    policy = torch.tensor([0.40, 0.35, 0.10, 0.12], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([0.38, 0.36, 0.11, 0.11], dtype=torch.float64)
    preferences = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    beta = 20.0
    loss, _ = dpo_loss(policy, reference, preferences, beta)
    loss.backward()
    expected = []
    for w, l_ in ((0, 1), (2, 3)):
        inside = -beta / 2 * ((policy[w] - policy[l_]) - (reference[w] - reference[l_])).item()
        g = beta / 2 / (1 + math.exp(inside)) / 2                   # sigmoid(-inside) / P, P = 2
        expected += [g, -g]
    torch.testing.assert_close(policy.grad, torch.tensor(expected, dtype=torch.float64))


def test_sft_term_adds_the_winners_error_and_its_gradient():
    """sft_weight * err_theta(w) per decided pair: the loss grows by sft_weight x the winners' mean error,
    the winner's gradient by sft_weight / P, the loser's and a tie's not at all."""
    policy = torch.tensor([0.40, 0.35, 0.10, 0.12, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([0.38, 0.36, 0.11, 0.11, 0.3, 0.2], dtype=torch.float64)
    preferences = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)   # rows 0 and 3 won
    plain, _ = dpo_loss(policy, reference, preferences, 20.0)
    (plain_grad,) = torch.autograd.grad(plain, policy)
    loss, stats = dpo_loss(policy, reference, preferences, 20.0, sft_weight=7.0)
    loss.backward()
    assert loss.item() == pytest.approx(plain.item() + 7.0 * (0.40 + 0.12) / 2)
    torch.testing.assert_close(policy.grad - plain_grad,
                               torch.tensor([3.5, 0.0, 0.0, 3.5, 0.0, 0.0], dtype=torch.float64))
    assert stats["error_winner"].item() == pytest.approx((0.40 + 0.12) / 2)
    with pytest.raises(ValueError, match="sft_weight"):
        DiffusionDPO(sft_weight=-1.0)


def test_dpo_positive_charges_only_a_winner_denoised_worse_than_by_the_reference():
    """inside = -beta/2 ((w - l) - (w_ref - l_ref) + lambda max(0, w - w_ref)), by hand: pair 1's winner is
    worse than the reference (0.40 > 0.38): penalised; pair 2's winner is better (0.12 < 0.13): not."""
    policy = torch.tensor([0.40, 0.35, 0.10, 0.12], dtype=torch.float64)
    reference = torch.tensor([0.38, 0.36, 0.11, 0.13], dtype=torch.float64)
    preferences = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)     # rows 0 and 3 won
    beta, lam = 20.0, 5.0
    loss, _ = dpo_loss(policy, reference, preferences, beta, positive_lambda=lam)
    inside_1 = -beta / 2 * ((0.40 - 0.35) - (0.38 - 0.36) + lam * 0.02)
    inside_2 = -beta / 2 * ((0.12 - 0.10) - (0.13 - 0.11))
    expected = (math.log1p(math.exp(-inside_1)) + math.log1p(math.exp(-inside_2))) / 2
    assert loss.item() == pytest.approx(expected)
    plain, _ = dpo_loss(policy, reference, preferences, beta)
    assert loss.item() > plain.item()
    with pytest.raises(ValueError, match="positive_lambda"):
        DiffusionDPO(positive_lambda=-1.0)


def test_ties_give_no_loss_and_no_gradient():
    policy = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    loss, _ = dpo_loss(policy, reference, torch.zeros(4, dtype=torch.float64), 100.0)
    loss.backward()
    assert loss.item() == 0.0 and bool((policy.grad == 0).all())
    # A tie beside a decided pair changes neither the loss nor that pair's gradient.
    alone, _ = dpo_loss(policy[:2], reference[:2], torch.tensor([1.0, -1.0], dtype=torch.float64), 100.0)
    mixed, _ = dpo_loss(policy, reference, torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64), 100.0)
    assert mixed.item() == pytest.approx(alone.item())


def test_policy_equal_to_reference_gives_log_2():
    errors = torch.rand(8, dtype=torch.float64)
    loss, stats = dpo_loss(errors, errors.clone(), torch.tensor([1.0, -1.0] * 4, dtype=torch.float64), 5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["implicit_accuracy"].item() == 0.0  # inside = 0 is not > 0 (the reference code's count)


def test_denoising_error_is_the_per_sample_mean_square():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(denoising_error(prediction, target), torch.tensor([1.0, 9.0]))


def pair_batch(x0: torch.Tensor, prompt_embeds: torch.Tensor) -> Trajectories:
    count = len(x0)
    return Trajectories(
        conditioning=Conditioning({"prompt_embeds": prompt_embeds, "negative_embeds": torch.zeros_like(prompt_embeds)}),
        latents=x0[:, None], next_latents=x0[:, None], timesteps=torch.zeros(count, 1, dtype=torch.long),
        log_probs=torch.zeros(count, 1), rewards=torch.tensor([1.0, 0.0] * (count // 2)),
        reward_terms=torch.zeros(count, 0), advantages=torch.tensor([1.0, -1.0] * (count // 2)),
        prompts=[f"p{i // 2}" for i in range(count)], sample_ids=torch.arange(count))


def test_winner_and_loser_share_timestep_and_noise_and_pairs_differ(lora_policy):
    """The loss noises rows 2i and 2i + 1 to one timestep with one noise; the prediction is unguided."""
    pipeline, policy = lora_policy
    seen = {}
    forward_noising, predict = policy.sampler.forward_noising, policy.predict

    def record_noising(samples, noise, timesteps):
        seen.update(noise=noise.clone(), timesteps=timesteps.clone())
        return forward_noising(samples, noise, timesteps)

    def record_predict(*args, guided=True, **kwargs):
        seen.setdefault("guided", []).append(guided)
        return predict(*args, guided=guided, **kwargs)

    policy.sampler.forward_noising, policy.predict = record_noising, record_predict
    torch.manual_seed(0)
    x0 = torch.randn(6, 4, 16, 16)
    embeds = pipeline.text_encoder(pipeline.tokenizer(["a", "a", "b", "b", "c", "c"], padding="max_length",
                                                      return_tensors="pt").input_ids)[0].detach()
    loss, stats = DiffusionDPO(beta=100.0).loss(policy, pair_batch(x0, embeds), torch.zeros(6, dtype=torch.long))
    noise, timesteps = seen["noise"], seen["timesteps"]
    torch.testing.assert_close(noise[0::2], noise[1::2])
    torch.testing.assert_close(timesteps[0::2], timesteps[1::2])
    assert not torch.equal(noise[0], noise[2]) and len(set(timesteps[0::2].tolist())) > 1
    assert seen["guided"] == [False, False]            # policy and reference: the conditional prediction
    # Fresh LoRA adapters: policy = reference, so every pair starts at log 2.
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipeline.unet.parameters() if p.requires_grad)


def test_ddim_draws_integer_training_timesteps_uniformly(lora_policy):
    torch.manual_seed(0)
    timesteps = lora_policy[1].sampler.training_timesteps(4000)
    assert timesteps.dtype == torch.long and timesteps.min() >= 0 and timesteps.max() <= 999
    assert timesteps.float().mean().item() == pytest.approx(499.5, abs=15)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_timesteps_are_logit_normal_and_shifted(shift):
    """u = sigmoid(N(0, 1)) has median 1/2: the shifted sigma's median is s/2 / (1 + (s - 1)/2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = FlowSampler(FlowMatchEulerDiscreteScheduler(shift=shift), 0.7)
    torch.manual_seed(0)
    sigmas = sampler.training_timesteps(20000) / 1000
    assert 0 < sigmas.min() and sigmas.max() < 1
    assert sigmas.median().item() == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5), abs=0.01)


def test_a_moving_reference_is_a_second_adapter_refreshed_every_n_epochs(lora_policy):
    pipeline, _ = lora_policy
    algorithm = DiffusionDPO(beta=10.0, reference_every=2)
    assert not algorithm.needs_reference
    algorithm.attach(pipeline.unet)
    pairs = algorithm._adapter_pairs()
    assert pairs and all(torch.equal(r, t) for r, t in pairs)
    with torch.no_grad():
        for _, trained in pairs:
            trained.add_(0.5)
    algorithm.end_epoch(3)
    assert not any(torch.equal(r, t) for r, t in pairs)                # epoch 1: kept
    state = algorithm.state_dict()
    assert algorithm.end_epoch(3) == {"reference_refreshed": 1.0}       # epoch 2: refreshed
    assert all(torch.equal(r, t) for r, t in pairs)
    algorithm.load_state_dict(state)                                    # resume restores the older reference
    assert algorithm.epochs == 1 and not any(torch.equal(r, t) for r, t in pairs)


def test_on_a_flow_model_the_target_is_the_velocity_and_the_pair_shares_sigma():
    """tiny_sd3 with LoRA: the loss regresses eps - x_0 at x_sigma = (1 - sigma) x_0 + sigma eps, one sigma per pair."""
    from rlfuse.families.sd3 import StableDiffusion3
    from rlfuse.families.tiny import build_tiny_sd3
    from rlfuse.lora import ReferencePolicy, add_lora
    from rlfuse.policy import Policy

    pipeline = build_tiny_sd3(seed=0)
    add_lora(pipeline.transformer, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    family = StableDiffusion3(pipeline, max_sequence_length=16)
    policy = Policy(pipeline.transformer, family, family.sampler(0.7), 4.5,
                    ReferencePolicy(pipeline.transformer, "lora", torch.device("cpu")))
    seen = {}
    forward_noising = policy.sampler.forward_noising

    def record(samples, noise, timesteps):
        noisy, target = forward_noising(samples, noise, timesteps)
        seen.update(samples=samples, noise=noise, timesteps=timesteps, noisy=noisy, target=target)
        return noisy, target

    policy.sampler.forward_noising = record
    torch.manual_seed(0)
    x0 = torch.randn(4, 16, 16, 16)
    conditioning = family.encode_prompts(["a cat", "a cat", "a dog", "a dog"], torch.device("cpu"))
    batch = pair_batch(x0, torch.zeros(4, 1, 1))
    batch.conditioning = conditioning
    loss, _ = DiffusionDPO(beta=100.0).loss(policy, batch, torch.zeros(4, dtype=torch.long))
    sigma = (seen["timesteps"] / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["target"], seen["noise"] - x0)
    torch.testing.assert_close(seen["noisy"], (1 - sigma) * x0 + sigma * seen["noise"])
    torch.testing.assert_close(seen["timesteps"][0::2], seen["timesteps"][1::2])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
