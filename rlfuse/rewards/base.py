"""What every reward returns, and the shape of a reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from rlfuse.errors import UserError


@dataclass(frozen=True)
class RewardOutput:
    """A reward's answer for B images.

    scores:  (B,) float, the reward trained on (higher is better).
    terms:   {name: (B,) float} the unweighted terms of a combined reward (reward=multi): logged as
             reward_<name>, and compared term by term by D3PO's Pareto preference. Empty otherwise.
    details: {name: (B,) float} per-criterion scores for logging only (reward=shapes: objects,
             colour, ...), NaN where a criterion does not apply to an image. Empty otherwise.
    """

    scores: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, torch.Tensor] = field(default_factory=dict)


def score(reward: Reward, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
    """Call a reward; a bare (B,) tensor (a reward written to the plain contract) counts as its scores.
    Raises UserError (one line) naming the reward when the answer is neither."""
    answer = reward(images, prompts)
    if isinstance(answer, torch.Tensor):
        return RewardOutput(answer)
    if not isinstance(answer, RewardOutput):
        raise UserError(f"reward {type(reward).__name__} returned {type(answer).__name__}; a reward returns a "
                         f"(B,) tensor of scores or a rlfuse.rewards.base.RewardOutput")
    return answer


class Reward(Protocol):
    """images (B, 3, H, W) in [0, 1] and B prompts in, a RewardOutput out (or a bare (B,) tensor of
    scores: callers go through `score`, which wraps it).

    A reward may also have `check_ready()` (raise ValueError when its weights or server are missing;
    called once at start-up) and `check_prompts(prompts)` (raise ValueError for prompts it cannot score).
    """

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput: ...
