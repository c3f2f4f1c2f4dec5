"""The network being trained, seen as a policy over sampler steps, beside its reference policy."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from rlfuse.dynamics import Sampler
from rlfuse.dynamics.ddim import Transition, gaussian_log_prob
from rlfuse.families import ModelFamily
from rlfuse.trajectories import Conditioning, Trajectories


@dataclass
class Policy:
    """network: the trained denoiser (possibly wrapped for data parallelism); family: how to call it;
    sampler: the step whose Gaussian is the action distribution; reference: a context that yields the
    reference network (the base model) under no_grad, or None when the algorithm needs none
    (rlfuse.lora.ReferencePolicy). guidance_scale is the sampler's, so that training scores each
    recorded transition exactly as sampling drew it.
    """

    network: torch.nn.Module
    family: ModelFamily
    sampler: Sampler
    guidance_scale: float
    reference: Callable[[], AbstractContextManager[torch.nn.Module]] | None = None

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                reference: bool = False, guided: bool = True) -> torch.Tensor:
        """(B, C, h, w) the network's output at x_t = latents (B, C, h, w), timesteps (B,), as sampling computes
        it: the sampler's model input, classifier-free guidance at the sampler's scale (guided=False: the
        conditional branch alone); under the policy (with gradients) or, with reference=True, the reference."""
        if reference and self.reference is None:
            raise ValueError("this policy was built without a reference policy")
        model_input = self.sampler.model_input(latents, timesteps)
        scale = self.guidance_scale if guided else 1.0
        with self.reference() if reference else nullcontext(self.network) as network:
            return self.family.predict(network, model_input, timesteps, conditioning, scale)

    def predict_step(self, batch: Trajectories, step_index: torch.Tensor,
                     reference: bool = False) -> tuple[torch.Tensor, Transition]:
        """(guided prediction (B, C, h, w), its Gaussian step) at recorded step `step_index` (B,) of each
        trajectory, under the policy (with gradients) or the reference (without)."""
        rows = torch.arange(len(batch), device=step_index.device)
        latents = batch.latents[rows, step_index]
        timesteps = batch.timesteps[rows, step_index]
        prediction = self.predict(latents, timesteps, batch.conditioning, reference)
        return prediction, self.sampler.transition(prediction, timesteps, latents)

    def transition(self, batch: Trajectories, step_index: torch.Tensor, reference: bool = False) -> Transition:
        """The Gaussian of recorded step `step_index` (B,) of each trajectory, under the policy (with
        gradients) or, with reference=True, under the reference policy (without)."""
        return self.predict_step(batch, step_index, reference)[1]

    def log_prob(self, batch: Trajectories, step_index: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """(B,) log p(x_{t-1} | x_t) of the recorded transitions at `step_index` (see transition)."""
        rows = torch.arange(len(batch), device=step_index.device)
        return gaussian_log_prob(batch.next_latents[rows, step_index], self.transition(batch, step_index, reference))

    def denoise(self, samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target), both (B, C, h, w): the prediction at the forward-noised samples x_0
        (B, C, h, w), guided as sampling guides it (guided=False: the conditional branch alone), and its
        regression target (noise, velocity or x_0, as the model predicts)."""
        noisy, target = self.sampler.forward_noising(samples, noise, timesteps)
        return self.predict(noisy, timesteps, conditioning, guided=guided), target
