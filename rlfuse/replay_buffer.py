"""A replay buffer of single denoising transitions, DPOK's training schedule (Fan et al. 2023, arXiv
2305.16381; google-research/google-research dpok/train_online_pg.py: _collect_rollout, _trim_buffer,
_train_policy_func).

Each round (epoch) adds every trainable step of the new chains; the buffer keeps the newest `capacity`
transitions. Training then draws minibatches of single transitions at random, each from any chain and
any step, including those of earlier rounds (their stored log-probs are those of the policy that
sampled them, as DPOK's ratio uses). A transition is a (chain, step) pair; the chains are kept whole,
and a chain leaves the buffer when its last transition does.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from rlfuse.trajectories import Conditioning, Trajectories


class TransitionBuffer:
    """The newest `capacity` transitions of the chains added, and `updates_per_round` optimizer steps
    per round drawn from them."""

    def __init__(self, capacity: int, updates_per_round: int):
        if capacity < 1 or updates_per_round < 1:
            raise ValueError(f"replay_buffer: capacity={capacity}, updates_per_round={updates_per_round}: both must "
                             f"be >= 1 (capacity 0 turns the buffer off)")
        self.capacity, self.updates_per_round = capacity, updates_per_round
        self.chains: Trajectories | None = None     # every chain with a transition in the buffer
        self.rows = torch.zeros(0, dtype=torch.long)   # (N,) each transition's chain, oldest first
        self.steps = torch.zeros(0, dtype=torch.long)  # (N,) and its step index

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, samples: Trajectories, steps: torch.Tensor) -> None:
        """Add steps (T',) of each of the B chains of samples, step by step as DPOK stores them (all B
        chains' first step, then their second, ...), and drop the oldest beyond capacity."""
        offset = 0 if self.chains is None else len(self.chains)
        if self.chains is not None and self.chains.latents.device != samples.latents.device:  # resumed: from the CPU
            self.chains = move(self.chains, samples.latents.device)
        self.chains = samples if self.chains is None else Trajectories.cat([self.chains, samples])
        steps = steps.cpu().long()
        self.rows = torch.cat([self.rows, (offset + torch.arange(len(samples))).repeat(len(steps))])
        self.steps = torch.cat([self.steps, steps.repeat_interleave(len(samples))])
        self.rows, self.steps = self.rows[-self.capacity:], self.steps[-self.capacity:]
        kept, self.rows = torch.unique(self.rows, return_inverse=True)  # chains still referenced, renumbered
        self.chains = self.chains[kept.to(self.chains.rewards.device)]

    def draw(self, count: int, generator: torch.Generator) -> tuple[Trajectories, torch.Tensor]:
        """(chains (count,), step_index (count,)): `count` random transitions, distinct while the buffer
        holds that many (DPOK: without replacement within a minibatch), with replacement otherwise."""
        if count <= len(self):
            index = torch.randperm(len(self), generator=generator)[:count]
        else:
            index = torch.randint(len(self), (count,), generator=generator)
        rows = self.rows[index].to(self.chains.rewards.device)
        return self.chains[rows], self.steps[index].to(self.chains.latents.device)

    def state_dict(self) -> dict:
        """The chains (on the CPU) and the transitions' (chain, step) pairs."""
        chains = None if self.chains is None else move(self.chains, torch.device("cpu"))
        return {"chains": chains, "rows": self.rows.clone(), "steps": self.steps.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.chains, self.rows, self.steps = state["chains"], state["rows"].clone(), state["steps"].clone()


def move(chains: Trajectories, device: torch.device) -> Trajectories:
    """A copy of the chains with every tensor on `device`."""
    values = {}
    for field in fields(chains):
        value = getattr(chains, field.name)
        if isinstance(value, torch.Tensor):
            values[field.name] = value.to(device, copy=True)
        elif isinstance(value, Conditioning):
            values[field.name] = Conditioning({name: t.to(device, copy=True) for name, t in value.tensors.items()})
    return replace(chains, **values)
