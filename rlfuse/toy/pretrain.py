"""Pretrain the toy text-to-image models (`model=toy`, `model=toy_flow`) on the shapes world, on a CPU.

    python -m rlfuse.toy.pretrain [key=value ...]                 model=toy: rlfuse/conf/pretrain_toy.yaml
    python -m rlfuse.toy.pretrain --config-name pretrain_toy_flow model=toy_flow: rlfuse/conf/pretrain_toy_flow.yaml
    python -m rlfuse.toy.pretrain vae.steps=30 unet.steps=30 ...  smoke size: see SMOKE_OVERRIDES

Two stages, both on images rendered on the fly from seeded scenes of the TRAIN captions of
`split_prompts` (held-out captions are only ever evaluated):

1. VAE. A tiny AutoencoderKL, 32 px images -> 4 x 16 x 16 latents, trained on L1 + L2 reconstruction
   plus a small KL to N(0, I). Measured on held-out scenes: PSNR and the ShapesReward score of the
   reconstructions. Its `scaling_factor` is 1 / std of the latents, as Stable Diffusion sets it, so
   that the diffusion model sees latents of unit variance.
2. Text to image. A UNet2DConditionModel and a CLIPTextModel trained jointly on the epsilon
   objective of DDPM (Ho et al. 2020), with the Stable Diffusion 1.x noise schedule, 10% of
   captions dropped to "" so that classifier-free guidance works (Ho & Salimans 2022), and an
   exponential moving average (EMA) of the weights that is what gets evaluated and saved.

   `architecture: sd3` (model=toy_flow) trains instead an SD3Transformer2DModel and two
   CLIPTextModelWithProjection encoders on the rectified-flow objective of Stable Diffusion 3
   (Esser et al. 2024): x_t = (1 - s) x_0 + s eps, the network predicts the velocity eps - x_0, and
   s is drawn logit-normal (sigmoid of N(0, 1)) then shifted as the sampler's schedule is; the
   text conditioning is what StableDiffusion3Pipeline.encode_prompt computes (penultimate CLIP
   states side by side, pooled projections), without T5. Stage 1 can start from a trained VAE
   (`vae.pretrained`): model=toy_flow reuses model=toy's, with its shift and scale re-measured.

The result is a pipeline folder (`<run>/pipeline`, StableDiffusionPipeline or StableDiffusion3Pipeline,
loads offline with its class's `from_pretrained`) and `<run>/training_record.json` (config, losses,
wall times and the held-out evaluation). Both are written atomically.

This module is the only one here that reads the config; the functions it calls take plain arguments.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlfuse.cli import run_hydra_app
from rlfuse.errors import UserError
from rlfuse.families.tiny import (assemble_pipeline, build_text_encoder, build_tokenizer, build_unet, build_vae,
                                 tiny_scheduler)
from rlfuse.toy.world import CAPTION_KINDS, caption_for, parse_prompt, render, sample_scene, split_prompts

log = logging.getLogger("rlfuse")

# Overrides of the smoke size: the whole pretraining, end to end, in well under a minute (the test
# runs it). The architecture stays the full one, so that folder size and loading are tested for real.
SMOKE_OVERRIDES = [
    "vae.steps=30", "vae.batch_size=8", "vae.eval_images=16", "vae.log_every=10",
    "unet.steps=30", "unet.batch_size=8", "unet.warmup_steps=5", "unet.log_every=10",
    "eval.every=20", "eval.num_prompts=6", "eval.num_steps=4",
]

# The same for model=toy_flow (--config-name pretrain_toy_flow: its VAE is loaded, not trained).
SMOKE_OVERRIDES_FLOW = [
    "vae.eval_images=16", "transformer.steps=30", "transformer.batch_size=8", "transformer.warmup_steps=5",
    "transformer.log_every=10", "eval.every=20", "eval.num_prompts=6", "eval.num_steps=4",
]

# Independent random streams derived from the one seed: np.random.default_rng([seed, stream]).
VAE_DATA, VAE_NOISE, VAE_EVAL, LATENT_STATS, UNET_DATA, UNET_NOISE, EVAL_PROMPTS = range(7)
RECORD_NAME = "training_record.json"
PIPELINE_NAME = "pipeline"


# ----------------------------------------------------------------------------- data


def render_batch(rng: np.random.Generator, prompts: Sequence[str], batch_size: int,
                 image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Draw `batch_size` captions uniformly from `prompts` and render a random scene for each.

    Returns images (B, 3, H, W) float32 in [-1, 1] (the VAE's range) and their B captions.
    """
    scenes, captions = zip(*(sample_scene(rng, image_size, prompts) for _ in range(batch_size)))
    pixels = np.stack([render(scene) for scene in scenes])  # (B, H, W, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, list(captions)


