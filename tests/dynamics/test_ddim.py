"""The DDIM step with log-probabilities, against diffusers and against Gaussian densities by hand."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from rlfuse.sampling import ddim_step_with_logprob, step_stds


def make_scheduler(prediction_type="epsilon", num_steps=10, set_alpha_to_one=False):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=set_alpha_to_one, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps)
    return scheduler


def mean_by_hand(scheduler, model_output, t, sample, eta):
    """DDIM eq. 12 for an epsilon model, written out from the scheduler's alphas_cumprod."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t].double()
    a_prev = scheduler.alphas_cumprod[prev_t].double() if prev_t >= 0 else scheduler.final_alpha_cumprod.double()
    std = step_std(scheduler, t, eta).double()
    x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * model_output


def step_std(scheduler, t, eta):
    """sigma_t of DDIM eq. 16, computed from the scheduler's own tables (diffusers' _get_variance)."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return eta * scheduler._get_variance(t, prev_t) ** 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("step", [0, 4, 9])  # first, middle, last (final alpha) step
def test_mean_at_eta_zero_equals_diffusers_ddim_step(prediction_type, step):
    scheduler = make_scheduler(prediction_type)
    t = scheduler.timesteps[step]
    torch.manual_seed(0)
    sample, model_output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    expected = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
    prev_sample, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=0.0)
    torch.testing.assert_close(prev_sample, expected, rtol=1e-5, atol=1e-6)
    assert log_prob.shape == (3,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_drawn_sample_at_eta_one_equals_diffusers_with_the_same_generator(prediction_type):
    scheduler = make_scheduler(prediction_type)
    t = scheduler.timesteps[3]
    sample, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    prev_sample, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0,
                                            generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(prev_sample, expected, rtol=1e-5, atol=1e-6)


def test_log_prob_equals_independent_gaussian_density():
    scheduler = make_scheduler()
    t = scheduler.timesteps[2]
    sample, model_output = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 8, 8, dtype=torch.float64)
    mean = mean_by_hand(scheduler, model_output, int(t), sample, 1.0)
    std = step_std(scheduler, int(t), 1.0).item()
    prev_sample = mean + std * torch.randn_like(mean)
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=prev_sample)
    expected = torch.distributions.Normal(mean, std).log_prob(prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-7, atol=1e-7)


def test_log_prob_at_the_mean_is_minus_log_std_minus_half_log_two_pi():
    scheduler = make_scheduler()
    t = scheduler.timesteps[5]
    sample, model_output = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eta = 0.7
    mean = mean_by_hand(scheduler, model_output, int(t), sample, eta)
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=eta, prev_sample=mean)
    std = step_std(scheduler, int(t), eta).item()
    expected = -math.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob, torch.full((2,), expected, dtype=torch.float64))


def test_given_prev_sample_is_scored_not_replaced_and_gradients_flow_through_the_mean_only():
    scheduler = make_scheduler()
    t = scheduler.timesteps[1]
    sample = torch.randn(2, 4, 8, 8)
    model_output = torch.randn(2, 4, 8, 8, requires_grad=True)
    recorded = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev_sample, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=recorded)
    assert torch.equal(prev_sample, recorded)
    log_prob.sum().backward()
    assert model_output.grad is not None and model_output.grad.abs().sum() > 0
    assert recorded.grad is None  # prev_sample is detached inside the density


def test_per_sample_timesteps_match_scalar_calls():
    scheduler = make_scheduler()
    timesteps = scheduler.timesteps[[0, 3, 9]]
    sample, model_output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    recorded = torch.randn(3, 4, 8, 8)
    _, batched_log_probs = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, prev_sample=recorded)
    for i, t in enumerate(timesteps):
        _, log_prob = ddim_step_with_logprob(scheduler, model_output[i:i + 1], int(t), sample[i:i + 1],
                                             prev_sample=recorded[i:i + 1])
        torch.testing.assert_close(log_prob, batched_log_probs[i:i + 1])


def test_deterministic_step_gives_zero_log_prob_not_nan():
    scheduler = make_scheduler(set_alpha_to_one=True)
    t = scheduler.timesteps[-1]  # std is 0 on the final step when the final alpha is 1
    sample, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0)
    assert torch.equal(log_prob, torch.zeros(2))


def test_low_precision_sample_is_scored_as_stored_in_fp32():
    """A bf16 chain stores bf16 latents; its log-prob is computed in fp32 on the stored value, so
    rescoring the stored sample later (as training does) gives the same number."""
    scheduler = make_scheduler()
    t = scheduler.timesteps[4]
    sample, model_output = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    prev_sample, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample,
                                                   generator=torch.Generator().manual_seed(0))
    assert prev_sample.dtype == torch.bfloat16 and log_prob.dtype == torch.float32
    _, rescored = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=prev_sample)
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_stds_are_the_schedulers_sigma_times_eta_and_small_at_the_end(eta):
    scheduler = make_scheduler(num_steps=10)
    stds = step_stds(scheduler, eta)
    expected = torch.stack([step_std(scheduler, int(t), eta) for t in scheduler.timesteps]).double()
    assert stds.shape == (10,)
    torch.testing.assert_close(stds, expected, rtol=1e-5, atol=1e-6)  # diffusers computes in fp32
    # The reason for algorithm.min_step_std: the last steps of 10 are nearly deterministic.
    assert stds[-1] < 0.1 * eta and stds[:-2].min() > 0.2 * eta
