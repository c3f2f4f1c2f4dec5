"""The tiny Stable Diffusion pipeline built in code from a seed (same classes as SD 1.5), and the CLIP
tokenizer files it uses, made from the CLIP BPE vocabulary that open_clip ships."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from rlfuse.errors import UserError


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte maps to a printable unicode character.

    Printable Latin-1 bytes map to themselves and come first (this order is the vocabulary's);
    the other bytes follow, shifted above 255 (Radford et al. 2019).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    others = [byte for byte in range(256) if byte not in printable]
    mapping = {byte: chr(byte) for byte in printable}
    mapping.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return mapping


def write_clip_tokenizer_files(folder: Path, num_merges: int, max_length: int) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json of a CLIP tokenizer.

    The BPE merges come from the CLIP vocabulary that open_clip ships (the file OpenAI released);
    with all 48894 merges the ids equal OpenAI CLIP's (49408 tokens). Fewer merges give a smaller,
    consistent vocabulary: 512 byte tokens, then one token per merge, then the two special tokens.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise UserError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary: pip install open_clip_torch")
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]][:num_merges]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))


# The tiny VAE's blocks: two, so images are 2x their latents.
TINY_VAE_BLOCKS = (32, 64)


def tiny_scheduler() -> DDIMScheduler:
    """The tiny pipeline's scheduler: Stable Diffusion 1.x's schedule (scaled-linear betas 0.00085..0.012,
    offset 1, final alpha of step 0)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tokenizer(folder: Path, num_merges: int, max_length: int):
    """A CLIPTokenizer with the first `num_merges` merges of the CLIP BPE, its files written to folder."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder, num_merges, max_length)
    return CLIPTokenizer.from_pretrained(folder)


def build_vae(block_out_channels: Sequence[int], layers_per_block: int, latent_channels: int, image_size: int,
              norm_num_groups: int | None = None, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A small AutoencoderKL; each level after the first halves the side (32 px, two levels -> 16x16).
    scaling_factor: the latents' scale (0.18215 is SD 1.x's and AutoencoderKL's default)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=norm_num_groups or min(block_out_channels),
        sample_size=image_size, scaling_factor=scaling_factor,
    )


def build_text_encoder(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                       projection_dim: int | None = None):
    """A small CLIPTextModel whose vocabulary and positions match the tokenizer; with projection_dim, a
    CLIPTextModelWithProjection (the class of SD3's and FLUX's CLIP encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model_class(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    ))


def build_unet(latent_size: int, latent_channels: int, block_out_channels: Sequence[int],
               down_block_types: Sequence[str], up_block_types: Sequence[str], layers_per_block: int,
               attention_head_dim: int, cross_attention_dim: int, norm_num_groups: int | None = None
               ) -> UNet2DConditionModel:
    """A small UNet2DConditionModel (the class of Stable Diffusion 1.x and 2.x)."""
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels), down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types), layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim, cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups or min(32, min(block_out_channels)),
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of these parts, without a safety checker, progress bars off."""
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_pipeline(seed: int = 0, num_merges: int = 2000, max_length: int = 16) -> StableDiffusionPipeline:
    """A tiny randomly initialised Stable Diffusion pipeline (same classes as SD 1.5), from a seed.

    32 px images, 16x16x4 latents, 1.7 M parameters in all (UNet 0.99 M); builds in well under a second.
    """
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder), num_merges, max_length)
    torch.manual_seed(seed)
    unet = build_unet(16, 4, (32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"),
                      layers_per_block=1, attention_head_dim=8, cross_attention_dim=32, norm_num_groups=16)
    vae = build_vae(TINY_VAE_BLOCKS, layers_per_block=1, latent_channels=4, image_size=32, norm_num_groups=16)
    text_encoder = build_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, tiny_scheduler())


# ----------------------------------------------------------------------------- tiny flow-matching pipelines


def tiny_flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The tiny VAE of the flow pipelines: 16 latent channels, 2x down-sampling, no quant convs (as SD3's)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=TINY_VAE_BLOCKS, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
        sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_clip_with_projection(tokenizer, seed: int):
    """A tiny CLIPTextModelWithProjection (hidden 32, 2 layers, projection 32): SD3's and FLUX's CLIP class."""
    torch.manual_seed(seed)
    return build_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              projection_dim=32).eval()


def build_tiny_sd3(seed: int = 0, num_merges: int = 2000, max_length: int = 16):
    """A tiny randomly initialised StableDiffusion3Pipeline (the classes of SD3 / SD3.5), without T5.

    32 px images, 16x16x16 latents, patch 2 (64 image tokens); the transformer has SD3.5's second
    attention in its first block (dual_attention_layers). Builds in about a second.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder) / "one", num_merges, max_length)
        tokenizer_2 = build_tokenizer(Path(folder) / "two", num_merges, max_length)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    vae = tiny_flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder = tiny_clip_with_projection(tokenizer, seed + 1)
    text_encoder_2 = tiny_clip_with_projection(tokenizer_2, seed + 2)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ----------------------------------------------------------------------------- the tiny FLUX pipeline

