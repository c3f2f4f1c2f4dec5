"""The rectified-flow step as a Gaussian policy: x_sigma -> x_sigma' with its log-density.

Notation: sigma the current noise level, sigma' the next (smaller), dt = sigma' - sigma < 0, v the
predicted velocity (noise - x0), eta the noise level; x_sigma = (1 - sigma) x0 + sigma noise, so
sigma = 1 is pure noise. The deterministic sampler is Euler, x' = x + v dt
(`FlowMatchEulerDiscreteScheduler.step`). Two stochastic steps with the same marginals:

- "sde" (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eq. 9; yifan123/flow_grpo
  `sd3_sde_with_logprob.py`): the reverse SDE discretised with Euler-Maruyama,
      std_t = eta * sqrt(sigma / (1 - s)), s = sigma except at sigma = 1, where s = sigma'
      mean  = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt
      x'    = mean + std_t * sqrt(-dt) * noise
- "cps" (Coefficients-Preserving Sampling, Wang & Yu 2025, arXiv 2509.05952): predict x0 and the
  noise, and mix them so that the total noise stays sigma',
      std   = sigma' * sin(eta * pi / 2);  x0 = x - sigma v;  x1 = x + (1 - sigma) v
      mean  = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) x1;  x' = mean + std * noise

The log-density is the step's Gaussian, averaged over the latent dimensions (the DDPO / Flow-GRPO
convention, as rlfuse.dynamics.ddim), computed in fp32 whatever the autocast. Flow-GRPO's CPS code
drops the constants and the variance from its log-probability (-mean (x' - mean)^2); rlfuse keeps
the Gaussian, so its ratios are the exact density ratios and a clip range means the same under
both step types.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlfuse.dynamics.ddim import Transition, _per_sample, _randn_like, gaussian_log_prob

SDE_TYPES = ("sde", "cps")


def sigma_pairs(scheduler: FlowMatchEulerDiscreteScheduler, timestep: float | torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, next sigma, sigma of the step after the first) as float64, one per timestep (scalar or (B,)):
    each timestep is matched to the nearest of scheduler.timesteps (set_timesteps first)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before stepping")
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.float64)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float64)
    timestep = torch.as_tensor(timestep, device=device, dtype=torch.float64)
    distance = (timestep.reshape(-1, 1) - timesteps.reshape(1, -1)).abs()
    nearest, index = distance.min(dim=1)
    if bool((nearest > 1e-3).any()):  # a timestep of another schedule: its sigmas would be wrong
        raise ValueError(f"timestep {float(timestep.reshape(-1)[nearest.argmax()])} is not one of the scheduler's "
                         f"timesteps; call set_timesteps with the chain's number of steps")
    index = index.reshape(timestep.shape)
    return sigmas[index], sigmas[index + 1], sigmas[1]


def flow_transition(scheduler: FlowMatchEulerDiscreteScheduler, model_output: torch.Tensor,
                    timestep: float | torch.Tensor, sample: torch.Tensor, noise_level: float | torch.Tensor = 0.7,
                    sde_type: str = "sde") -> Transition:
    """The mean and std of the flow step x_sigma -> x_sigma' (see the module docstring), in at least
    fp32. noise_level: a float, or a (B,) tensor (0 where a sample's step is deterministic)."""
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={sde_type!r}: use one of {', '.join(SDE_TYPES)}")
    compute_dtype = torch.promote_types(sample.dtype, torch.float32)
    sample, velocity = sample.to(compute_dtype), model_output.to(compute_dtype)
    sigma, next_sigma, second_sigma = sigma_pairs(scheduler, timestep, sample.device)
    eta = torch.as_tensor(noise_level, device=sample.device, dtype=torch.float64)
    if sde_type == "sde":
        # At sigma = 1 the root would divide by zero: Flow-GRPO uses the next sigma there.
        root_sigma = torch.where(sigma >= 1, second_sigma, sigma)
        step_std = eta * torch.sqrt(sigma / (1 - root_sigma))                       # std_t
        dt = next_sigma - sigma
        s, d, a = _per_sample(sigma, sample), _per_sample(dt, sample), _per_sample(step_std, sample)
        mean = sample + (velocity + a**2 / (2 * s) * (sample + (1 - s) * velocity)) * d
        return Transition(mean, _per_sample(step_std * torch.sqrt(-dt), sample))
    std = next_sigma * torch.sin(eta * math.pi / 2)
    s, n, c = _per_sample(sigma, sample), _per_sample(next_sigma, sample), _per_sample(std, sample)
    x0, x1 = sample - s * velocity, sample + (1 - s) * velocity
    mean = (1 - n) * x0 + (n**2 - c**2).clamp(min=0).sqrt() * x1
    return Transition(mean, c)


def flow_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float | torch.Tensor = 0.7,
    sde_type: str = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow step x_sigma -> x_sigma' and the log-density of x_sigma' under the step's Gaussian.

    Args:
        scheduler: a FlowMatchEulerDiscreteScheduler on which set_timesteps has been called.
        model_output: (B, C, H, W) the (guided) velocity prediction at x_sigma.
        timestep: the current timestep (one of scheduler.timesteps), a float, a 0-d or a (B,) tensor.
        sample: (B, C, H, W) x_sigma.
        noise_level: eta; 0 is the Euler ODE step (scheduler.step's). A float or (B,).
        sde_type: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
        prev_sample: (B, C, H, W) a recorded x_sigma' to score instead of drawing a new one.
        generator: torch generator(s) for the noise (one per sample, or one for the batch).

    Returns:
        prev_sample: (B, C, H, W) x_sigma', drawn or the one given.
        log_prob: (B,) the Gaussian log-density of prev_sample, averaged over C, H, W; 0 where the step
            is deterministic (noise level 0, or CPS's last step to sigma' = 0). Gradients flow
            through the mean only.
    """
    storage_dtype = sample.dtype
    transition = flow_transition(scheduler, model_output, timestep, sample, noise_level, sde_type)
    if prev_sample is None:
        noise = _randn_like(transition.mean, generator)
        prev_sample = (transition.mean + transition.std * noise).to(storage_dtype)
    return prev_sample.to(storage_dtype), gaussian_log_prob(prev_sample, transition)


class FlowSampler:
    """The sampler protocol (rlfuse.dynamics.Sampler) for rectified-flow models.

    noise_level: eta of every step; sde_type: "sde" or "cps"; mu: the resolution-dependent shift of
    schedulers with dynamic shifting (FLUX), None otherwise.
    """

    name = "flow"

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, noise_level: float, sde_type: str = "sde",
                 mu: float | None = None):
        if sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type={sde_type!r}: use one of {', '.join(SDE_TYPES)}")
        self.scheduler, self.noise_level, self.sde_type, self.mu = scheduler, noise_level, sde_type, mu

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(T,) the timesteps (sigma * 1000) of a num_steps chain, noisiest first."""
        if self.mu is None:
            self.scheduler.set_timesteps(num_steps, device=device)
        else:
            self.scheduler.set_timesteps(num_steps, device=device, mu=self.mu)
        return self.scheduler.timesteps

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise  # x at sigma = 1 is the noise itself

    def model_input(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return latents

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             generator: list[torch.Generator] | None = None, stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x' (B, C, h, w), log_prob (B,)); stochastic=False takes the Euler ODE step (log_prob 0)."""
        return flow_step_with_logprob(self.scheduler, model_output, timestep, sample,
                                      self.noise_level if stochastic else 0.0, self.sde_type, generator=generator)

    def transition(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor) -> Transition:
        return flow_transition(self.scheduler, model_output, timesteps, sample, self.noise_level, self.sde_type)

    def forward_noising(self, samples: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_sigma, velocity target): x_sigma = (1 - sigma) x0 + sigma noise with sigma = timestep / 1000,
        and the velocity noise - x0 the network regresses."""
        sigma = _per_sample(torch.as_tensor(timesteps, device=samples.device) / 1000.0, samples)
        return (1 - sigma) * samples + sigma * noise, noise - samples

    def training_timesteps(self, count: int) -> torch.Tensor:
        """(count,) float timesteps sigma * 1000 for training on the forward process: u ~ logit-normal(0, 1)
        (Esser et al. 2024, arXiv 2403.03206, as SD3 is trained and flow_grpo's DPO draws them), shifted as
        the scheduler shifts its sigmas (shift s: s u / (1 + (s - 1) u); dynamic shift mu:
        e^mu / (e^mu + 1 / u - 1)). torch's global generator."""
        u = torch.sigmoid(torch.randn(count, dtype=torch.float64))
        if self.mu is not None:
            sigma = math.exp(self.mu) / (math.exp(self.mu) + 1 / u - 1)
        else:
            shift = self.scheduler.config.shift
            sigma = shift * u / (1 + (shift - 1) * u)
        return (sigma * 1000).float()

    def step_stds(self, num_steps: int) -> torch.Tensor:
        """(T,) float64 std of each step of a num_steps chain."""
        timesteps = self.set_timesteps(num_steps).cpu()
        zeros = torch.zeros(len(timesteps), 1, dtype=torch.float64)
        return flow_transition(self.scheduler, zeros, timesteps, zeros, self.noise_level, self.sde_type).std.flatten()
