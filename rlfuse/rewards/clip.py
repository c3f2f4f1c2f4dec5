"""CLIP for rewards: load an open_clip model (fail fast when its weights are missing) and embed
image tensors and prompts. Used by the aesthetic, alignment and diversity rewards."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

# Names of the weight files open_clip looks for in a hub repository.
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# rlfuse's own open_clip configs (rlfuse-tiny-clip: 1.7 M parameters, 32 px, for tests and benchmarks
# with clip_pretrained=null), registered with open_clip on first use.
CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "open_clip"


def _open_clip():
    import open_clip

    if "rlfuse-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIGS)
    return open_clip


def check_clip_weights(model_name: str, pretrained: str | None, key: str) -> None:
    """Raise ValueError (one line: what is missing and how to get it) unless open_clip can build
    `model_name` with `pretrained` without a download that would fail. pretrained None means random
    weights (tests, benchmarks); a path must be a file; a tag must be cached when HF_HUB_OFFLINE is set."""
    open_clip = _open_clip()

    if model_name not in open_clip.list_models():
        raise ValueError(f"{key}.clip_model={model_name!r}: not an open_clip model; see open_clip.list_models()")
    if pretrained is None or os.path.isfile(os.path.expanduser(pretrained)):
        return
    if pretrained.startswith((".", "/", "~")):
        raise ValueError(f"{key}.clip_pretrained={pretrained!r}: no such file")
    config = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not config:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"{key}.clip_pretrained={pretrained!r}: no such weights for {model_name}; known tags: {tags}")
    from huggingface_hub import constants, try_to_load_from_cache

    repo = (config.get("hf_hub") or "").strip("/")
    if constants.HF_HUB_OFFLINE and not any(isinstance(try_to_load_from_cache(repo, f), str) for f in HUB_FILES):
        raise ValueError(f"{key}: CLIP weights {model_name}/{pretrained} are not in the Hugging Face cache and "
                         f"HF_HUB_OFFLINE is set; run `hf download {repo}` on a connected machine, or "
                         f"set {key}.clip_pretrained to a local weights file")


class ClipEmbedder:
    """Normalised CLIP embeddings of image tensors and prompts, loaded on first use.

    Images arrive as (B, 3, H, W) floats in [0, 1]; they are resized (bicubic, shortest side) and
    centre-cropped to the model's input size and normalised with its mean and std, all as tensor
    operations, so gradients can flow when a reward asks for them.
    """

    def __init__(self, model_name: str, pretrained: str | None, device: str | None = None):
        self.model_name, self.pretrained = model_name, pretrained
        self.device = torch.device(device) if device else None
        self.model = self.tokenizer = None

    def _load(self, device: torch.device) -> None:
        open_clip = _open_clip()

        pretrained = os.path.expanduser(self.pretrained) if self.pretrained else None
        self.model = open_clip.create_model(self.model_name, pretrained=pretrained, device=self.device or device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        config = self.model.visual.preprocess_cfg
        self.size = config["size"] if isinstance(config["size"], int) else config["size"][0]
        self.mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"]).view(1, 3, 1, 1)

    def _device(self, fallback: torch.device) -> torch.device:
        if self.model is None:
            self._load(fallback)
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised model input (S the model's image size)."""
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        size = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        images = images[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings."""
        device = self._device(images.device)
        features = self.model.encode_image(self.preprocess(images.to(device)))
        return F.normalize(features.float(), dim=-1)

    def texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(B, D) L2-normalised text embeddings."""
        device = self._device(device)
        features = self.model.encode_text(self.tokenizer(prompts).to(device))
        return F.normalize(features.float(), dim=-1)
