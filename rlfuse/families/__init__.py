"""Model families: one file per family of pipelines (load, encode prompts, predict, decode, LoRA
targets, export), one protocol the loop speaks to. `model.family` in conf/model/ picks one."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import torch

from rlfuse.dynamics import Sampler
from rlfuse.errors import UserError
from rlfuse.trajectories import Conditioning

# model.family -> "module:class"
FAMILIES = {"sd": "rlfuse.families.sd:StableDiffusion", "sdxl": "rlfuse.families.sdxl:StableDiffusionXL",
            "sd3": "rlfuse.families.sd3:StableDiffusion3", "flux": "rlfuse.families.flux:Flux"}


class ModelFamily(Protocol):
    """What the loop needs of a text-to-image model family.

    Class-level start-up checks (no weights read): check_source(pretrained, revision, lora_weights),
    sampler_for_checks(pretrained, revision, eta, sde_type, resolution)
    (the resolution matters where the schedule shifts with the image size: FLUX),
    resolution_multiple(pretrained, revision).
    """

    name: str
    default_lora_targets: tuple[str, ...]
    options: tuple[str, ...]             # family-specific keys of conf/model/ that load() takes
    sde_types: tuple[str | None, ...]    # the sample.sde_type values its sampler takes
    network: torch.nn.Module             # the trained denoiser (UNet or transformer)
    frozen: list[torch.nn.Module]        # text encoders and VAE

    @classmethod
    def load(cls, pretrained: str | None, revision: str | None = None, variant: str | None = None,
             tiny_seed: int = 0, lora_weights: str | list[str] | None = None, **options) -> ModelFamily: ...

    def sampler(self, eta: float, sde_type: str | None = None) -> Sampler: ...

    def latent_shape(self, resolution: int) -> tuple[int, ...]: ...

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning: ...

    def predict(self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, guidance_scale: float) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def fuse_lora(self, folder: Path) -> None: ...

    def export_lora(self, network: torch.nn.Module, folder: Path) -> None: ...

    def export_pipeline(self, network: torch.nn.Module, folder: Path) -> None: ...


def family_class(name: str) -> type:
    """The family class of model.family=name; UserError naming the valid ones otherwise."""
    if name not in FAMILIES:
        raise UserError(f"model.family={name!r}: no such model family; valid: {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