def torch_generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))


# ----------------------------------------------------------------------------- models


def check_vocabulary(tokenizer, prompts: Sequence[str]) -> dict[str, int]:
    """Every word of `prompts` tokenises without the unknown token, and every prompt fits unclipped.

    A truncated caption would silently lose its last words ("... a blue square" -> "... a blue").
    Returns {"vocab_size", "max_caption_tokens" (with start and end tokens), "max_tokens_per_word"}.
    Raises UserError naming the keys to change.
    """
    words = sorted({word for prompt in prompts for word in prompt.split()})
    pieces = {word: tokenizer(word, add_special_tokens=False).input_ids for word in words}
    unknown = [word for word, ids in pieces.items() if tokenizer.unk_token_id in ids]
    if unknown:
        raise UserError(f"the tokenizer does not know {unknown}; raise text_encoder.num_merges")
    longest = max(len(tokenizer(prompt, verbose=False).input_ids) for prompt in prompts)
    if longest > tokenizer.model_max_length:
        raise UserError(f"captions need {longest} tokens but text_encoder.max_length={tokenizer.model_max_length}; "
                        f"raise text_encoder.max_length or text_encoder.num_merges")
    return {"vocab_size": len(tokenizer), "max_caption_tokens": longest,
            "max_tokens_per_word": max(len(ids) for ids in pieces.values())}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def update_ema(ema_module: torch.nn.Module, module: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * current, parameter by parameter."""
    for ema_param, param in zip(ema_module.parameters(), module.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def ema_decay_at(step: int, max_decay: float) -> float:
    """Warm-up of the EMA decay, (1 + step) / (10 + step) capped at max_decay, so that early weights
    (random at step 0) are forgotten quickly; the same rule as diffusers' EMAModel."""
    return min(max_decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------- stage 1: the VAE


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """L1 + L2 reconstruction, per pixel, + kl_weight * KL(q(z|x) || N(0, I)), per latent element.

    L2 is what PSNR measures; L1 keeps the flat colours and sharp edges of the world crisp (L2 alone
    tolerates many small errors). The decoder sees a sample of the posterior, as in Stable Diffusion,
    so that it tolerates the imprecise latents a diffusion model produces.
    images: (B, 3, H, W) in [-1, 1]. Returns (loss, mean squared error in [0, 1] units).
    """
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator)  # (B, 4, H/2, W/2)
    reconstructions = vae.decode(latents).sample
    error = reconstructions - images
    kl_per_element = posterior.kl().mean() / latents[0].numel()  # kl() sums over C, h, w
    loss = error.abs().mean() + error.pow(2).mean() + kl_weight * kl_per_element
    return loss, error.detach().pow(2).mean().item() / 4  # [-1, 1] -> [0, 1] scales squared errors by 1/4


def train_vae(vae, vae_cfg: DictConfig, prompts: Sequence[str], image_size: int, seed: int,
              progress: bool) -> list[dict]:
    """Stage 1: AdamW with cosine decay on vae_loss over freshly rendered scenes of `prompts`.
    Returns the logged losses [{"step", "loss", "psnr_db"}]."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(vae.parameters(), lr=vae_cfg.learning_rate, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, 0, vae_cfg.steps)
    data_rng, noise = np.random.default_rng([seed, VAE_DATA]), torch_generator(seed, VAE_NOISE)
    losses, interval_loss, interval_mse = [], 0.0, 0.0
    started = time.perf_counter()
    vae.train()
    for step in tqdm(range(1, vae_cfg.steps + 1), desc="vae", disable=not progress, mininterval=5):
        images, _ = render_batch(data_rng, prompts, vae_cfg.batch_size, image_size)
        loss, mse = vae_loss(vae, images, vae_cfg.kl_weight, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        interval_loss, interval_mse = interval_loss + loss.item(), interval_mse + mse
        if step % vae_cfg.log_every == 0 or step == vae_cfg.steps:
            count = (step - 1) % vae_cfg.log_every + 1
            losses.append({"step": step, "loss": interval_loss / count, "psnr_db": psnr_db(interval_mse / count)})
            log.info("vae step %d/%d | loss %.4f | train psnr %.2f dB | %.2f steps/s", step, vae_cfg.steps,
                     losses[-1]["loss"], losses[-1]["psnr_db"], step / (time.perf_counter() - started))
            interval_loss, interval_mse = 0.0, 0.0
    return losses


def psnr_db(mean_squared_error: float) -> float:
    """Peak signal-to-noise ratio of images in [0, 1]: 10 log10(1 / MSE)."""
    return 10 * math.log10(1 / max(mean_squared_error, 1e-12))


@torch.no_grad()
def evaluate_vae(vae, prompts: Sequence[str], num_images: int, image_size: int, seed: int,
                 batch_size: int = 64) -> dict[str, float]:
    """Reconstruct `num_images` seeded scenes of `prompts` through the posterior mean.

    Returns psnr_db (over all pixels), reward (mean ShapesReward of the reconstructions with their
    captions) and reward_of_originals (the same for the rendered images: 1.0 unless the detector fails).
    """
    from rlfuse.rewards.shapes import ShapesReward

    reward_fn = ShapesReward()
    rng = np.random.default_rng([seed, VAE_EVAL])
    squared_error, rewards, original_rewards = 0.0, [], []
    for start in range(0, num_images, batch_size):
        images, captions = render_batch(rng, prompts, min(batch_size, num_images - start), image_size)
        reconstructions = vae.decode(vae.encode(images).latent_dist.mode()).sample
        originals01, reconstructions01 = images / 2 + 0.5, (reconstructions / 2 + 0.5).clamp(0, 1)
        squared_error += (reconstructions01 - originals01).pow(2).sum().item()
        rewards.append(reward_fn(reconstructions01, captions).scores)
        original_rewards.append(reward_fn(originals01, captions).scores)
    return {"psnr_db": psnr_db(squared_error / (num_images * images[0].numel())),
            "reward": torch.cat(rewards).mean().item(),
            "reward_of_originals": torch.cat(original_rewards).mean().item()}


@torch.no_grad()
def latent_statistics(vae, prompts: Sequence[str], num_images: int, image_size: int, seed: int) -> tuple[float, float]:
    """(mean, std) of posterior samples of the latents of `num_images` scenes; SD sets scaling_factor = 1 / std."""
    rng, generator = np.random.default_rng([seed, LATENT_STATS]), torch_generator(seed, LATENT_STATS)
    images, _ = render_batch(rng, prompts, num_images, image_size)
    latents = vae.encode(images).latent_dist.sample(generator=generator)
    return latents.mean().item(), latents.std().item()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_pipeline(pipeline, prompts: Sequence[str], num_steps: int, guidance_scale: float, seed: int,
                      batch_size: int, **pipeline_kwargs) -> dict[str, float]:
    """One image per prompt, image i from noise seed `seed + i`, scored by ShapesReward (pipeline_kwargs
    go to the pipeline call, e.g. an SD3 pipeline's max_sequence_length).

    Returns reward (mean score), each criterion of ShapesReward's details (position: mean over
    relation captions only, where it applies), and reward_<kind> for each caption kind present.
    """
    from rlfuse.rewards.shapes import CRITERIA, ShapesReward

    reward_fn = ShapesReward()
    scores, details = [], {name: [] for name in CRITERIA}
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images = pipeline(batch, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                          generator=generators, output_type="pt", **pipeline_kwargs).images  # (B, 3, H, W) in [0, 1]
        output = reward_fn(images, batch)
        scores.append(output.scores)
        for name in CRITERIA:
            details[name].append(output.details[name])
    scores = torch.cat(scores).numpy()
    result = {"reward": float(scores.mean())}
    result.update({name: float(np.nanmean(torch.cat(values).numpy())) for name, values in details.items()})
    kinds = np.array([parse_prompt(prompt).kind for prompt in prompts])
    for kind in CAPTION_KINDS:
        if (kinds == kind).any():
            result[f"reward_{kind}"] = float(scores[kinds == kind].mean())
    return result


def describe(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.3f}" for name, value in metrics.items())


# ----------------------------------------------------------------------------- stage 2: the denoisers


class UNetDenoiser:
    """model=toy: a UNet2DConditionModel and a CLIPTextModel on the epsilon objective of DDPM, with
    Stable Diffusion 1.x's noise schedule; config section `unet`."""

    section = "unet"

    def __init__(self, cfg: DictConfig, tokenizer, latent_channels: int, latent_size: int, prompts: Sequence[str]):
        text_cfg, net_cfg = cfg.text_encoder, cfg.unet
        text_encoder = build_text_encoder(tokenizer, text_cfg.hidden_size, text_cfg.num_layers, text_cfg.num_heads,
                                          text_cfg.intermediate_size)
        unet = build_unet(latent_size, latent_channels, net_cfg.block_out_channels, net_cfg.down_block_types,
                          net_cfg.up_block_types, net_cfg.layers_per_block, net_cfg.attention_head_dim,
                          text_cfg.hidden_size)
        self.modules = {"unet": unet, "text_encoder": text_encoder}
        self.scheduler = tiny_scheduler()
        self.pipeline_kwargs: dict = {}
        self.load_kwargs: dict = {}
        # Token ids of every caption the loop can draw, and of "" (dropped captions): (L,) each.
        self.token_ids = {prompt: tokenizer(prompt, padding="max_length", max_length=text_cfg.max_length,
                                            return_tensors="pt").input_ids[0] for prompt in [*prompts, ""]}

    def assemble(self, vae, tokenizer, modules: dict):
        return assemble_pipeline(vae, modules["text_encoder"], tokenizer, modules["unet"], tiny_scheduler())

    def family(self, pipeline):
        """The pipeline as the training loop sees it (model.family sd)."""
        from rlfuse.families.sd import StableDiffusion

        return StableDiffusion(pipeline)

    def loss(self, latents: torch.Tensor, captions: list[str], noise: torch.Generator) -> torch.Tensor:
        """MSE between the predicted and the true epsilon at a uniform DDPM timestep."""
        epsilon = torch.randn(latents.shape, generator=noise)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=noise)
        noisy_latents = self.scheduler.add_noise(latents, epsilon, timesteps)  # sqrt(a_t) x_0 + sqrt(1 - a_t) eps
        # (B, L, D) last hidden states, as StableDiffusionPipeline.encode_prompt computes them
        text_states = self.modules["text_encoder"](torch.stack([self.token_ids[c] for c in captions]))[0]
        predicted = self.modules["unet"](noisy_latents, timesteps, encoder_hidden_states=text_states).sample
        return F.mse_loss(predicted, epsilon)


