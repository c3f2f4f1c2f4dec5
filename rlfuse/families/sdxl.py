"""The Stable Diffusion XL family: the SD family's UNet sampled by the same DDIM step, with SDXL's
conditioning (two CLIP text encoders, a pooled prompt, size and crop numbers) and its pipeline class
for loading and export (StableDiffusionXLPipeline)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from rlfuse.dynamics.ddim import DDIMSampler
from rlfuse.families.common import PromptCache, check_source, fuse_lora_weights, load_pipeline
from rlfuse.families.sd import StableDiffusion, resolution_multiple
from rlfuse.families.tiny import build_tiny_sdxl, tiny_sdxl_scheduler
from rlfuse.trajectories import Conditioning


def load_scheduler(pretrained: str | None, revision: str | None = None) -> DDIMScheduler:
    """The DDIMScheduler of the pipeline's schedule, from the scheduler's config alone (no weights read).
    SDXL ships an EulerDiscreteScheduler; its config keeps the DDIM keys (clip_sample, set_alpha_to_one)."""
    if pretrained is None:
        return DDIMScheduler.from_config(tiny_sdxl_scheduler().config)
    config = DDIMScheduler.load_config(os.path.expanduser(pretrained), subfolder="scheduler", revision=revision)
    return DDIMScheduler.from_config(config)


def sampler_for_checks(pretrained: str | None, revision: str | None, eta: float,
                       sde_type: str | None = None, resolution: int | None = None) -> DDIMSampler:
    """The sampler the run will use, from the scheduler's config alone: for start-up checks."""
    return DDIMSampler(load_scheduler(pretrained, revision), eta)


