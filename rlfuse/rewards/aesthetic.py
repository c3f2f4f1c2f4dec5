"""The LAION improved aesthetic predictor, the aesthetic reward of DDPO and D3PO.

A linear-layer MLP 768-1024-128-64-16-1 (dropout between the first layers, no activations) on the
L2-normalised CLIP ViT-L/14 image embedding (OpenAI weights), trained on SAC, LAION-Logos and AVA
ratings (christophschuhmann/improved-aesthetic-predictor, file sac+logos+ava1-l14-linearMSE.pth).
Scores are on a 1-10 scale.
"""

from __future__ import annotations

import torch
from torch import nn

from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.clip import ClipEmbedder, check_clip_weights
from rlfuse.rewards.weights import ensure_weights

WEIGHTS_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
               "sac+logos+ava1-l14-linearMSE.pth")
WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor's head; parameter names match the published state dict (layers.0 ... layers.7)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised embeddings -> (B,) scores."""
        return self.layers(embeddings).squeeze(-1)


class AestheticReward:
    """reward = the aesthetic predictor's score of each image (prompts are not used).

    Args:
        weights: a local copy of the predictor's .pth; None: the cached copy (downloaded before the
            run if missing and online).
        clip_model, clip_pretrained: the open_clip image encoder (ViT-L-14 with the OpenAI weights;
            clip_pretrained may be a local file, or null for random weights in tests).
        grad: keep gradients (for reward backpropagation); off by default.
    """

    def __init__(self, weights: str | None = None, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                 grad: bool = False):
        self.weights, self.grad = weights, grad
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.embedder = ClipEmbedder(clip_model, clip_pretrained)
        self.head: AestheticMLP | None = None

    def check_ready(self) -> None:
        """Before the run: the predictor's weights and CLIP's are at hand (ValueError, one line, if not)."""
        check_clip_weights(self.clip_model, self.clip_pretrained, "reward.fn")
        ensure_weights(self.weights, WEIGHTS_URL, WEIGHTS_FILE, "reward.fn.weights")

    def _load_head(self, embed_dim: int, device: torch.device) -> None:
        path = ensure_weights(self.weights, WEIGHTS_URL, WEIGHTS_FILE, "reward.fn.weights")
        self.head = AestheticMLP(embed_dim)
        self.head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.head.eval().requires_grad_(False).to(device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """scores: (B,) float on CLIP's device."""
        with torch.set_grad_enabled(self.grad):
            embeddings = self.embedder.images(images)                  # (B, D), L2-normalised
            if self.head is None:
                self._load_head(embeddings.shape[-1], embeddings.device)
            return RewardOutput(self.head(embeddings))