class FlowDenoiser:
    """model=toy_flow: an SD3Transformer2DModel and two CLIPTextModelWithProjection encoders (no T5) on
    the rectified-flow objective of Stable Diffusion 3; config section `transformer`."""

    section = "transformer"

    def __init__(self, cfg: DictConfig, tokenizer, latent_channels: int, latent_size: int, prompts: Sequence[str]):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        text_cfg, net_cfg = cfg.text_encoder, cfg.transformer
        encoders = [build_text_encoder(tokenizer, text_cfg.hidden_size, text_cfg.num_layers, text_cfg.num_heads,
                                       text_cfg.intermediate_size, text_cfg.projection_dim) for _ in range(2)]
        # encode_prompt puts the two encoders' states side by side (2 x hidden) and their pooled
        # projections side by side (2 x projection).
        transformer = SD3Transformer2DModel(
            sample_size=latent_size, patch_size=net_cfg.patch_size, in_channels=latent_channels,
            out_channels=latent_channels, num_layers=net_cfg.num_layers, attention_head_dim=net_cfg.attention_head_dim,
            num_attention_heads=net_cfg.num_attention_heads, joint_attention_dim=2 * text_cfg.hidden_size,
            caption_projection_dim=net_cfg.attention_head_dim * net_cfg.num_attention_heads,
            pooled_projection_dim=2 * text_cfg.projection_dim, pos_embed_max_size=latent_size // net_cfg.patch_size,
            qk_norm="rms_norm")
        self.modules = {"transformer": transformer, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=net_cfg.shift)
        self.shift = net_cfg.shift
        self.pipeline_kwargs = {"max_sequence_length": net_cfg.max_sequence_length}
        self.load_kwargs = {"text_encoder_3": None, "tokenizer_3": None}  # SD3 without T5, as diffusers documents
        self.tokenizer = tokenizer
        self._training_pipeline = self.assemble(None, tokenizer, self.modules)

    def assemble(self, vae, tokenizer, modules: dict):
        from diffusers import StableDiffusion3Pipeline

        pipeline = StableDiffusion3Pipeline(
            transformer=modules["transformer"], scheduler=copy.deepcopy(self.scheduler), vae=vae,
            text_encoder=modules["text_encoder"], tokenizer=tokenizer, text_encoder_2=modules["text_encoder_2"],
            tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def family(self, pipeline):
        """The pipeline as the training loop sees it (model.family sd3, model=toy_flow's T5 length)."""
        from rlfuse.families.sd3 import StableDiffusion3

        return StableDiffusion3(pipeline, self.pipeline_kwargs["max_sequence_length"])

    def loss(self, latents: torch.Tensor, captions: list[str], noise: torch.Generator) -> torch.Tensor:
        """MSE between the predicted and the true velocity eps - x_0 at a logit-normal noise level s,
        shifted as FlowMatchEulerDiscreteScheduler shifts its sigmas: s' = shift s / (1 + (shift - 1) s)."""
        epsilon = torch.randn(latents.shape, generator=noise)
        sigma = torch.sigmoid(torch.randn(len(latents), generator=noise))
        sigma = self.shift * sigma / (1 + (self.shift - 1) * sigma)
        s = sigma.view(-1, 1, 1, 1)
        noisy_latents = (1 - s) * latents + s * epsilon
        embeds, _, pooled, _ = self._training_pipeline.encode_prompt(
            prompt=captions, prompt_2=captions, prompt_3=captions, device=latents.device,
            do_classifier_free_guidance=False, max_sequence_length=self.pipeline_kwargs["max_sequence_length"])
        predicted = self.modules["transformer"](hidden_states=noisy_latents, timestep=sigma * 1000,
                                                encoder_hidden_states=embeds, pooled_projections=pooled).sample
        return F.mse_loss(predicted, epsilon - latents)


DENOISERS = {"sd": UNetDenoiser, "sd3": FlowDenoiser}


# Edits of a relation caption: the relation replaced (name -> (old, new)), or the first colour word
# replaced by the next colour of the palette.
RELATION_SWAPS = {"left of -> right of": ("left of", "right of"), "above -> below": ("above", "below"),
                  "left of -> above": ("left of", "above"), "first colour": (None, None)}


def relation_sensitivity(family, prompts: Sequence[str]) -> dict[str, float]:
    """How much the prompt embedding changes, as a fraction of its norm (mean over the relation
    captions of `prompts` that the edit applies to), under each edit of RELATION_SWAPS:
    ||e(edited) - e(caption)|| / ||e(caption)||, e the prompt embeddings (B, L, D) the model family
    conditions the denoiser on in training (rlfuse.families). A text encoder that hardly tells "left
    of" from "right of" gives a small first number, and no denoiser conditioned on it can learn the
    direction."""
    import dataclasses

    from rlfuse.toy.world import COLOURS

    result = {}
    for name, (old, new) in RELATION_SWAPS.items():
        originals, edited = [], []
        for prompt in prompts:
            parsed = parse_prompt(prompt)
            if parsed.kind != "relation" or (old is not None and parsed.relation != old):
                continue
            if old is None:
                first = parsed.objects[0]
                colour = COLOURS[(COLOURS.index(first.colour) + 1) % len(COLOURS)]
                changed = dataclasses.replace(parsed, objects=(dataclasses.replace(first, colour=colour),
                                                               *parsed.objects[1:]))
            else:
                changed = dataclasses.replace(parsed, relation=new)
            originals.append(prompt), edited.append(caption_for(changed))
        if originals:
            with torch.no_grad():
                before, after = (family.encode_prompts(texts, torch.device("cpu"))["prompt_embeds"].flatten(1)
                                 for texts in (originals, edited))
            result[name] = float(((after - before).norm(dim=1) / before.norm(dim=1)).mean())
    return result


# ----------------------------------------------------------------------------- output


def save_pipeline(pipeline, folder: Path, half_precision: bool) -> None:
    """save_pretrained into `folder`, denoiser (UNet or transformer) and VAE weights in fp16 when
    `half_precision`.

    diffusers loads fp16 weights back into fp32 models, but transformers 5 keeps a text encoder in
    the dtype it was saved in, and an fp16 text encoder feeding an fp32 denoiser breaks the pipeline
    on a CPU; so the (small) text encoders always stay fp32. Casts copies: `pipeline` is left as it was.
    """
    names = [name for name in ("unet", "transformer", "vae") if getattr(pipeline, name, None) is not None]
    originals = {name: getattr(pipeline, name) for name in names}
    if half_precision:
        for name in names:
            setattr(pipeline, name, copy.deepcopy(originals[name]).half())
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        for name in names:
            setattr(pipeline, name, originals[name])


def folder_megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def write_json_atomically(data: dict, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- the run


def preflight(cfg: DictConfig) -> list[str]:
    """Check values the config cannot check, before Hydra makes a run folder. Returns no overrides."""
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    check(cfg.architecture in DENOISERS, f"architecture={cfg.architecture!r}: use one of {sorted(DENOISERS)}")
    section = DENOISERS[cfg.architecture].section
    net = cfg[section]
    for stage in ("vae", section):
        check(cfg[stage].steps >= (0 if stage == "vae" else 1), f"{stage}.steps={cfg[stage].steps}: must be >= 1")
        check(cfg[stage].batch_size >= 1, f"{stage}.batch_size={cfg[stage].batch_size}: must be >= 1")
        check(cfg[stage].log_every >= 1, f"{stage}.log_every={cfg[stage].log_every}: must be >= 1")
    check(0 <= net.caption_dropout < 1, f"{section}.caption_dropout={net.caption_dropout}: use a number in [0, 1)")
    check(0 <= net.ema_decay < 1, f"{section}.ema_decay={net.ema_decay}: use a number in [0, 1)")
    if cfg.vae.get("pretrained"):
        check((Path(cfg.vae.pretrained) / "config.json").is_file(),
              f"vae.pretrained={cfg.vae.pretrained!r}: no AutoencoderKL folder there (config.json); give the vae "
              f"folder of a pipeline, or null to train one")
    else:
        check(cfg.vae.steps >= 1, f"vae.steps={cfg.vae.steps}: must be >= 1 when vae.pretrained is null")
    vae_factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
    if section == "unet":
        check(len(net.down_block_types) == len(net.up_block_types) == len(net.block_out_channels),
              "unet.block_out_channels, unet.down_block_types and unet.up_block_types need one entry per level")
        downsampling = vae_factor * 2 ** (len(net.block_out_channels) - 1)
    else:
        downsampling = vae_factor * net.patch_size
    check(cfg.image_size % downsampling == 0,
          f"image_size={cfg.image_size} must be a multiple of {downsampling} (the VAE and {section} downsampling)")
    check(cfg.eval.num_steps >= 1, f"eval.num_steps={cfg.eval.num_steps}: must be >= 1")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder), cfg.text_encoder.num_merges, cfg.text_encoder.max_length)
        check_vocabulary(tokenizer, [prompt for split in split_prompts(cfg.split_seed, cfg.heldout_fraction)
                                     for prompt in split])
    return []


