"""Watching a run for reward hacking and collapse at its evaluations: rewards it is not trained on (a
panel), the diversity of the images of one prompt, the drift from the base model (pixels, and the KL
of the sampler's steps along the evaluation chains), and one-line warnings when they turn.

Every fine-tuning paper in this field watches rewards it does not optimise (Flow-GRPO's DrawBench
panel: aesthetic, ImageReward, PickScore, ...) and the diversity of its samples (D3PO; Zhang et al.
2024): a trained reward that rises while they fall is the mark of reward hacking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlfuse.dynamics import Sampler
from rlfuse.families import ModelFamily
from rlfuse.trajectories import Conditioning


@dataclass(frozen=True)
class MonitorSettings:
    """panel: {name: reward} scored on the held-out images, logged as eval_<name>; diversity_space:
    None (off), "pixel" or "clip"; diversity_prompts x diversity_images: the images of its own sampling
    (the first held-out prompts, each drawn from several seeds); clip: the CLIP embedder of the clip
    space; collapse_ratio: warn when diversity falls below this share of the first evaluation's;
    drift: log eval_drift_pixel and eval_drift_kl; kl_sampler: the training step at the evaluation's
    step count (its Gaussian is the policy's action distribution)."""

    panel: dict = field(default_factory=dict)
    diversity_space: str | None = None
    diversity_prompts: int = 8
    diversity_images: int = 4
    clip: object | None = None
    collapse_ratio: float = 0.5
    drift: bool = False
    kl_sampler: Sampler | None = None

    @property
    def active(self) -> bool:
        return bool(self.panel) or self.diversity_space is not None or self.drift


def mean_pairwise_distance(images: torch.Tensor, groups: int, space: str, clip=None) -> float:
    """The mean distance between two different images of one prompt, over every prompt: RMS pixel
    distance ("pixel") or CLIP cosine distance 1 - cos ("clip"). images: (G*K, 3, H, W) in [0, 1],
    the K images of a prompt adjacent."""
    if space == "clip":
        features = clip.images(images).float()                                   # (G*K, D) normalised
    else:
        features = images.reshape(len(images), -1).float() / math.sqrt(images[0].numel())
    features = features.reshape(groups, -1, features.shape[-1])                  # (G, K, D)
    k = features.shape[1]
    if k < 2:
        return math.nan
    if space == "clip":
        distances = 1 - features @ features.transpose(1, 2)                      # (G, K, K), 0 on the diagonal
        distances = distances - torch.diag_embed(torch.diagonal(distances, dim1=1, dim2=2))
    else:
        distances = torch.cdist(features, features)                              # RMS distance per pair
    return float(distances.sum() / (groups * k * (k - 1)))


@torch.inference_mode()
def chain_kl(network: torch.nn.Module, reference, family: ModelFamily, sampler: Sampler, chains: torch.Tensor,
             timesteps: torch.Tensor, conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
    """(B,) the mean over steps of KL(policy step || reference step) along chains (B, T+1, C, h, w).

    Both steps are Gaussians with the sampler's std at x_t, so KL = |mean_theta - mean_ref|^2 / (2 std^2),
    averaged over latent dimensions (rlfuse's per-dimension log-prob convention). Steps with std 0
    (deterministic) are left out. reference: a context yielding the base network (rlfuse.lora.ReferencePolicy).
    """
    sampler.set_timesteps(len(timesteps), device=chains.device)
    per_step = []
    for i, t in enumerate(timesteps):
        latents = chains[:, i]
        model_input = sampler.model_input(latents, t)
        step_times = t.expand(len(latents))
        ours = sampler.transition(family.predict(network, model_input, t, conditioning, guidance_scale), step_times,
                                  latents)
        with reference() as base:
            theirs = sampler.transition(family.predict(base, model_input, t, conditioning, guidance_scale), step_times,
                                        latents)
        variance = ours.std.float().reshape(-1) ** 2                             # (B,) or (1,)
        if bool((variance == 0).all()):
            continue
        squared = ((ours.mean.float() - theirs.mean.float()) ** 2).mean(dim=tuple(range(1, latents.ndim)))  # (B,)
        per_step.append(squared / (2 * variance))
    if not per_step:
        return torch.full((len(chains),), math.nan)
    return torch.stack(per_step, dim=1).mean(dim=1).cpu()


def paired_fall(before: list[float], after: list[float]) -> bool:
    """Whether per-image scores fell from before to after (same images' seeds) by more than two
    standard errors of their mean paired difference."""
    difference = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    difference = difference[~torch.isnan(difference)]
    if len(difference) < 2:
        return False
    return bool(difference.mean() < -2 * difference.std() / math.sqrt(len(difference)))


def paired_rise(before: list[float], after: list[float]) -> bool:
    return paired_fall(after, before)


class Watch:
    """Compares each evaluation with the first one this process saw (the base model before training,
    or the first evaluation after a resume) and words the warnings.

    Per-image scores come in image order (the same seeds at every evaluation), so changes are paired.
    """

    def __init__(self, collapse_ratio: float):
        self.collapse_ratio = collapse_ratio
        self.first: dict[str, list[float]] | None = None
        self.first_diversity: float | None = None

    def warnings(self, epoch: int, scores: dict[str, list[float]], diversity: float | None) -> list[str]:
        """scores: {"reward": trained reward per image, <panel name>: per image}; diversity: the mean
        pairwise distance or None. Returns one line per warning (none at the first evaluation)."""
        if self.first is None:
            self.first, self.first_diversity = scores, diversity
            return []
        lines = []
        trained_rose = paired_rise(self.first["reward"], scores["reward"])
        for name, values in scores.items():
            if name != "reward" and trained_rose and paired_fall(self.first[name], values):
                before, after = _mean(self.first[name]), _mean(values)
                lines.append(f"epoch {epoch}: possible reward hacking: the trained reward rose "
                             f"({_mean(self.first['reward']):.4f} -> {_mean(scores['reward']):.4f}) while eval_{name}, "
                             f"not trained on, fell ({before:.4f} -> {after:.4f}) on the same held-out seeds")
        if diversity is not None and self.first_diversity and diversity < self.collapse_ratio * self.first_diversity:
            lines.append(f"epoch {epoch}: diversity collapse: eval_diversity {diversity:.4f} is below "
                         f"{self.collapse_ratio:g} x its first value {self.first_diversity:.4f}; the images of a "
                         f"prompt are becoming alike")
        return lines


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
