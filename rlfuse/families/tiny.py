"""The tiny Stable Diffusion pipeline built in code from a seed (same classes as SD 1.5), and the CLIP
tokenizer files it uses, made from the CLIP BPE vocabulary that open_clip ships."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
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


def build_tiny_pipeline(seed: int = 0, num_merges: int = 2000, max_length: int = 16) -> StableDiffusionPipeline:
    """A tiny randomly initialised Stable Diffusion pipeline (same classes as SD 1.5), from a seed.

    32 px images, 16x16x4 latents, 1.7 M parameters in all (UNet 0.99 M); builds in well under a second.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(Path(folder), num_merges, max_length)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=TINY_VAE_BLOCKS, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
