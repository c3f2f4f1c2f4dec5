"""The Stable Diffusion 3 / 3.5 family: rectified-flow MMDiT transformers with two CLIP text encoders
and an optional T5 (StableDiffusion3Pipeline), sampled by the flow step with log-probabilities."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from rlfuse.dynamics.flow import FlowSampler
from rlfuse.errors import UserError
from rlfuse.families.common import (PromptCache, check_source, decode_shifted, export_transformer_lora,
                                    fuse_lora_folder, fuse_lora_weights, load_pipeline, save_pipeline_with)
from rlfuse.families.tiny import TINY_VAE_BLOCKS, build_tiny_sd3
from rlfuse.trajectories import Conditioning

# The attention projections of the joint blocks (image and text streams), as Flow-GRPO's LoRA
# (yifan123/flow_grpo scripts/train_sd3.py); the suffixes also match SD3.5's second attention (attn2).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def load_scheduler(pretrained: str | None, revision: str | None = None) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline's flow-matching scheduler from its config alone (no weights read)."""
    if pretrained is None:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    config = FlowMatchEulerDiscreteScheduler.load_config(os.path.expanduser(pretrained), subfolder="scheduler",
                                                         revision=revision)
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def sampler_for_checks(pretrained: str | None, revision: str | None, eta: float,
                       sde_type: str | None = None, resolution: int | None = None) -> FlowSampler:
    return FlowSampler(load_scheduler(pretrained, revision), eta, sde_type or "sde")


def resolution_multiple(pretrained: str | None, revision: str | None = None) -> int:
    """Image sides must be multiples of the VAE's factor times the transformer's patch size."""
    if pretrained is None:
        return 2 ** (len(TINY_VAE_BLOCKS) - 1) * 2
    path = os.path.expanduser(pretrained)
    vae = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
    transformer = SD3Transformer2DModel.load_config(path, subfolder="transformer", revision=revision)
    return 2 ** (len(vae["block_out_channels"]) - 1) * transformer["patch_size"]


class StableDiffusion3:
    """The model-family protocol (rlfuse.families.ModelFamily) for StableDiffusion3Pipeline checkpoints.

    network: the SD3Transformer2DModel; frozen: the VAE and the text encoders. Conditioning:
    prompt_embeds (B, L, D) (CLIP states beside T5's, or zeros without T5) and pooled_embeds (B, P),
    and the empty prompt's negative_embeds and negative_pooled_embeds for classifier-free guidance.
    """

    name = "sd3"
    default_lora_targets = DEFAULT_LORA_TARGETS
    options = ("text_encoder_3", "max_sequence_length", "prompt_cache")
    sde_types = (None, "sde", "cps")  # None: "sde"

    def __init__(self, pipeline: StableDiffusion3Pipeline, max_sequence_length: int = 256, prompt_cache: int = 0):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.cache = PromptCache(prompt_cache)
        self._negative: Conditioning | None = None

    @classmethod
    def load(cls, pretrained: str | None, revision: str | None = None, variant: str | None = None,
             tiny_seed: int = 0, lora_weights: str | list[str] | None = None, text_encoder_3: bool = True,
             max_sequence_length: int = 256, prompt_cache: int = 0) -> StableDiffusion3:
        """The pipeline from a hub id or folder (without T5 when text_encoder_3 is false: about 10 GB
        less), or the tiny one when pretrained is None; LoRA folders of lora_weights fused in order;
        prompt_cache: how many prompts' conditioning to keep (PromptCache)."""
        if pretrained is None:
            pipeline = build_tiny_sd3(seed=tiny_seed)
        else:
            without_t5 = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
            pipeline = load_pipeline(StableDiffusion3Pipeline, pretrained, revision, variant, **without_t5)
        pipeline.set_progress_bar_config(disable=True)
        return fuse_lora_weights(cls(pipeline, max_sequence_length, prompt_cache), lora_weights)

    # -- parts

    @property
    def network(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def frozen(self) -> list[torch.nn.Module]:
        encoders = [self.pipeline.text_encoder, self.pipeline.text_encoder_2, self.pipeline.text_encoder_3]
        return [self.pipeline.vae, *(e for e in encoders if e is not None)]

    def sampler(self, eta: float, sde_type: str | None = None) -> FlowSampler:
        return FlowSampler(self.pipeline.scheduler, eta, sde_type or "sde")

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size
        if resolution % factor:
            raise UserError(f"model.resolution={resolution}: must be a multiple of {factor} (the VAE's factor times "
                            f"the patch size)")
        side = resolution // self.pipeline.vae_scale_factor
        return self.pipeline.transformer.config.in_channels, side, side

    # -- conditioning, prediction, decoding

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The conditioning of B prompts; each distinct prompt is encoded once (T5-XXL is the largest
        part), and once per run with the prompt cache."""
        encoded = self.cache.encode(prompts, device, lambda texts, where: dict(
            zip(("prompt_embeds", "pooled_embeds"), self._encode(texts, where))))
        embeds, pooled = encoded["prompt_embeds"], encoded["pooled_embeds"]
        if self._negative is None or self._negative["prompt_embeds"].device != embeds.device:
            negative, negative_pooled = self._encode([""], device)
            self._negative = Conditioning({"prompt_embeds": negative, "pooled_embeds": negative_pooled})
        count = len(prompts)
        return Conditioning({
            "prompt_embeds": embeds, "pooled_embeds": pooled,
            "negative_embeds": self._negative["prompt_embeds"].expand(count, -1, -1),
            "negative_pooled_embeds": self._negative["pooled_embeds"].expand(count, -1),
        })

    def predict(self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """(B, C, h, w) the guided velocity uncond + scale * (cond - uncond), both branches in one
        batched forward. timesteps: (B,) or scalar, on the scheduler's 0-1000 scale."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if guidance_scale == 1.0:
            return network(hidden_states=latents, timestep=timesteps, encoder_hidden_states=conditioning["prompt_embeds"],
                           pooled_projections=conditioning["pooled_embeds"]).sample
        prediction = network(
            hidden_states=torch.cat([latents, latents]), timestep=torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([conditioning["negative_embeds"], conditioning["prompt_embeds"]]),
            pooled_projections=torch.cat([conditioning["negative_pooled_embeds"], conditioning["pooled_embeds"]]),
        ).sample
        uncond, cond = prediction.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1] (the VAE's scaling and shift undone)."""
        return decode_shifted(self.pipeline.vae, latents)

    # -- LoRA folders and export

    def fuse_lora(self, folder: Path) -> None:
        fuse_lora_folder(self.pipeline, folder)

    def export_lora(self, network: torch.nn.Module, folder: Path) -> None:
        export_transformer_lora(StableDiffusion3Pipeline, network, folder)

    def export_pipeline(self, network: torch.nn.Module, folder: Path) -> None:
        save_pipeline_with(self.pipeline, "transformer", network, folder)


# The start-up checks, reachable from the family (config.py picks the family by model.family).
StableDiffusion3.check_source = staticmethod(check_source)
StableDiffusion3.resolution_multiple = staticmethod(resolution_multiple)
StableDiffusion3.sampler_for_checks = staticmethod(sampler_for_checks)
