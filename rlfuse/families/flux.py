"""The FLUX.1 family: rectified-flow transformers with joint and single blocks, CLIP's pooled output and
T5's states as the prompt, 2x2 latent patches packed into tokens (FluxPipeline), sampled by the flow
step with log-probabilities on FluxPipeline's resolution-shifted schedule."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from rlfuse.dynamics.flow import FlowSampler
from rlfuse.errors import UserError
from rlfuse.families.common import (PromptCache, check_source, decode_shifted, export_transformer_lora,
                                    fuse_lora_folder, fuse_lora_weights, load_pipeline, save_pipeline_with)
from rlfuse.families.tiny import TINY_VAE_BLOCKS, build_tiny_flux, tiny_flux_scheduler
from rlfuse.trajectories import Conditioning

# The joint blocks' attention projections (image and text streams), whose to_q/to_k/to_v suffixes also
# match the single blocks' attention, plus the single blocks' MLP input projection. (The single blocks'
# proj_out is left out: the suffix would also catch the transformer's final output projection.)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "proj_mlp")
# FluxPipeline.default_sample_size: the latent side it samples when no height is given (1024 px at VAE factor 8).
DEFAULT_SAMPLE_SIZE = 128


def load_scheduler(pretrained: str | None, revision: str | None = None) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline's flow-matching scheduler from its config alone (no weights read)."""
    if pretrained is None:
        return tiny_flux_scheduler()
    config = FlowMatchEulerDiscreteScheduler.load_config(os.path.expanduser(pretrained), subfolder="scheduler",
                                                         revision=revision)
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def vae_factor(pretrained: str | None, revision: str | None = None) -> int:
    """Pixels per latent along a side: 2 ** (VAE levels - 1) (8 for FLUX.1, 2 for the tiny pipeline)."""
    if pretrained is None:
        return 2 ** (len(TINY_VAE_BLOCKS) - 1)
    vae = AutoencoderKL.load_config(os.path.expanduser(pretrained), subfolder="vae", revision=revision)
    return 2 ** (len(vae["block_out_channels"]) - 1)


def resolution_multiple(pretrained: str | None, revision: str | None = None) -> int:
    """Image sides must be multiples of the VAE's factor times 2: FLUX packs 2x2 latent patches into a token."""
    return vae_factor(pretrained, revision) * 2


def schedule_shift(scheduler: FlowMatchEulerDiscreteScheduler, resolution: int, factor: int) -> float | None:
    """mu of the scheduler's resolution-dependent shift at resolution x resolution images, computed as
    FluxPipeline does (diffusers pipeline_flux.py, calculate_shift of the packed image-token count,
    linear from base_shift at base_image_seq_len to max_shift at max_image_seq_len); None for a
    scheduler without dynamic shifting (FLUX.1-schnell's: a fixed shift, mu unused)."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return None
    image_tokens = (resolution // (factor * 2)) ** 2
    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


class FluxSampler(FlowSampler):
    """The flow sampler on FluxPipeline's sigma grid: linspace(1, 1/T, T), shifted by mu, then 0.

    FluxPipeline passes these sigmas to set_timesteps (diffusers pipeline_flux.py, step 5, which
    Flow-GRPO's FLUX pipeline copies); the scheduler's own grid would end at sigma 1/1000 instead
    (for T = 4 before the shift: 1, .75, .5, .25 against 1, .67, .33, .001).
    """

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(T,) the timesteps (sigma * 1000) of a num_steps chain, noisiest first."""
        use_flow_sigmas = self.scheduler.config.get("use_flow_sigmas", False)
        sigmas = None if use_flow_sigmas else np.linspace(1.0, 1 / num_steps, num_steps)
        self.scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas, mu=self.mu)
        return self.scheduler.timesteps


