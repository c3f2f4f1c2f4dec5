"""GRPO on the denoising chain, as Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), for every family.

The K images of a prompt form a group; each image's advantage is its reward measured against its
group, with no value function (GRPO, Shao et al. 2024, arXiv 2402.03300):

    A_i = (r_i - mean_group(r)) / (std + 1e-4)

where std is the group's own, or, with global_std (Flow-GRPO's `sample.global_std`, used in its
SD3.5 configs), the std of the whole batch of all processes. A is repeated over the steps of a
chain, clipped to [-adv_clip_max, adv_clip_max], and each step's PPO clipped surrogate is taken on
the ratio p_theta / p_old of the step's Gaussian (the sampler that drew it), plus beta times the KL
of the step to the reference policy (the same network with LoRA switched off):

    L = E[ max(-A r, -A clip(r, 1 - eps, 1 + eps)) ] + beta * E[ KL(p_theta || p_ref) ]

rlfuse's KL is the exact Gaussian KL of the two step distributions, which share their std:
mean_CHW (mean_theta - mean_ref)^2 / (2 std^2), std the step's total std. Flow-GRPO divides by
the SDE's std_t without the sqrt(-dt) of the step (flow_grpo scripts/train_sd3.py), so with the "sde"
step its KL is rlfuse's times |dt| (with "cps" it divides by the step's whole std: the two are
equal): its beta 0.04 (GenEval) at steps of |dt| 0.04-0.27 (10 steps, shift 3) is rlfuse's beta
0.0016-0.011, 0.0044 at the mean |dt| of the trained steps. Defaults follow flow_grpo config/base.py and config/grpo.py (clip 1e-4, advantage
clip 5).
"""

from __future__ import annotations

import torch

from rlfuse.dynamics.ddim import gaussian_log_prob
from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories

STD_EPS = 1e-4  # flow_grpo stat_tracking.py


def group_advantages(prompts: list[str], rewards: torch.Tensor, global_std: bool) -> torch.Tensor:
    """(B,) (r - mean of the prompt's group) / (std + 1e-4): std of the group, or of the batch."""
    rewards = rewards.double().cpu()
    advantages = torch.empty_like(rewards)
    batch_std = rewards.std(unbiased=False)
    for prompt in sorted(set(prompts)):
        mask = torch.tensor([p == prompt for p in prompts])
        group = rewards[mask]
        std = batch_std if global_std else group.std(unbiased=False)
        advantages[mask] = (group - group.mean()) / (std + STD_EPS)
    return advantages.float()


def groups_without_signal(prompts: list[str], advantages: torch.Tensor) -> float:
    """The share of prompts whose images all got advantage 0 (all scored the same: they teach nothing)."""
    flat = [float((advantages[[i for i, q in enumerate(prompts) if q == p]] == 0).all()) for p in set(prompts)]
    return sum(flat) / len(flat)


def grpo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
              kl: torch.Tensor, clip_range: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of one step of B chains plus beta * KL.

    log_probs (B,) with gradients; old_log_probs (B,) at sampling; advantages (B,) clipped; kl (B,)
    to the reference. Returns the loss and detached diagnostics (approx_kl to the sampling policy,
    clipfrac, kl to the reference, policy_loss).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.mean()
    stats = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "kl": kl_mean.detach(),
        "policy_loss": policy_loss.detach(),
    }
    return policy_loss + beta * kl_mean, stats


def step_kl(policy_mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B,) KL of N(policy_mean, std^2) to N(reference_mean, std^2), averaged over the latent dimensions;
    0 where the step is deterministic."""
    safe_std = torch.where(std == 0, torch.ones_like(std), std)
    kl = (policy_mean - reference_mean.detach()) ** 2 / (2 * safe_std**2)
    kl = torch.where(std == 0, torch.zeros_like(kl), kl)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


class GRPO:
    """Group-relative advantages, and the per-step clipped loss with a KL to the reference.

    Args:
        clip_range: PPO ratio clip eps (Flow-GRPO: 1e-4; 1e-5 in its fast configs).
        adv_clip_max: advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5).
        beta: weight of the KL to the reference policy; 0 needs no reference (Flow-GRPO's FLUX and
            fast configs).
        global_std: normalise by the std of the whole batch instead of the group's.
    """

    pairs = False          # chains are trained one by one
    single_update = False  # clipped ratios: several optimizer steps per round are fine
    min_group_size = 2     # a group of one image has no relative advantage
    likelihood_free = False  # trains on the sampler's chains and log-probs

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: float = 5.0, beta: float = 0.04,
                 global_std: bool = True):
        if not 0 < clip_range < 1 or beta < 0 or adv_clip_max <= 0:
            raise ValueError(f"clip_range={clip_range}, beta={beta}, adv_clip_max={adv_clip_max}: need "
                             f"0 < clip_range < 1, beta >= 0, adv_clip_max > 0")
        self.clip_range, self.adv_clip_max, self.beta, self.global_std = clip_range, adv_clip_max, beta, global_std
        self.needs_reference = beta > 0

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) group-relative advantages for the all-process batch, and the share of groups whose
        images all scored the same (they teach nothing)."""
        advantages = group_advantages(prompts, rewards, self.global_std)
        return advantages, {"groups_without_signal": groups_without_signal(prompts, advantages)}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of recorded step `step_index` (b,) of each chain of the minibatch."""
        rows = torch.arange(len(batch), device=step_index.device)
        transition = policy.transition(batch, step_index)
        log_probs = gaussian_log_prob(batch.next_latents[rows, step_index], transition)
        old_log_probs = batch.log_probs[rows, step_index]
        advantages = torch.clamp(batch.advantages, -self.adv_clip_max, self.adv_clip_max)
        if self.beta > 0:
            reference = policy.transition(batch, step_index, reference=True)
            kl = step_kl(transition.mean, reference.mean, transition.std)
        else:
            kl = torch.zeros_like(log_probs)
        return grpo_loss(log_probs, old_log_probs, advantages, kl, self.clip_range, self.beta)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
