"""Turning rewards into advantages: per-prompt statistics (DDPO) or batch normalisation."""

from __future__ import annotations

from collections import deque

import torch

EPS = 1e-6


class PerPromptStatTracker:
    """Normalises each reward by the running mean and std of its own prompt's rewards.

    DDPO (Black et al. 2023, appendix) keeps, per prompt, a buffer of the last `buffer_size`
    rewards that persists across epochs; until a prompt has `min_count` rewards in its buffer, the
    statistics of the whole (all-process) batch are used instead. This removes the difference in
    difficulty between prompts from the advantage.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if min_count > buffer_size:
            raise ValueError(f"min_count ({min_count}) cannot exceed buffer_size ({buffer_size})")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this batch's rewards to the buffers, then return (B,) normalised advantages.

        prompts: B strings; rewards: (B,) float, gathered over all processes.
        """
        rewards = rewards.double().cpu()
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in sorted(set(prompts)):
            mask = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            advantages[mask] = (rewards[mask] - mean) / (std + EPS)
        return advantages.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {prompt: list(values) for prompt, values in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def normalize_batch(rewards: torch.Tensor) -> torch.Tensor:
    """(B,) advantages (r - mean) / (std + eps) over the whole (all-process) batch."""
    rewards = rewards.double()
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)).float()


def pair_preferences(rewards: torch.Tensor) -> torch.Tensor:
    """Winner and loser of each pair of trajectories: rows 2i and 2i+1 are a pair (same prompt, same
    initial noise, as D3PO samples them).

    Args:
        rewards: (B,) one reward per trajectory, or (B, R) several reward terms. With several terms
            the winner must Pareto-dominate: at least as good on every term and better on one
            (D3PO with several objectives); a pair where neither dominates counts as a tie.
    Returns:
        (B,) float signs: +1 for the winner, -1 for the loser, 0 for both trajectories of a tie.
    """
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    if rewards.shape[0] % 2:
        raise ValueError(f"pairs need an even number of trajectories, got {rewards.shape[0]}")
    first, second = rewards[0::2], rewards[1::2]                             # (P, R) each
    first_wins = (first >= second).all(dim=1) & (first > second).any(dim=1)  # (P,)
    second_wins = (second >= first).all(dim=1) & (second > first).any(dim=1)
    sign = first_wins.float() - second_wins.float()                          # (P,) +1, -1 or 0
    return torch.stack([sign, -sign], dim=1).reshape(-1)
