"""Trajectories: the one type that flows through the loop, from sampling to the loss."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, per sample: the family's named tensors, each (B, ...).

    Stable Diffusion: prompt_embeds (B, L, D) and negative_embeds (B, L, D). Other families add their
    own (pooled embeddings, text ids); only the family that made it reads inside.
    """

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        return Conditioning({name: value[index] for name, value in self.tensors.items()})

    def clone(self) -> Conditioning:
        return Conditioning({name: value.clone() for name, value in self.tensors.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning({name: torch.cat([p.tensors[name] for p in parts]) for name in parts[0].tensors})


@dataclass
class Trajectories:
    """A batch of B sampled denoising chains of T steps each.

    Every tensor field has batch as its first dimension, so a batch can be indexed, shuffled and
    concatenated field by field. Shapes:
        conditioning:  Conditioning of B samples (the family's text states)
        latents:       (B, T, C, h, w) x_t before each step
        next_latents:  (B, T, C, h, w) x_{t-1} after each step
        timesteps:     (B, T) long, the scheduler timestep of each step
        log_probs:     (B, T) log p(x_{t-1} | x_t) at sampling time
        rewards:       (B,) float reward of the final image
        reward_terms:  (B, R) float unweighted terms of a combined reward; R = 0 for a single reward
        advantages:    (B,) float, filled in after rewarding
        prompts:       B strings
        sample_ids:    (B,) long, each sample's index in the epoch's batch over all processes;
                       the same sample gets the same id (and seeds) whatever the process count
    A likelihood-free source (clean samples, rlfuse.rollout.Rollout.clean_trajectories) stores only
    x_T in latents (B, 1, ...) and x_0 in next_latents (B, 1, ...), with the T timesteps of the
    chain as the noise levels to train at and zero log_probs (B, T).
    """

    conditioning: Conditioning
    latents: torch.Tensor
    next_latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    rewards: torch.Tensor
    reward_terms: torch.Tensor
    advantages: torch.Tensor
    prompts: list[str]
    sample_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def __getitem__(self, index: torch.Tensor | slice) -> Trajectories:
        """Select samples by a slice or a (K,) index tensor."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                values[field.name] = value[index]
            elif isinstance(value, Conditioning):
                values[field.name] = value.select(index)
            elif isinstance(index, slice):
                values[field.name] = value[index]
            else:
                values[field.name] = [value[i] for i in index.tolist()]
        return Trajectories(**values)

    def with_advantages(self, advantages: torch.Tensor) -> Trajectories:
        return replace(self, advantages=advantages.to(self.rewards.device, self.rewards.dtype))

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        values = {}
        for field in fields(Trajectories):
            first = getattr(parts[0], field.name)
            if isinstance(first, torch.Tensor):
                values[field.name] = torch.cat([getattr(p, field.name) for p in parts])
            elif isinstance(first, Conditioning):
                values[field.name] = Conditioning.cat([getattr(p, field.name) for p in parts])
            else:
                values[field.name] = [item for p in parts for item in getattr(p, field.name)]
        return Trajectories(**values)
