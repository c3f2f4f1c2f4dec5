"""Several rewards at once: a weighted sum whose terms are each logged, and whose terms D3PO compares
by Pareto dominance (Large-scale RL for diffusion models, Zhang et al. 2024, arXiv 2401.12244,
trains on such combinations)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rlfuse.rewards.base import Reward, RewardOutput, score


class MultiReward:
    """reward = sum over terms of weight * term(images, prompts).

    Args:
        terms: {name: {"weight": float, "fn": a reward}} (Hydra builds each fn from its _target_).
    Call: RewardOutput with scores the weighted sum (B,), terms {name: (B,) unweighted float on the CPU}
    (logged as reward_<name>, and the terms D3PO's Pareto preference compares) and details the same.
    """

    def __init__(self, terms: Mapping[str, Mapping]):
        if not terms:
            raise ValueError("terms: give at least one reward term, e.g. terms.jpeg.fn._target_=...")
        self.terms: dict[str, tuple[float, Reward]] = {}
        for name, term in terms.items():
            if "fn" not in term or not callable(term["fn"]):
                raise ValueError(f"terms.{name}: needs fn (a reward with a _target_) and weight")
            self.terms[name] = (float(term.get("weight", 1.0)), term["fn"])

    def check_ready(self) -> None:
        for _, fn in self.terms.values():
            if hasattr(fn, "check_ready"):
                fn.check_ready()

    def check_prompts(self, prompts: list[str]) -> None:
        for _, fn in self.terms.values():
            if hasattr(fn, "check_prompts"):
                fn.check_prompts(prompts)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        values = {name: score(fn, images, prompts).scores.float().cpu() for name, (_, fn) in self.terms.items()}
        total = sum(weight * values[name] for name, (weight, _) in self.terms.items())
        return RewardOutput(total, terms=values, details=dict(values))