def size_conditioning(resolution: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(count, 6) SDXL's micro-conditioning of a square image sampled whole: original size (h, w), crop
    top-left (0, 0), target size (h, w), as StableDiffusionXLPipeline builds add_time_ids (Podell et
    al. 2023, "SDXL", section 2.2: size- and crop-conditioning)."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return row.expand(count, -1)


class StableDiffusionXL(StableDiffusion):
    """The model-family protocol (rlfuse.families.ModelFamily) for StableDiffusionXLPipeline checkpoints.

    What it shares with the SD family (inherited): the UNet as the network, the DDIM sampler on the
    checkpoint's own schedule, latent shapes, fusing LoRA folders, the full pipeline export.

    network: the UNet; frozen: the VAE and both text encoders. Conditioning (B rows each):
    prompt_embeds (B, L, D1 + D2) the penultimate hidden states of the two CLIP encoders side by side
    (77 x 2048 for SDXL base), pooled_embeds (B, P) the second encoder's projected pooled output
    (1280), time_ids (B, 6) the size and crop conditioning; negative_embeds and negative_pooled_embeds
    the unconditional branch of classifier-free guidance: zeros when the pipeline's config says
    force_zeros_for_empty_prompt (SDXL base does), otherwise the empty prompt's encoding, as
    StableDiffusionXLPipeline.encode_prompt does without a negative prompt.

    Resolution. The size conditioning holds the image size: the family takes model.resolution at load
    (one of its options), as the pipeline takes height and width; without it, the UNet's sample size
    times the VAE's factor (1024 for SDXL base).
    """

    name = "sdxl"
    options = ("resolution", "prompt_cache")

    def __init__(self, pipeline: StableDiffusionXLPipeline, resolution: int | None = None, prompt_cache: int = 0):
        super().__init__(pipeline)
        self.resolution = resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        self.cache = PromptCache(prompt_cache)
        self._negative: Conditioning | None = None

    @classmethod
    def load(cls, pretrained: str | None, revision: str | None = None, variant: str | None = None,
             tiny_seed: int = 0, lora_weights: str | list[str] | None = None, resolution: int | None = None,
             prompt_cache: int = 0) -> StableDiffusionXL:
        """The pipeline from a hub id or local folder, or the tiny one when pretrained is None, with the
        LoRA folders of lora_weights fused into its UNet, in order; prompt_cache: how many prompts'
        conditioning to keep (PromptCache).

        The scheduler is replaced by a DDIMScheduler of the checkpoint's schedule (SDXL ships an Euler
        scheduler; the sampler's log-probs are DDIM's). Raises UserError (one line, what to do) when
        the weights are neither local nor cached.
        """
        if pretrained is None:
            pipeline = build_tiny_sdxl(seed=tiny_seed)
        else:
            pipeline = load_pipeline(StableDiffusionXLPipeline, pretrained, revision, variant)
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        return fuse_lora_weights(cls(pipeline, resolution, prompt_cache), lora_weights)

    # -- parts

    @property
    def frozen(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.text_encoder_2]

    # -- conditioning, prediction, decoding

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """{prompt_embeds (U, L, D1 + D2), pooled_embeds (U, P)} of U prompts, as the pipeline encodes them."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=prompts, device=device,
                                                           do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_embeds": pooled}

    def _negative_for(self, device: torch.device) -> Conditioning:
        """The unconditional branch's (1, L, D) states and (1, P) pooled output, made once per device."""
        if self._negative is None or self._negative["prompt_embeds"].device != device:
            empty = self._encode([""], device)
            if self.pipeline.config.force_zeros_for_empty_prompt:
                empty = {name: torch.zeros_like(value) for name, value in empty.items()}
            self._negative = Conditioning(empty)
        return self._negative

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The conditioning of B prompts; each distinct prompt is encoded once, and once per run with the
        prompt cache. See the class docstring for the names and shapes."""
        encoded = self.cache.encode(prompts, device, self._encode)
        embeds, pooled = encoded["prompt_embeds"], encoded["pooled_embeds"]
        negative, count = self._negative_for(embeds.device), len(prompts)
        return Conditioning({
            "prompt_embeds": embeds, "pooled_embeds": pooled,
            "time_ids": size_conditioning(self.resolution, count, pooled.dtype, pooled.device),
            "negative_embeds": negative["prompt_embeds"].expand(count, -1, -1),
            "negative_pooled_embeds": negative["pooled_embeds"].expand(count, -1),
        })

    def predict(self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) classifier-free guided noise prediction uncond + scale * (cond - uncond), both
        branches in one batched forward, the UNet called as StableDiffusionXLPipeline calls it (pooled
        text and size conditioning as added_cond_kwargs). latents (B, C, h, w); timesteps (B,) or scalar."""
        prompt_embeds, pooled, time_ids = (conditioning[name] for name in ("prompt_embeds", "pooled_embeds",
                                                                           "time_ids"))
        if guidance_scale == 1.0:
            return network(latents, timesteps, encoder_hidden_states=prompt_embeds,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        prediction = network(
            torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([conditioning["negative_embeds"], prompt_embeds]),
            added_cond_kwargs={"text_embeds": torch.cat([conditioning["negative_pooled_embeds"], pooled]),
                               "time_ids": torch.cat([time_ids, time_ids])},
        ).sample
        uncond, cond = prediction.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1] (scaling_factor from the VAE's config:
        0.13025 for SDXL). SDXL's VAE overflows in fp16: a VAE whose config says force_upcast, cast to
        fp16 with the frozen parts, is moved to fp32 here for good, as StableDiffusionXLPipeline upcasts it."""
        vae = self.pipeline.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        return super().decode(latents)

    # -- LoRA export

    def export_lora(self, network: torch.nn.Module, folder: Path) -> None:
        """Write the UNet's LoRA in the diffusers format with its adapter config (alpha) as metadata:
        StableDiffusionXLPipeline.load_lora_weights(folder) loads it at its scale."""
        from peft.utils import get_peft_model_state_dict

        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(network), safe_serialization=True,
            unet_lora_adapter_metadata=network.peft_config["default"].to_dict())


# The start-up checks, reachable from the family (config.py picks the family by model.family).
StableDiffusionXL.check_source = staticmethod(check_source)
StableDiffusionXL.resolution_multiple = staticmethod(resolution_multiple)
StableDiffusionXL.sampler_for_checks = staticmethod(sampler_for_checks)
