"""The DDIM step as a Gaussian policy: x_t -> x_{t-1} with its log-density.

Reverse diffusion with DDIM at eta > 0 is a chain of Gaussian transitions
p(x_{t-1} | x_t, c) = N(mean_theta(x_t, t, c), std_t^2 I), so every step has a tractable
log-density (Black et al. 2023, arXiv 2305.13301, section 4.2). One step function serves sampling
(draw x_{t-1}) and training (score a recorded x_{t-1} with gradients), so the two never disagree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from diffusers import DDIMScheduler

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) or scalar tensor against `like` (B, ...)."""
    values = values.to(device=like.device, dtype=like.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class Transition(NamedTuple):
    """The Gaussian p(x_{t-1} | x_t) = N(mean, std^2 I) of one DDIM step of B samples.

    mean: (B, C, H, W) in at least fp32; std: (B, 1, 1, 1) or a scalar tensor, eta * sigma_t.
    """

    mean: torch.Tensor
    std: torch.Tensor


def ddim_transition(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> Transition:
    """The mean and std of the DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12), computed in at
    least fp32; see ddim_step_with_logprob for the arguments."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before stepping")
    # The step runs in at least fp32 whatever the model's precision: sampling and training must score
    # a transition identically, or PPO ratios drift from 1 before any update (fp16 rounding of the
    # coefficients alone moves them by 1e-3, ten times DDPO's clip range).
    compute_dtype = torch.promote_types(sample.dtype, torch.float32)
    sample, model_output = sample.to(compute_dtype), model_output.to(compute_dtype)
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    step_size = config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = timestep - step_size

    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float64)
    alpha_prod_t = alphas_cumprod[timestep.clamp(0, len(alphas_cumprod) - 1)]
    final_alpha = torch.as_tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64, device=sample.device)
    alpha_prod_prev = torch.where(
        prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final_alpha
    )
    beta_prod_t = 1 - alpha_prod_t
    variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev = eta * variance.clamp(min=0).sqrt()

    # Cast the per-sample coefficients to the sample's dtype and shape once.
    a_t, b_t = _per_sample(alpha_prod_t, sample), _per_sample(beta_prod_t, sample)
    a_prev, std = _per_sample(alpha_prod_prev, sample), _per_sample(std_dev, sample)

    if config.prediction_type == "epsilon":
        pred_original = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        pred_epsilon = model_output
    elif config.prediction_type == "v_prediction":
        pred_original = a_t.sqrt() * sample - b_t.sqrt() * model_output
        pred_epsilon = a_t.sqrt() * model_output + b_t.sqrt() * sample
    elif config.prediction_type == "sample":
        pred_original = model_output
        pred_epsilon = (sample - a_t.sqrt() * pred_original) / b_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")

    if config.thresholding:
        pred_original = scheduler._threshold_sample(pred_original)
    elif config.clip_sample:
        pred_original = pred_original.clamp(-config.clip_sample_range, config.clip_sample_range)

    # Eq. 12 of the DDIM paper: the mean of x_{t-1}.
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * pred_epsilon
    return Transition(a_prev.sqrt() * pred_original + direction, std)


def step_stds(scheduler: DDIMScheduler, eta: float) -> torch.Tensor:
    """(T,) float64 std of each step of scheduler.timesteps (set_timesteps first): eta * sigma_t.

    The std does not depend on the sample or the model, so this evaluates the transition at zeros.
    """
    timesteps = scheduler.timesteps.cpu()
    zeros = torch.zeros(len(timesteps), 1, dtype=torch.float64)
    return ddim_transition(scheduler, zeros, timesteps, zeros, eta).std.flatten()


def gaussian_log_prob(value: torch.Tensor, transition: Transition) -> torch.Tensor:
    """(B,) log N(value; mean, std^2 I) per element, averaged over all non-batch dimensions.

    value is detached: gradients flow through the mean only. Where std is 0 (a deterministic step)
    the density is undefined and the result is 0, which gives no gradient.
    """
    mean, std = transition
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    log_density = (
        -((value.detach().to(mean.dtype) - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - LOG_SQRT_2PI
    )
    log_density = torch.where(deterministic, torch.zeros_like(log_density), log_density)
    return log_density.mean(dim=tuple(range(1, mean.ndim)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and the log-density of x_{t-1} under the step's Gaussian.

    Follows DDIMScheduler.step (Song et al. 2021, eq. 12) with std_t = eta * sigma_t, where
    sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev) and a = alphas_cumprod; the last step
    uses the scheduler's final_alpha_cumprod. Supports epsilon, v_prediction and sample outputs.

    Args:
        scheduler: a DDIMScheduler on which set_timesteps has been called.
        model_output: (B, C, H, W) the (guided) network prediction at x_t.
        timestep: the current timestep, an int, a 0-d tensor, or a (B,) tensor (one per sample).
        sample: (B, C, H, W) x_t.
        eta: noise scale; 0 is deterministic DDIM, 1 is DDPM-like.
        prev_sample: (B, C, H, W) a recorded x_{t-1} to score instead of drawing a new one.
        generator: torch generator(s) for the noise (one per sample, or one for the batch).

    Returns:
        prev_sample: (B, C, H, W) x_{t-1}, drawn or the one given.
        log_prob: (B,) the Gaussian log-density of prev_sample, averaged over C, H, W (the
            convention of the DDPO and D3PO reference code, which their hyperparameters assume).
            prev_sample is detached inside the density, so gradients flow through the mean only.
            Where the step is deterministic (std 0: eta = 0, or the final step of a scheduler with
            set_alpha_to_one) the density is undefined and log_prob is 0, which gives no gradient.
    """
    storage_dtype = sample.dtype
    transition = ddim_transition(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = _randn_like(transition.mean, generator)
        # Score the value that will be stored (rounded to the storage dtype), not the unrounded draw.
        prev_sample = (transition.mean + transition.std * noise).to(storage_dtype)
    return prev_sample.to(storage_dtype), gaussian_log_prob(prev_sample, transition)


def _randn_like(sample: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like sample; per-sample generators keep each sample reproducible."""
    if isinstance(generator, list):
        return torch.stack(
            [torch.randn(sample.shape[1:], generator=g, device=g.device, dtype=sample.dtype) for g in generator]
        ).to(sample.device)
    return torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)


class DDIMSampler:
    """The sampler protocol (rlfuse.dynamics.Sampler) for DDIM at noise scale eta, over a DDIMScheduler."""

    name = "ddim"

    def __init__(self, scheduler: DDIMScheduler, eta: float):
        self.scheduler = scheduler
        self.eta = eta

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(T,) the timesteps of a num_steps chain, noisiest first."""
        self.scheduler.set_timesteps(num_steps, device=device)
        return self.scheduler.timesteps

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from standard normal noise (B, C, h, w)."""
        return noise * self.scheduler.init_noise_sigma

    def model_input(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(latents, timesteps)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             generator: list[torch.Generator] | None = None, stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t-1} (B, C, h, w), log_prob (B,)): one drawn step; stochastic=False takes the deterministic
        step (eta 0: log_prob 0)."""
        return ddim_step_with_logprob(self.scheduler, model_output, timestep, sample,
                                      eta=self.eta if stochastic else 0.0, generator=generator)

    def transition(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor) -> Transition:
        """The Gaussian of the step at timesteps (B,) from sample (B, C, h, w)."""
        return ddim_transition(self.scheduler, model_output, timesteps, sample, self.eta)

    def forward_noising(self, samples: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target): samples x_0 (B, C, h, w) noised to timesteps (B,) by the forward process, and
        what the network regresses there (noise, velocity or x_0, by the scheduler's prediction type)."""
        noisy = self.scheduler.add_noise(samples, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noisy, noise
        if prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(samples, noise, timesteps)
        return noisy, samples

    def training_timesteps(self, count: int) -> torch.Tensor:
        """(count,) long timesteps drawn uniformly from the scheduler's training steps (torch's global
        generator), as diffusion models are trained (and Diffusion-DPO's reference code draws them)."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,))

    def step_stds(self, num_steps: int) -> torch.Tensor:
        """(T,) float64 std of each step of a num_steps chain."""
        self.scheduler.set_timesteps(num_steps)
        return step_stds(self.scheduler, self.eta)
