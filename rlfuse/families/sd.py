"""The Stable Diffusion 1.x / 2.x family: load a pipeline (hub id, local folder, or the tiny one built
in code), encode prompts, predict with classifier-free guidance, decode, and export what was trained."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from rlfuse.dynamics.ddim import DDIMSampler
from rlfuse.errors import UserError
from rlfuse.families.common import LORA_FILE, check_source, fuse_lora_folder, fuse_lora_weights, save_pipeline_with  # noqa: F401
from rlfuse.families.tiny import TINY_VAE_BLOCKS, build_tiny_pipeline, tiny_scheduler
from rlfuse.trajectories import Conditioning

# Attention projections: the LoRA targets of diffusers' text-to-image LoRA example and of DDPO.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ----------------------------------------------------------------------------- start-up checks (no weights read)


def load_scheduler(pretrained: str | None, revision: str | None = None) -> DDIMScheduler:
    """The DDIMScheduler load_pipeline would give, from the scheduler's config alone (no weights read):
    for start-up checks that depend on the noise schedule. The source must have passed check_source."""
    if pretrained is None:
        return tiny_scheduler()
    config = DDIMScheduler.load_config(os.path.expanduser(pretrained), subfolder="scheduler", revision=revision)
    return DDIMScheduler.from_config(config)


def sampler_for_checks(pretrained: str | None, revision: str | None, eta: float,
                       sde_type: str | None = None, resolution: int | None = None) -> DDIMSampler:
    """The sampler the run will use, from the scheduler's config alone: for start-up checks."""
    return DDIMSampler(load_scheduler(pretrained, revision), eta)


def resolution_multiple(pretrained: str | None, revision: str | None = None) -> int:
    """The VAE's down-sampling factor, from its config alone: image sides must be multiples of it
    (latents are resolution / factor; anything else would be floored without a word)."""
    if pretrained is None:
        blocks = TINY_VAE_BLOCKS
    else:
        blocks = AutoencoderKL.load_config(os.path.expanduser(pretrained), subfolder="vae",
                                           revision=revision)["block_out_channels"]
    return 2 ** (len(blocks) - 1)


# ----------------------------------------------------------------------------- the family


class StableDiffusion:
    """The model-family protocol (rlfuse.families.ModelFamily) for StableDiffusionPipeline checkpoints.

    network: the UNet (the trained part); frozen: the VAE and the CLIP text encoder.
    Conditioning: prompt_embeds (B, L, D) and negative_embeds (B, L, D), the empty prompt's states
    for classifier-free guidance.
    """

    name = "sd"
    default_lora_targets = DEFAULT_LORA_TARGETS
    options = ()
    sde_types = (None,)  # DDIM: eta is its only sampler setting

    def __init__(self, pipeline: StableDiffusionPipeline):
        self.pipeline = pipeline
        self._negative: torch.Tensor | None = None  # (1, L, D) the empty prompt, encoded once

    @classmethod
    def load(cls, pretrained: str | None, revision: str | None = None, variant: str | None = None,
             tiny_seed: int = 0, lora_weights: str | list[str] | None = None) -> StableDiffusion:
        """The pipeline from a hub id or local folder, or the tiny one when pretrained is None, with the
        LoRA folders of lora_weights (an earlier round's training) fused into its UNet, in order.

        The scheduler is replaced by a DDIMScheduler with the checkpoint's own configuration
        (prediction type, beta schedule, timestep spacing), since the sampler's log-probs are DDIM's.
        Raises UserError (one line, what to do) when the weights are neither local nor cached.
        """
        if pretrained is None:
            pipeline = build_tiny_pipeline(seed=tiny_seed)
        else:
            pretrained = os.path.expanduser(pretrained)
            try:
                pipeline = StableDiffusionPipeline.from_pretrained(
                    pretrained, revision=revision, variant=variant, safety_checker=None, requires_safety_checker=False
                )
            except (OSError, ValueError) as error:
                where = "the folder does not hold a diffusers pipeline (model_index.json)" if os.path.isdir(pretrained) \
                    else "it is not a local folder and not in the Hugging Face cache"
                raise UserError(
                    f"model.pretrained={pretrained!r}: cannot load ({where}); download it with "
                    f"`hf download {pretrained}` or set model.pretrained to a local pipeline folder "
                    f"[{type(error).__name__}]"
                ) from None
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        return fuse_lora_weights(cls(pipeline), lora_weights)

    # -- parts

    @property
    def network(self) -> torch.nn.Module:
        return self.pipeline.unet

    @network.setter
    def network(self, module: torch.nn.Module) -> None:
        self.pipeline.unet = module

    @property
    def frozen(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder]

    def sampler(self, eta: float, sde_type: str | None = None) -> DDIMSampler:
        return DDIMSampler(self.pipeline.scheduler, eta)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a resolution x resolution image."""
        factor = self.pipeline.vae_scale_factor
        if resolution % factor:
            raise UserError(f"model.resolution={resolution}: must be a multiple of {factor} (the VAE's factor); "
                            f"use {resolution // factor * factor} or {(resolution // factor + 1) * factor}")
        return self.pipeline.unet.config.in_channels, resolution // factor, resolution // factor

    # -- conditioning, prediction, decoding

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(B, L, D) last hidden states of the text encoder, padded to the tokenizer's max length."""
        tokenizer = self.pipeline.tokenizer
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                           return_tensors="pt").input_ids.to(device)
        return self.pipeline.text_encoder(tokens)[0]

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The conditioning of B prompts; each distinct prompt is encoded once."""
        unique = sorted(set(prompts))
        unique_embeds = self._encode(unique, device)
        prompt_embeds = unique_embeds[[unique.index(p) for p in prompts]]
        if self._negative is None or self._negative.device != prompt_embeds.device:
            self._negative = self._encode([""], device)
        negative_embeds = self._negative.expand(len(prompts), -1, -1)
        return Conditioning({"prompt_embeds": prompt_embeds, "negative_embeds": negative_embeds})

    def predict(self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) classifier-free guided prediction uncond + scale * (cond - uncond) (Ho & Salimans
        2022), both branches in one batched forward. latents (B, C, h, w); timesteps (B,) or scalar."""
        prompt_embeds = conditioning["prompt_embeds"]
        if guidance_scale == 1.0:
            return network(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        prediction = network(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([conditioning["negative_embeds"], prompt_embeds]),
        ).sample
        uncond, cond = prediction.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1]."""
        vae = self.pipeline.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- LoRA folders and export

    def fuse_lora(self, folder: Path) -> None:
        """Add a diffusers-format LoRA (export_lora's folder) into the UNet's weights for good."""
        fuse_lora_folder(self.pipeline, folder)

    def export_lora(self, network: torch.nn.Module, folder: Path) -> None:
        """Write the UNet's LoRA in the diffusers format: pipeline.load_lora_weights(folder) loads it."""
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(network)
        # The adapter config travels as metadata: without it the loader guesses alpha = rank and infers
        # the targets from the keys, which loses the scale whenever alpha != rank.
        metadata = network.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata)

    def export_pipeline(self, network: torch.nn.Module, folder: Path) -> None:
        """Write a full pipeline folder holding the fine-tuned UNet: from_pretrained(folder) loads it."""
        save_pipeline_with(self.pipeline, "unet", network, folder)


# The start-up checks, reachable from the family (config.py picks the family by model.family).
StableDiffusion.check_source = staticmethod(check_source)
StableDiffusion.resolution_multiple = staticmethod(resolution_multiple)
StableDiffusion.sampler_for_checks = staticmethod(sampler_for_checks)
