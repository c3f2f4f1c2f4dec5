"""The one rollout: encode prompts, seeded x_T, the sampler's chain with log-probs, decode.

Training, evaluation, `rlfuse.sample`, the benchmarks and the test fixtures all sample through here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from rlfuse.dynamics import Sampler
from rlfuse.families import ModelFamily
from rlfuse.seeding import generators, initial_noise
from rlfuse.trajectories import Conditioning, Trajectories


class Rollout(NamedTuple):
    """B sampled chains of T steps.

    chains: (B, T+1, C, h, w) x_T ... x_0; log_probs: (B, T) of each step at sampling time;
    timesteps: (T,); conditioning: of the B prompts; images: (B, 3, H, W) x_0 decoded, in [0, 1].
    """

    chains: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning
    images: torch.Tensor

    def trajectories(self, prompts: list[str], sample_ids: torch.Tensor, rewards: torch.Tensor,
                     reward_terms: torch.Tensor | None = None, window: tuple[int, int] | None = None) -> Trajectories:
        """The chains as training data: every step, or only the window (start, size) of stochastic
        steps. clone(): copies made outside inference mode, since inference tensors cannot be saved for
        backward."""
        count = len(prompts)
        start, size = window if window is not None else (0, len(self.timesteps))
        steps = slice(start, start + size)
        return Trajectories(
            conditioning=self.conditioning.clone(), latents=self.chains[:, steps].clone(),
            next_latents=self.chains[:, start + 1:start + size + 1].clone(),
            timesteps=self.timesteps[steps].expand(count, -1).clone(), log_probs=self.log_probs[:, steps].clone(),
            rewards=rewards,
            reward_terms=reward_terms if reward_terms is not None else rewards.new_zeros(count, 0),
            advantages=torch.zeros_like(rewards), prompts=prompts, sample_ids=sample_ids,
        )

    def clean_trajectories(self, prompts: list[str], sample_ids: torch.Tensor, rewards: torch.Tensor,
                           reward_terms: torch.Tensor | None = None) -> Trajectories:
        """Clean samples as training data for likelihood-free algorithms: x_T and x_0 only (one
        "step" each), the chain's T timesteps as the noise levels to train at, no log-probabilities."""
        count = len(prompts)
        return Trajectories(
            conditioning=self.conditioning.clone(), latents=self.chains[:, :1].clone(),
            next_latents=self.chains[:, -1:].clone(), timesteps=self.timesteps.expand(count, -1).clone(),
            log_probs=self.chains.new_zeros(count, len(self.timesteps)), rewards=rewards,
            reward_terms=reward_terms if reward_terms is not None else rewards.new_zeros(count, 0),
            advantages=torch.zeros_like(rewards), prompts=prompts, sample_ids=sample_ids,
        )


@torch.inference_mode()
def sample_chain(network: torch.nn.Module, family: ModelFamily, sampler: Sampler, conditioning: Conditioning,
                 initial_latents: torch.Tensor, num_steps: int, guidance_scale: float,
                 step_generators: list[torch.Generator], progress: bool = False,
                 window: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll out the sampler from initial noise (B, C, h, w) (unscaled standard normal), recording every
    transition; with a window (start, size), only its steps are stochastic and the others
    deterministic (Flow-GRPO-Fast, MixGRPO). Returns chains (B, T+1, C, h, w), log_probs (B, T)
    (0 for deterministic steps), timesteps (T,)."""
    timesteps = sampler.set_timesteps(num_steps, device=initial_latents.device)
    latents = sampler.initial_latents(initial_latents)
    all_latents, all_log_probs = [latents], []
    for i, t in enumerate(tqdm(timesteps, desc="denoise", leave=False, disable=not progress)):
        prediction = family.predict(network, sampler.model_input(latents, t), t, conditioning, guidance_scale)
        stochastic = window is None or window[0] <= i < window[0] + window[1]
        latents, log_prob = sampler.step(prediction, t, latents, generator=step_generators, stochastic=stochastic)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1), timesteps


def rollout(network: torch.nn.Module, family: ModelFamily, sampler: Sampler, prompts: list[str],
            noise_seeds: list[int], step_seeds: list[int], latent_shape: tuple[int, ...], num_steps: int,
            guidance_scale: float, device: torch.device,
            autocast: Callable[[], AbstractContextManager] = nullcontext,
            window: tuple[int, int] | None = None) -> Rollout:
    """Sample B = len(prompts) images: noise_seeds fix each x_T, step_seeds each chain's sampler noise;
    window (start, size): the only stochastic steps (see sample_chain).

    Latents stay fp32 under mixed precision (autocast covers the network only); images are decoded
    after the chain, outside autocast.
    """
    conditioning = family.encode_prompts(prompts, device)
    initial = initial_noise(latent_shape, noise_seeds)
    with autocast():
        chains, log_probs, timesteps = sample_chain(network, family, sampler, conditioning, initial.to(device),
                                                    num_steps, guidance_scale, generators(step_seeds), window=window)
    with torch.inference_mode():
        images = family.decode(chains[:, -1])
    return Rollout(chains, log_probs, timesteps, conditioning, images)
