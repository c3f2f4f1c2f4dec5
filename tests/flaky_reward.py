"""A reward that returns NaN on chosen calls, for the loop's NaN-handling tests (built by Hydra from
`reward.fn._target_=tests.flaky_reward.FlakyReward`)."""

import torch

from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.jpeg import JpegReward


class FlakyReward:
    """JPEG compressibility, except NaN for every image on the calls numbered in `nan_calls` (0-based,
    one call per sampling batch) or on every call from `nan_from` on."""

    def __init__(self, nan_calls: list[int] | None = None, nan_from: int | None = None, **jpeg_options):
        self.jpeg = JpegReward(**jpeg_options)
        self.nan_calls, self.nan_from, self.calls = list(nan_calls or []), nan_from, 0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        rewards = self.jpeg(images, prompts).scores
        if self.calls in self.nan_calls or (self.nan_from is not None and self.calls >= self.nan_from):
            rewards = torch.full_like(rewards, float("nan"))
        self.calls += 1
        return RewardOutput(rewards)