def pretrain(cfg: DictConfig) -> float:
    """Run both stages, save the pipeline and the record; returns the final held-out reward."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from hydra.core.hydra_config import HydraConfig
    from tqdm.contrib.logging import logging_redirect_tqdm

    # ---- 0. Threads, split, run folder.
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    preflight(cfg)  # again: a sweep changes values per job
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    train_prompts, heldout_prompts = split_prompts(cfg.split_seed, cfg.heldout_fraction)
    eval_prompts = list(heldout_prompts)
    if cfg.eval.num_prompts is not None and cfg.eval.num_prompts < len(eval_prompts):
        # A seeded subset, so that all caption kinds are likely present (the list is sorted by kind).
        order = np.random.default_rng([cfg.seed, EVAL_PROMPTS]).permutation(len(eval_prompts))
        eval_prompts = [eval_prompts[i] for i in sorted(order[: cfg.eval.num_prompts])]
    record: dict = {"config": OmegaConf.to_container(cfg, resolve=True), "seed": cfg.seed,
                    "torch_threads": torch.get_num_threads(), "num_train_prompts": len(train_prompts),
                    "num_eval_prompts": len(eval_prompts)}
    log.info("run folder %s | %d train captions | %d held-out captions evaluated | %d torch thread(s)",
             run_dir, len(train_prompts), len(eval_prompts), torch.get_num_threads())
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)  # initial weights

    with logging_redirect_tqdm():
        # ---- 1. Stage 1: the VAE (trained here, or a trained one loaded and re-measured).
        vae_cfg = cfg.vae
        stage_started = time.perf_counter()
        if vae_cfg.get("pretrained"):
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(vae_cfg.pretrained, torch_dtype=torch.float32)
            vae_losses, vae_steps = [], 0
            log.info("vae loaded from %s", vae_cfg.pretrained)
        else:
            vae = build_vae(vae_cfg.block_out_channels, vae_cfg.layers_per_block, vae_cfg.latent_channels,
                            cfg.image_size)
            vae_losses, vae_steps = train_vae(vae, vae_cfg, train_prompts, cfg.image_size, cfg.seed, cfg.progress), \
                vae_cfg.steps
        vae_seconds = time.perf_counter() - stage_started
        vae.eval().requires_grad_(False)
        vae_eval = evaluate_vae(vae, heldout_prompts, vae_cfg.eval_images, cfg.image_size, cfg.seed)
        latent_mean, latent_std = latent_statistics(vae, train_prompts, vae_cfg.eval_images, cfg.image_size, cfg.seed)
        vae.register_to_config(scaling_factor=1.0 / latent_std)
        if cfg.architecture == "sd3":  # SD3's VAE convention: latents = (z - shift_factor) * scaling_factor
            vae.register_to_config(shift_factor=latent_mean)
        log.info("vae held-out: %s | latents mean %.3f std %.3f -> scaling_factor %.4f",
                 describe(vae_eval), latent_mean, latent_std, vae.config.scaling_factor)
        record["vae"] = {"pretrained": vae_cfg.get("pretrained"), "steps": vae_steps, "seconds": vae_seconds,
                         "parameters": count_parameters(vae), "losses": vae_losses, "heldout": vae_eval,
                         "latent_mean": latent_mean, "latent_std": latent_std,
                         "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}

        # ---- 2. Stage 2 models: tokenizer, text encoder(s), denoiser, and their EMA copies.
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="rlfuse-tokenizer-"))
        text_cfg = cfg.text_encoder
        tokenizer = build_tokenizer(tokenizer_dir, text_cfg.num_merges, text_cfg.max_length)
        shutil.rmtree(tokenizer_dir)
        record["tokenizer"] = check_vocabulary(tokenizer, train_prompts + heldout_prompts)
        latent_size = cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        denoiser = DENOISERS[cfg.architecture](cfg, tokenizer, vae.config.latent_channels, latent_size, train_prompts)
        section, net_cfg = denoiser.section, cfg[denoiser.section]
        # The EMA covers the text encoders too: the denoiser's averaged weights were trained against
        # averaged text features, and pairing them with the last text encoder would mix two models.
        ema_modules = {name: copy.deepcopy(module).requires_grad_(False) for name, module in denoiser.modules.items()}
        counts = {name: count_parameters(module) for name, module in denoiser.modules.items()}
        log.info("%s | vocabulary %d tokens, captions up to %d tokens",
                 " | ".join(f"{name} {count / 1e6:.2f} M parameters" for name, count in counts.items()),
                 len(tokenizer), record["tokenizer"]["max_caption_tokens"])

        # ---- 3. Stage 2 loop: the denoising objective on latents of freshly rendered scenes.
        parameters = [p for module in denoiser.modules.values() for p in module.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=net_cfg.learning_rate, weight_decay=net_cfg.weight_decay)
        lr_schedule = get_cosine_schedule_with_warmup(optimizer, net_cfg.warmup_steps, net_cfg.steps)
        data_rng, noise = np.random.default_rng([cfg.seed, UNET_DATA]), torch_generator(cfg.seed, UNET_NOISE)
        eval_pipeline = denoiser.assemble(vae, tokenizer, ema_modules)
        losses, eval_history, interval_loss = [], [], 0.0
        stage_started, eval_seconds = time.perf_counter(), 0.0
        for module in denoiser.modules.values():
            module.train()
        for step in tqdm(range(1, net_cfg.steps + 1), desc=section, disable=not cfg.progress, mininterval=5):
            images, captions = render_batch(data_rng, train_prompts, net_cfg.batch_size, cfg.image_size)
            dropped = data_rng.random(len(captions)) < net_cfg.caption_dropout
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
            with torch.no_grad():  # (B, C, h, w), unit variance
                latents = vae.encode(images).latent_dist.sample(generator=noise)
                latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
            loss = denoiser.loss(latents, captions, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, net_cfg.grad_clip)
            optimizer.step()
            lr_schedule.step()
            decay = ema_decay_at(step, net_cfg.ema_decay)
            for name, module in denoiser.modules.items():
                update_ema(ema_modules[name], module, decay)
            interval_loss += loss.item()

            if step % net_cfg.log_every == 0 or step == net_cfg.steps:
                count = (step - 1) % net_cfg.log_every + 1
                train_seconds = time.perf_counter() - stage_started - eval_seconds
                losses.append({"step": step, "loss": interval_loss / count})
                log.info("%s step %d/%d | loss %.4f | lr %.2e | %.2f steps/s", section, step, net_cfg.steps,
                         losses[-1]["loss"], lr_schedule.get_last_lr()[0], step / train_seconds)
                interval_loss = 0.0
            if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < net_cfg.steps:
                eval_started = time.perf_counter()
                metrics = evaluate_pipeline(eval_pipeline, eval_prompts, cfg.eval.num_steps, cfg.eval.guidance_scale,
                                            cfg.eval.seed, cfg.eval.batch_size, **denoiser.pipeline_kwargs)
                eval_seconds += time.perf_counter() - eval_started
                eval_history.append({"step": step, **metrics})
                log.info("eval (EMA) step %d | %s | %.0f s", step, describe(metrics),
                         time.perf_counter() - eval_started)
        stage_seconds = time.perf_counter() - stage_started - eval_seconds
        record[section] = {"steps": net_cfg.steps, "seconds": stage_seconds,
                           "steps_per_second": net_cfg.steps / stage_seconds, "parameters": counts,
                           "losses": losses, "eval_history": eval_history,
                           "eval_seconds_during_training": eval_seconds}

        # ---- 4. Save the EMA pipeline, load it back from disk and evaluate what was saved.
        final_dir = run_dir / PIPELINE_NAME
        temporary_dir = run_dir / f".{PIPELINE_NAME}.tmp-{os.getpid()}"
        shutil.rmtree(temporary_dir, ignore_errors=True)
        save_pipeline(eval_pipeline, temporary_dir, cfg.half_precision_weights)
        saved = type(eval_pipeline).from_pretrained(temporary_dir, **denoiser.load_kwargs)
        saved.set_progress_bar_config(disable=True)
        eval_started = time.perf_counter()
        final_eval = evaluate_pipeline(saved, eval_prompts, cfg.eval.num_steps, cfg.eval.guidance_scale,
                                       cfg.eval.seed, cfg.eval.batch_size, **denoiser.pipeline_kwargs)
        log.info("final eval (saved EMA pipeline, %d held-out captions) | %s | %.0f s", len(eval_prompts),
                 describe(final_eval), time.perf_counter() - eval_started)
        record["relation_sensitivity"] = relation_sensitivity(denoiser.family(saved), train_prompts + heldout_prompts)
        log.info("prompt embedding change: %s", " | ".join(f"{name} {100 * value:.1f}%" for name, value
                                                           in record["relation_sensitivity"].items()))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(temporary_dir, final_dir)

    # ---- 5. The record, written last: its presence says the pipeline beside it is complete.
    record["eval"] = {"prompts": "heldout", "num_prompts": len(eval_prompts), "num_steps": cfg.eval.num_steps,
                      "guidance_scale": cfg.eval.guidance_scale, "seed": cfg.eval.seed, "sampler": "the pipeline's",
                      **final_eval}
    record["pipeline"] = {"folder": str(final_dir), "megabytes": folder_megabytes(final_dir),
                          "half_precision_weights": cfg.half_precision_weights}
    record["wall_seconds"] = time.perf_counter() - started
    import diffusers
    import transformers
    record["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__}
    write_json_atomically(record, run_dir / RECORD_NAME)
    log.info("pipeline %s (%.1f MB) | record %s | %.1f min", final_dir, record["pipeline"]["megabytes"],
             run_dir / RECORD_NAME, record["wall_seconds"] / 60)
    return final_eval["reward"]


def main() -> None:
    run_hydra_app(pretrain, config_name="pretrain_toy", extra_overrides=preflight)


if __name__ == "__main__":
    main()
