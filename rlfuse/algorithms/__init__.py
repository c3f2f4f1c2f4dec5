"""One module per algorithm; each turns rewards into a per-step training loss.

An algorithm is any object with the shape of `Algorithm` below (a protocol, not a base class). Its
capability flags are what the start-up check (rlfuse.config) matches against the source and the
settings, once, so that the loop never asks which algorithm it runs.
"""

from __future__ import annotations

from typing import Protocol

import torch

from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories


class Algorithm(Protocol):
    """How rewards (or preferences) become a loss.

    needs_reference: compares the policy with the base model (rlfuse.lora.ReferencePolicy);
    pairs: trains on pairs, rows 2i and 2i+1 of one prompt from one initial noise (groups of 2),
        kept together in minibatches and trained on the same steps;
    single_update: exact only for the policy that sampled, so one optimizer step per sampling round;
    min_group_size: the fewest images of one prompt per batch it can learn from (GRPO's groups);
    likelihood_free: trains on clean samples (x_0 and the schedule's noise levels), not on stored
        sampler chains with their log-probs; such an algorithm (DiffusionNFT) samples with its own
        old policy: it provides attach(network) (before any checkpoint is loaded), sampling() (the
        context rollouts run in) and end_epoch(updates) -> diagnostics (after each optimize stage).

    Optional: clean_pairs (Diffusion-DPO): trains on clean winner and loser images of preference pairs
    from the pairs source (feedback=pairs), rows 2i and 2i + 1, and on nothing else; attach(network) and
    end_epoch(updates) -> diagnostics, called when present (an adapter of its own, as above).

    Optional: replay_buffer, a rlfuse.replay_buffer.TransitionBuffer (absent or None: on-policy training
    over the epoch's chains). An algorithm with one (DPOK's schedule) provides remember(samples, steps,
    generator) -> diagnostics, called once per epoch to add the chains, and is trained on random single
    transitions drawn from the buffer (rlfuse.engine.optimize.optimize_from_buffer).
    """

    needs_reference: bool
    pairs: bool
    single_update: bool
    min_group_size: int
    likelihood_free: bool

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) per-sample advantages (signs, weights) for the all-process batch in sample-id order:
        prompts B strings, rewards (B,), terms (B, R) the reward's terms (R may be 0); and diagnostics."""
        ...

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The scalar loss of recorded step step_index (b,) of each trajectory of the minibatch, and
        detached (scalar) diagnostics."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
