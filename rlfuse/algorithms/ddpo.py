"""DDPO: PPO on the denoising chain (Black et al. 2023, arXiv 2305.13301).

Each denoising step is an action of a multi-step MDP whose only reward is the final image's. The
policy gradient is estimated per step with the PPO clipped surrogate (Schulman et al. 2017,
eq. 7), using the importance ratio r = p_theta(x_{t-1} | x_t) / p_old(x_{t-1} | x_t) between the
current policy and the one that sampled:

    L = E[ max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) ]

A is the same for every step of a trajectory: the final reward normalised per prompt (or over
the batch). Defaults follow the reference implementation (kvablack/ddpo-pytorch config/base.py).

The paper's other estimator, DDPO_SF (section 4.2), is the plain score function with no importance
sampling: L = -E[A * log p_theta(x_{t-1} | x_t)], valid only for samples of the current policy, so
it takes a single gradient step per sampling round (estimator="score_function").
"""

from __future__ import annotations

import torch

from rlfuse.advantages import PerPromptStatTracker, normalize_batch
from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories

ESTIMATORS = ("ppo", "score_function")


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


def score_function_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO_SF: L = -mean(A * log p_theta), whose gradient is the REINFORCE estimate -A * grad log p.

    Args as ppo_clipped_loss. The ratio to the sampling policy is reported (it is 1 on the first
    and only gradient step), not used.
    """
    log_ratio = (log_probs - old_log_probs).detach()
    loss = -(advantages * log_probs).mean()
    return loss, {"approx_kl": 0.5 * (log_ratio**2).mean(), "ratio": torch.exp(log_ratio).mean()}


class DDPO:
    """Advantages from rewards, and the per-step PPO loss.

    Args:
        clip_range: PPO ratio clip eps (1e-4 in the reference code: the ratios of averaged
            per-dimension log-densities are very close to 1).
        adv_clip_max: advantages are clipped to [-adv_clip_max, adv_clip_max].
        advantages: "per_prompt" (running statistics per prompt) or "batch" (whole batch).
        buffer_size, min_count: per-prompt buffer length, and the count below which the batch
            statistics stand in for a prompt's own.
        estimator: "ppo" (DDPO_IS, the clipped importance-sampled surrogate) or "score_function"
            (DDPO_SF: one optimizer step per sampling round, over all of its samples).
    """

    needs_reference = False  # DDPO compares the policy with the one that sampled, not the base model
    pairs = False            # trajectories are trained on one by one
    min_group_size = 1       # per-prompt statistics fall back on the batch's
    likelihood_free = False  # trains on the sampler's chains and log-probs

    def __init__(
        self,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantages: str = "per_prompt",
        buffer_size: int = 16,
        min_count: int = 16,
        estimator: str = "ppo",
    ):
        if advantages not in ("per_prompt", "batch"):
            raise ValueError(f"advantages={advantages!r}: use 'per_prompt' or 'batch'")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: use one of {', '.join(ESTIMATORS)}")
        self.estimator = estimator
        self.single_update = estimator == "score_function"  # one optimizer step per sampling round
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.stat_tracker = PerPromptStatTracker(buffer_size, min_count) if advantages == "per_prompt" else None

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) advantages for the all-process batch (prompts: B strings, rewards: (B,)), and no diagnostics."""
        if self.stat_tracker is not None:
            return self.stat_tracker.update(prompts, rewards), {}
        return normalize_batch(rewards), {}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of recorded step `step_index` (b,) of each trajectory of the minibatch."""
        log_probs = policy.log_prob(batch, step_index)                              # (b,) with gradients
        old_log_probs = batch.log_probs[torch.arange(len(batch), device=step_index.device), step_index]
        advantages = torch.clamp(batch.advantages, -self.adv_clip_max, self.adv_clip_max)
        if self.estimator == "score_function":
            return score_function_loss(log_probs, old_log_probs, advantages)
        return ppo_clipped_loss(log_probs, old_log_probs, advantages, self.clip_range)

    def state_dict(self) -> dict:
        return {"stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.stat_tracker is not None and state.get("stat_tracker") is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])
