"""DDPO: PPO on the denoising chain (Black et al. 2023, arXiv 2305.13301).

Each denoising step is an action of a multi-step MDP whose only reward is the final image's. The
policy gradient is estimated per step with the PPO clipped surrogate (Schulman et al. 2017,
eq. 7), using the importance ratio r = p_theta(x_{t-1} | x_t) / p_old(x_{t-1} | x_t) between the
current policy and the one that sampled:

    L = E[ max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) ]

A is the same for every step of a trajectory: the final reward normalised per prompt (or over
the batch). Defaults follow the reference implementation (kvablack/ddpo-pytorch config/base.py).
"""

from __future__ import annotations

import torch

from rlfuse.advantages import PerPromptStatTracker, normalize_batch


def ppo_clipped_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate for one step of each of B trajectories.

    Args:
        log_probs: (B,) log p_theta of the recorded transitions, with gradients.
        old_log_probs: (B,) log p of the same transitions at sampling time.
        advantages: (B,) already clipped advantages.
        clip_range: eps; ratios outside [1 - eps, 1 + eps] stop contributing gradient in the
            direction that would move them further.
    Returns:
        loss (scalar) and detached diagnostics: approx_kl (0.5 * mean squared log-ratio, the
        estimator of the reference code), clipfrac (share of ratios outside the range), ratio (mean).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "ratio": ratio.detach().mean(),
    }
    return loss, stats


class DDPO:
    """Advantages from rewards, and the per-step PPO loss.

    Args:
        clip_range: PPO ratio clip eps (1e-4 in the reference code: the ratios of averaged
            per-dimension log-densities are very close to 1).
        adv_clip_max: advantages are clipped to [-adv_clip_max, adv_clip_max].
        advantages: "per_prompt" (running statistics per prompt) or "batch" (whole batch).
        buffer_size, min_count: per-prompt buffer length, and the count below which the batch
            statistics stand in for a prompt's own.
    """

    def __init__(
        self,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantages: str = "per_prompt",
        buffer_size: int = 16,
        min_count: int = 16,
    ):
        if advantages not in ("per_prompt", "batch"):
            raise ValueError(f"advantages={advantages!r}: use 'per_prompt' or 'batch'")
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.stat_tracker = PerPromptStatTracker(buffer_size, min_count) if advantages == "per_prompt" else None

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """(B,) advantages for the all-process batch; prompts has B entries, rewards is (B,)."""
        if self.stat_tracker is not None:
            return self.stat_tracker.update(prompts, rewards)
        return normalize_batch(rewards)

    def loss(
        self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-step loss on (B,) log-probs; see ppo_clipped_loss."""
        advantages = torch.clamp(advantages, -self.adv_clip_max, self.adv_clip_max)
        return ppo_clipped_loss(log_probs, old_log_probs, advantages, self.clip_range)

    def state_dict(self) -> dict:
        return {"stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.stat_tracker is not None and state.get("stat_tracker") is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])
