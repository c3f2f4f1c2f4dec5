"""D3PO: direct preference optimisation on the denoising chain (Yang et al., CVPR 2024, arXiv 2311.13231).

Two trajectories of one prompt share their initial noise; the better final image (by a reward, a
Pareto comparison of several rewards, or a person's choice) makes its trajectory the winner w and
the other the loser l. Each denoising step is treated as a state-action pair of a DPO objective
(Rafailov et al. 2023), with the per-step policy ratio against the reference (base) model:

    r(x_{t-1} | x_t) = clamp(p_theta(x_{t-1} | x_t) / p_ref(x_{t-1} | x_t), 1 - eps, 1 + eps)
    L = -log sigmoid(beta * (log r_w - log r_l))

The clamp (from the authors' code, yk7333/d3po scripts/train_with_rm.py) stops the gradient of a
ratio that has left [1 - eps, 1 + eps]. At the start, theta = ref, both log-ratios are 0 and
L = log 2; a tie (sign 0 for both) also gives L = log 2 and no gradient. Defaults beta = 0.1 and
eps = 0.1 are the paper's code's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlfuse.advantages import pair_preferences
from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories


def d3po_loss(
    log_probs: torch.Tensor,
    reference_log_probs: torch.Tensor,
    preferences: torch.Tensor,
    beta: float,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D3PO loss of one denoising step of P pairs.

    Args:
        log_probs: (2P,) log p_theta of the recorded transitions, with gradients; rows 2i, 2i+1 are a pair.
        reference_log_probs: (2P,) log p_ref of the same transitions.
        preferences: (2P,) +1 for the winner, -1 for the loser, 0 for both of a tie (pair_preferences).
        beta: DPO temperature; clip_range: eps of the ratio clamp.
    Returns:
        loss (scalar, mean over pairs, ties included) and detached diagnostics over the decided pairs:
        preference_accuracy (share whose unclamped margin beta * (log r_w - log r_l) is > 0; NaN when
        every pair is a tie) and reward_margin (mean of that margin, the implicit reward difference).
    """
    log_ratio = log_probs - reference_log_probs                                   # (2P,)
    # The clamp in log space: the same values, but exp() cannot overflow (an inf ratio times the clamp's
    # zero gradient is NaN) once the policy has drifted far from the reference.
    clamped = torch.clamp(log_ratio, math.log1p(-clip_range), math.log1p(clip_range))
    margin = (beta * clamped * preferences).reshape(-1, 2).sum(dim=1)             # (P,) beta (log r_w - log r_l)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        raw_margin = (beta * log_ratio * preferences).reshape(-1, 2).sum(dim=1)   # (P,) without the clamp
        decided = preferences.reshape(-1, 2)[:, 0] != 0
        nan = torch.tensor(float("nan"), device=log_probs.device)
        stats = {
            "preference_accuracy": (raw_margin[decided] > 0).float().mean() if decided.any() else nan,
            "reward_margin": raw_margin[decided].mean() if decided.any() else nan,
        }
    return loss, stats


class D3PO:
    """Preferences from rewards, and the per-step D3PO loss against the reference policy.

    Args:
        beta: DPO temperature (0.1 in D3PO).
        clip_range: eps of the per-step ratio clamp (0.1 in D3PO).
    """

    needs_reference = True  # ratios are taken against the base model
    pairs = True            # rows 2i, 2i+1 are trained together, on the same denoising steps
    single_update = False   # PPO-style clipped ratios: several optimizer steps per round are fine
    min_group_size = 2      # a pair: two images of one prompt
    likelihood_free = False  # trains on the sampler's chains and log-probs

    def __init__(self, beta: float = 0.1, clip_range: float = 0.1):
        if beta <= 0 or not 0 < clip_range < 1:
            raise ValueError(f"beta={beta}, clip_range={clip_range}: need beta > 0 and 0 < clip_range < 1")
        self.beta = beta
        self.clip_range = clip_range

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) preference signs for pairs of consecutive rows (prompts must agree within a pair), from
        rewards (B,) or, when the reward has several terms (B, R), by Pareto dominance over them.
        Diagnostic: the share of pairs decided."""
        if any(prompts[i] != prompts[i + 1] for i in range(0, len(prompts) - 1, 2)):
            raise ValueError("D3PO pairs must share their prompt: sample an even number of images per prompt")
        preferences = pair_preferences(terms if terms is not None and terms.shape[-1] > 0 else rewards)
        return preferences, {"pairs_decided": float((preferences[0::2] != 0).float().mean())}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of recorded step `step_index` (b,) of each trajectory; b even, pairs adjacent and
        trained on the same step."""
        log_probs = policy.log_prob(batch, step_index)
        reference_log_probs = policy.log_prob(batch, step_index, reference=True)
        return d3po_loss(log_probs, reference_log_probs, batch.advantages, self.beta, self.clip_range)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