def sampler_for_checks(pretrained: str | None, revision: str | None, eta: float, sde_type: str | None = None,
                       resolution: int | None = None) -> FluxSampler:
    """The sampler the start-up checks read step stds from; resolution None: FluxPipeline's default size."""
    scheduler, factor = load_scheduler(pretrained, revision), vae_factor(pretrained, revision)
    resolution = resolution or DEFAULT_SAMPLE_SIZE * factor
    return FluxSampler(scheduler, eta, sde_type or "sde", mu=schedule_shift(scheduler, resolution, factor))


class Flux:
    """The model-family protocol (rlfuse.families.ModelFamily) for FluxPipeline checkpoints (FLUX.1-dev, -schnell).

    network: the FluxTransformer2DModel; frozen: the VAE, CLIP and T5. Conditioning: prompt_embeds
    (B, L, D) T5's states, pooled_embeds (B, P) CLIP's pooled output, text_ids (B, L, 3) their
    position ids (zeros, as FluxPipeline; one row per sample so that Conditioning can be indexed).

    Guidance. FLUX.1-dev is guidance-distilled: CFG's effect is an input of the transformer (the
    guidance embedding) and it is sampled with one forward per step, never with a negative prompt.
    That value is model.guidance (3.5: FluxPipeline's default and Flow-GRPO's FLUX configs, which pass
    it as sample.guidance_scale), fixed for the family, so sampling, training (Policy re-scores with
    the same forward) and Policy.denoise's conditional prediction all see the same model. predict's
    guidance_scale, classifier-free guidance in the other families, is not used: FLUX is not
    sampled with CFG. FLUX.1-schnell has no guidance embedding (guidance_embeds false): guidance is
    ignored there, as FluxPipeline ignores its guidance_scale.

    Latents. Rollouts keep ordinary unpacked latents (B, 16, h, w), so the sampler and Trajectories
    see the shapes of the other families; predict packs them into (B, h/2 * w/2, 64) tokens and
    unpacks the velocity.

    Schedule. FLUX's timesteps are shifted by mu, which grows with the image-token count. The family
    takes the resolution at load (model.resolution, one of its options: load_family passes it), since
    the protocol's sampler(eta, sde_type) is built before latent_shape(resolution) is asked; without
    it, FluxPipeline's default size (128 latents a side).
    """

    name = "flux"
    default_lora_targets = DEFAULT_LORA_TARGETS
    options = ("max_sequence_length", "guidance", "resolution", "prompt_cache")
    sde_types = (None, "sde", "cps")  # None: "sde"

    def __init__(self, pipeline: FluxPipeline, max_sequence_length: int = 512, guidance: float | None = 3.5,
                 resolution: int | None = None, prompt_cache: int = 0):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.cache = PromptCache(prompt_cache)
        self.guidance_embeds = bool(pipeline.transformer.config.guidance_embeds)
        if self.guidance_embeds and guidance is None:
            raise UserError("model.guidance=null: this FLUX transformer is guidance-distilled (guidance_embeds); "
                            "give its guidance value, e.g. 3.5 for FLUX.1-dev")
        self.guidance = guidance
        # mu depends on the image-token count; sampler() is built before latent_shape() is asked, so the
        # resolution comes at load (model.resolution through options), as FluxPipeline takes height and width.
        self.resolution = resolution or DEFAULT_SAMPLE_SIZE * pipeline.vae_scale_factor

    @classmethod
    def load(cls, pretrained: str | None, revision: str | None = None, variant: str | None = None,
             tiny_seed: int = 0, lora_weights: str | list[str] | None = None, max_sequence_length: int = 512,
             guidance: float | None = 3.5, resolution: int | None = None, prompt_cache: int = 0) -> Flux:
        """The pipeline from a hub id or folder (with its T5: FLUX reads the prompt through it), or the
        tiny one when pretrained is None; LoRA folders of lora_weights fused in order; prompt_cache:
        how many prompts' conditioning to keep (PromptCache)."""
        if pretrained is None:
            pipeline = build_tiny_flux(seed=tiny_seed)
        else:
            pipeline = load_pipeline(FluxPipeline, pretrained, revision, variant)
        pipeline.set_progress_bar_config(disable=True)
        return fuse_lora_weights(cls(pipeline, max_sequence_length, guidance, resolution, prompt_cache), lora_weights)

    # -- parts

    @property
    def network(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def frozen(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.text_encoder_2]

    def sampler(self, eta: float, sde_type: str | None = None) -> FluxSampler:
        """The flow sampler on FluxPipeline's schedule for images of self.resolution."""
        scheduler = self.pipeline.scheduler
        mu = schedule_shift(scheduler, self.resolution, self.pipeline.vae_scale_factor)
        return FluxSampler(scheduler, eta, sde_type or "sde", mu=mu)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(16, h, w) unpacked latents; the side must be a multiple of the VAE's factor times 2 (the packing)."""
        factor = self.pipeline.vae_scale_factor * 2
        if resolution % factor:
            raise UserError(f"model.resolution={resolution}: must be a multiple of {factor} (the VAE's factor times "
                            f"FLUX's 2x2 latent packing)")
        side = resolution // self.pipeline.vae_scale_factor
        return self.pipeline.transformer.config.in_channels // 4, side, side

    # -- conditioning, prediction, decoding

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(T5 states (U, L, D), CLIP pooled (U, P), text ids (L, 3)) of U prompts, as FluxPipeline encodes them."""
        return self.pipeline.encode_prompt(prompt=prompts, prompt_2=prompts, device=device,
                                           max_sequence_length=self.max_sequence_length)

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The conditioning of B prompts; each distinct prompt is encoded once (T5-XXL is the largest
        part), and once per run with the prompt cache."""
        encoded = self.cache.encode(prompts, device, lambda texts, where: dict(
            zip(("prompt_embeds", "pooled_embeds", "text_ids"), self._text_rows(texts, where))))
        return Conditioning(encoded)

    def _text_rows(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(embeds, pooled, text_ids) with a row per prompt (text_ids is shared: repeated)."""
        embeds, pooled, text_ids = self._encode(prompts, device)
        return embeds, pooled, text_ids.expand(len(prompts), -1, -1)

    def _guidance(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """(B,) the distilled guidance value, or None without a guidance embedding (as FluxPipeline.__call__)."""
        if not self.guidance_embeds:
            return None
        return torch.full((batch,), float(self.guidance), device=device, dtype=torch.float32)

    def predict(self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) the velocity at latents (B, C, h, w), called as FluxPipeline calls the transformer:
        2x2 patches packed into (B, h/2 * w/2, 4C) tokens with their position ids, timestep / 1000, the
        distilled guidance model.guidance. timesteps: (B,) or scalar on the scheduler's 0-1000 scale.
        guidance_scale (classifier-free guidance) is not used: see the class docstring."""
        batch, channels, height, width = latents.shape
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        packed = FluxPipeline._pack_latents(latents.contiguous(), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device,
                                                           latents.dtype)
        velocity = network(
            hidden_states=packed, timestep=timesteps.to(latents.dtype) / 1000,
            guidance=self._guidance(batch, latents.device), pooled_projections=conditioning["pooled_embeds"],
            encoder_hidden_states=conditioning["prompt_embeds"], txt_ids=conditioning["text_ids"][0],
            img_ids=image_ids, return_dict=False,
        )[0]
        factor = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * factor, width * factor, factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1] (the VAE's scaling and shift undone)."""
        return decode_shifted(self.pipeline.vae, latents)

    # -- LoRA folders and export

    def fuse_lora(self, folder: Path) -> None:
        fuse_lora_folder(self.pipeline, folder)

    def export_lora(self, network: torch.nn.Module, folder: Path) -> None:
        export_transformer_lora(FluxPipeline, network, folder)

    def export_pipeline(self, network: torch.nn.Module, folder: Path) -> None:
        save_pipeline_with(self.pipeline, "transformer", network, folder)


# The start-up checks, reachable from the family (config.py picks the family by model.family).
Flux.check_source = staticmethod(check_source)
Flux.resolution_multiple = staticmethod(resolution_multiple)
Flux.sampler_for_checks = staticmethod(sampler_for_checks)
