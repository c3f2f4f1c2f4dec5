"""A group reward for diversity (after Zhang et al. 2024, arXiv 2401.12244, distribution-level
rewards): each image is scored by how far its CLIP embedding lies from those of the other images of
the same prompt in the batch, so the reward sees the whole group, not one image."""

from __future__ import annotations

import torch

from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.clip import ClipEmbedder, check_clip_weights


def group_diversity(embeddings: torch.Tensor, groups: list[str]) -> torch.Tensor:
    """(B,) for each image, the mean cosine distance 1 - cos(e_i, e_j) to the other images j of its
    group; an image alone in its group scores 0. embeddings: (B, D) L2-normalised."""
    distances = 1 - embeddings @ embeddings.T                                  # (B, B)
    scores = torch.zeros(len(groups), device=embeddings.device)
    for key in set(groups):
        rows = torch.tensor([i for i, g in enumerate(groups) if g == key], device=embeddings.device)
        if len(rows) > 1:
            block = distances[rows][:, rows]
            scores[rows] = block.sum(dim=1) / (len(rows) - 1)                 # the diagonal is 0
    return scores


class DiversityReward:
    """reward = mean CLIP cosine distance of each image to the other images of its prompt (the
    group), so the mean over a group is its mean pairwise distance. Needs sample.images_per_prompt > 1.

    Args: clip_model, clip_pretrained as AlignmentReward.
    """

    def __init__(self, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai"):
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.embedder = ClipEmbedder(clip_model, clip_pretrained)

    def check_ready(self) -> None:
        check_clip_weights(self.clip_model, self.clip_pretrained, "reward.fn")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """scores: (B,) float on CLIP's device."""
        return RewardOutput(group_diversity(self.embedder.images(images), prompts))
