"""Sampler steps with log-probabilities: one file per sampler (DDIM here), one protocol for the loop."""

from __future__ import annotations

from typing import Protocol

import torch

from rlfuse.dynamics.ddim import Transition


class Sampler(Protocol):
    """A stochastic sampler whose every step is a Gaussian the policy can score.

    The rollout calls set_timesteps, initial_latents, model_input and step; training calls
    model_input and transition on recorded steps, or forward_noising at training_timesteps (noise levels
    drawn as the model is trained) on clean samples; the start-up checks call step_stds.
    """

    name: str

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor: ...

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor: ...

    def model_input(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             generator: list[torch.Generator] | None = None, stochastic: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def transition(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor) -> Transition: ...

    def forward_noising(self, samples: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def training_timesteps(self, count: int) -> torch.Tensor: ...

    def step_stds(self, num_steps: int) -> torch.Tensor: ...