# Whole-word pieces of the tiny T5 vocabulary: the shapes world's caption words (rlfuse/toy/world.py,
# rlfuse/assets/prompts/shapes_*.txt), the 45 animals of simple_animals.txt, and common prompt words.
# Anything else is spelled with the single-character pieces; characters outside them (emoji) are <unk>.
T5_WORDS = (
    "a", "the", "of", "to", "two", "three", "circle", "square", "triangle", "circles", "squares", "triangles",
    "red", "yellow", "green", "blue", "purple", "left", "right", "above", "below",
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
    "an", "in", "on", "at", "by", "with", "and", "is", "one", "four", "five", "photo", "painting", "picture",
    "image", "black", "white", "orange", "brown", "pink", "gray", "small", "large", "big", "cute", "sitting",
    "standing", "next", "front", "behind", "top", "under", "field", "grass", "water", "tree", "sky", "house", "man",
    "woman", "portrait", "style", "car", "flower", "dark", "bright", "colorful",
)
T5_CHARACTERS = tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + tuple(",.'\"-!?:;()/&")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2 (T5Tokenizer's Unigram has unk_id=2)
T5_VOCAB_SIZE = 192


def build_t5_tokenizer(max_length: int = 512):
    """A tiny T5 tokenizer built in code: a Unigram vocabulary (T5's SentencePiece model type) of 192 pieces.

    Pieces: <pad>, </s>, <unk>, the word boundary "▁", one piece per word of T5_WORDS ("▁circle"), and
    the single characters. Scores are log-probabilities: a whole word (-4) beats its spelling (-8 per
    character), so the tiny prompt sets tokenize into words and any other text into characters.
    """
    from transformers import T5Tokenizer

    vocab = [(piece, 0.0) for piece in T5_SPECIALS] + [("▁", -6.0)]
    vocab += [("▁" + word, -4.0) for word in T5_WORDS] + [(char, -8.0) for char in T5_CHARACTERS]
    if len(vocab) != T5_VOCAB_SIZE or len({piece for piece, _ in vocab}) != T5_VOCAB_SIZE:
        raise AssertionError(f"the tiny T5 vocabulary has {len(vocab)} pieces, some repeated; want {T5_VOCAB_SIZE}")
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_flux_scheduler():
    """FLUX.1-dev's scheduler (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json): flow matching
    with resolution-dependent shifting, mu from 0.5 at 256 image tokens to 1.15 at 4096
    (diffusers pipeline_flux.py calculate_shift); shift 3.0 is unused with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny_flux(seed: int = 0, num_merges: int = 2000, max_length: int = 16):
    """A tiny randomly initialised FluxPipeline (the classes of FLUX.1-dev), with its T5, from a seed.

    32 px images, 16x16x16 latents packed into 8x8 = 64 tokens of 2x2 patches; one joint and two
    single blocks, the guidance embedding; CLIPTextModel (FLUX reads its pooled output only) and a
    T5 encoder (hidden 32, 2 layers) with the 192-piece tokenizer of build_t5_tokenizer. The same
    seed gives the same weights. Sizes as /work/shared/FLOW.md section 4 (sum(axes_dims_rope) is
    the head dim; joint_attention_dim is T5's width, pooled_projection_dim CLIP's).
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder), num_merges, max_length)
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1-dev's vae/config.json
    torch.manual_seed(seed + 1)
    text_encoder = build_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=4,
                                      intermediate_size=64).eval()
    torch.manual_seed(seed + 2)
    # dropout 0 and eval(): T5's default dropout 0.1 makes a model built from a config nondeterministic
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()
    pipeline = FluxPipeline(
        scheduler=tiny_flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ----------------------------------------------------------------------------- the tiny SDXL pipeline

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json: an EulerDiscreteScheduler whose
# config still carries the DDIM keys (clip_sample, set_alpha_to_one), so DDIMScheduler.from_config of it
# gives SD's DDIM schedule: scaled-linear betas 0.00085..0.012, "leading" spacing with offset 1.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SDXL_VAE_SCALING = 0.13025  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json scaling_factor


def tiny_sdxl_scheduler():
    """SDXL base's scheduler (EulerDiscreteScheduler with SDXL_SCHEDULER_CONFIG), as its pipeline folder holds it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def build_tiny_sdxl(seed: int = 0, num_merges: int = 2000, max_length: int = 16):
    """A tiny randomly initialised StableDiffusionXLPipeline (the classes of SDXL base 1.0), from a seed.

    32 px images, 16x16x4 latents (VAE scaling 0.13025, as SDXL's); a UNet with SDXL's "text_time"
    added conditioning; CLIPTextModel and CLIPTextModelWithProjection (hidden 32 each), whose
    penultimate states side by side are the 64-wide context and whose second pooled projection (32)
    joins the 6 size/crop numbers (8 features each): 6 * 8 + 32 = 80 added-embedding inputs.
    Sizes as /work/shared/FLOW.md section 4; UNet 1.36 M parameters.
    """
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder) / "one", num_merges, max_length)
        tokenizer_2 = build_tokenizer(Path(folder) / "two", num_merges, max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16,
    )
    vae = build_vae(TINY_VAE_BLOCKS, layers_per_block=1, latent_channels=4, image_size=32, norm_num_groups=16,
                    scaling_factor=SDXL_VAE_SCALING)
    torch.manual_seed(seed + 1)
    text_encoder = build_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=4,
                                      intermediate_size=64).eval()
    text_encoder_2 = tiny_clip_with_projection(tokenizer_2, seed + 2)
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=tiny_sdxl_scheduler(), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
