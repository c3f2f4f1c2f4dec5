"""Prompt-image alignment as a CLIP score: the cosine similarity of the CLIP embeddings of an image
and its prompt (Radford et al. 2021; CLIPScore, Hessel et al. 2021, is 2.5 max(cos, 0))."""

from __future__ import annotations

import torch

from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.clip import ClipEmbedder, check_clip_weights


class AlignmentReward:
    """reward = scale * cos(CLIP image embedding, CLIP text embedding of the prompt).

    Args:
        clip_model, clip_pretrained: any open_clip model and weights (a tag, a local file, or null).
        scale: multiplies the cosine (1: plain cosine; 2.5 with clamping at 0 would be CLIPScore).
        grad: keep gradients; off by default.
    """

    def __init__(self, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai", scale: float = 1.0,
                 grad: bool = False):
        self.clip_model, self.clip_pretrained, self.scale, self.grad = clip_model, clip_pretrained, scale, grad
        self.embedder = ClipEmbedder(clip_model, clip_pretrained)

    def check_ready(self) -> None:
        check_clip_weights(self.clip_model, self.clip_pretrained, "reward.fn")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """scores: (B,) float on CLIP's device."""
        with torch.set_grad_enabled(self.grad):
            image_embeddings = self.embedder.images(images)                           # (B, D)
            text_embeddings = self.embedder.texts(prompts, image_embeddings.device)  # (B, D)
            return RewardOutput(self.scale * (image_embeddings * text_embeddings).sum(dim=-1))
