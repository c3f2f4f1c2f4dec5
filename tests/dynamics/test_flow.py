"""The flow step with log-probabilities: Euler at noise level 0, the SDE and CPS Gaussians by hand."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlfuse.sampling import flow_step_with_logprob
from rlfuse.dynamics.flow import FlowSampler, flow_transition


def scheduler(steps: int = 10, **options) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **options)
    s.set_timesteps(steps)
    return s


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("index", [0, 4, 9])
def test_noise_level_zero_is_the_schedulers_euler_step(sde_type, index):
    s = scheduler()
    sample, velocity = inputs()
    t = s.timesteps[index]
    ours, log_prob = flow_step_with_logprob(s, velocity, t, sample, noise_level=0.0, sde_type=sde_type)
    s._step_index = index
    theirs = s.step(velocity, t, sample).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert torch.equal(log_prob, torch.zeros(2))  # a deterministic step has no density: 0, no gradient


def test_sde_step_by_hand_and_its_log_prob_against_torch_distributions():
    s = scheduler()
    sample, velocity = inputs(1)
    index, eta = 3, 0.7
    sigma, nxt = s.sigmas[index].double(), s.sigmas[index + 1].double()
    dt = nxt - sigma
    std_t = eta * math.sqrt(sigma / (1 - sigma))
    x, v = sample.double(), velocity.double()
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = std_t * math.sqrt(-dt)
    transition = flow_transition(s, velocity, s.timesteps[index], sample, eta, "sde")
    torch.testing.assert_close(transition.mean.double(), mean, atol=1e-5, rtol=1e-5)
    assert float(transition.std) == pytest.approx(std, rel=1e-6)
    value = mean.float() + 0.3
    _, log_prob = flow_step_with_logprob(s, velocity, s.timesteps[index], sample, eta, "sde", prev_sample=value)
    expected = torch.distributions.Normal(mean, std).log_prob(value.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), expected, atol=1e-4, rtol=1e-5)


def test_at_sigma_one_the_root_takes_the_next_sigma_so_the_step_std_is_eta():
    s = scheduler()
    sample, velocity = inputs(2)
    for eta in (0.3, 0.7):
        transition = flow_transition(s, velocity, s.timesteps[0], sample, eta, "sde")
        assert torch.isfinite(transition.mean).all()
        assert float(transition.std) == pytest.approx(eta, rel=1e-5)   # eta sqrt(1/(1-s1)) sqrt(1-s1)


def test_cps_mean_and_std_by_hand_and_eta_one_is_diffusers_stochastic_sampling():
    s = scheduler()
    sample, velocity = inputs(3)
    index, eta = 5, 0.8
    sigma, nxt = float(s.sigmas[index]), float(s.sigmas[index + 1])
    std = nxt * math.sin(eta * math.pi / 2)
    x0, x1 = sample - sigma * velocity, sample + (1 - sigma) * velocity
    mean = (1 - nxt) * x0 + math.sqrt(nxt**2 - std**2) * x1
    transition = flow_transition(s, velocity, s.timesteps[index], sample, eta, "cps")
    torch.testing.assert_close(transition.mean, mean, atol=1e-5, rtol=1e-5)
    assert float(transition.std) == pytest.approx(std, rel=1e-5)
    # eta = 1: x' = (1 - sigma') x0 + sigma' noise, diffusers' stochastic sampling (same noise).
    stochastic = scheduler(stochastic_sampling=True)
    stochastic._step_index = index
    theirs = stochastic.step(velocity, s.timesteps[index], sample, generator=torch.Generator().manual_seed(9)).prev_sample
    ours, _ = flow_step_with_logprob(s, velocity, s.timesteps[index], sample, 1.0, "cps",
                                     generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_step_runs_in_fp32_under_low_precision_and_gradients_reach_the_velocity_only():
    s = scheduler()
    sample, velocity = inputs(4)
    velocity = velocity.bfloat16().requires_grad_(True)
    recorded = sample.clone().requires_grad_(True)
    prev, log_prob = flow_step_with_logprob(s, velocity, s.timesteps[2], sample.bfloat16(), 0.7, "sde",
                                            prev_sample=recorded.bfloat16())
    assert log_prob.dtype == torch.float32
    log_prob.sum().backward()
    assert velocity.grad is not None and recorded.grad is None


def test_per_sample_timesteps_and_noise_levels():
    s = scheduler()
    sample, velocity = inputs(5)
    timesteps = s.timesteps[[1, 6]]
    both = flow_transition(s, velocity, timesteps, sample, torch.tensor([0.7, 0.0]), "sde")
    first = flow_transition(s, velocity[:1], s.timesteps[1], sample[:1], 0.7, "sde")
    second = flow_transition(s, velocity[1:], s.timesteps[6], sample[1:], 0.0, "sde")
    torch.testing.assert_close(both.mean, torch.cat([first.mean, second.mean]))
    assert both.std.flatten().tolist() == pytest.approx([float(first.std), 0.0])


def test_sampler_stds_and_forward_noising():
    sampler = FlowSampler(scheduler(), noise_level=0.7)
    stds = sampler.step_stds(10)
    assert stds.shape == (10,) and stds[0] == pytest.approx(0.7) and (stds > 0).all()
    cps = FlowSampler(scheduler(), noise_level=0.8, sde_type="cps").step_stds(10)
    assert cps[-1] == 0  # the last step lands on sigma' = 0: deterministic
    x0, noise = inputs(6)
    noisy, target = sampler.forward_noising(x0, noise, torch.tensor([250.0, 750.0]))
    torch.testing.assert_close(noisy[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(target, noise - x0)
