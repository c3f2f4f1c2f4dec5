"""Across processes: gather an epoch's samples in sample-id order, give each process its advantages,
and check that every process holds the same weights."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from rlfuse.algorithms import Algorithm
from rlfuse.trajectories import Trajectories


class Scored(NamedTuple):
    """The epoch's batch over all processes after the advantages stage.

    samples: this process's Trajectories, advantages filled in when the rewards were finite;
    rewards: (P * N,) every process's rewards in sample-id order (on this process's device);
    finite: every reward (and reward term) is finite; stats: the algorithm's diagnostics.
    """

    samples: Trajectories
    rewards: torch.Tensor
    finite: bool
    stats: dict[str, float]


def assign_advantages(accelerator, samples: Trajectories, algorithm: Algorithm) -> Scored:
    """Advantages over the batch of all processes; each process keeps its own slice.

    Gathered in rank order, then put in sample-id order, so that advantages (e.g. the order in which
    the per-prompt buffers fill) do not depend on the number of processes. Every process sees the
    same gathered rewards, so a non-finite reward makes all of them skip the epoch together.
    """
    from accelerate.utils import gather_object

    device = samples.rewards.device
    by_id = accelerator.gather(samples.sample_ids).cpu().argsort()          # (P * N,)
    rewards = accelerator.gather(samples.rewards)[by_id.to(device)]        # (P * N,) in sample-id order
    gathered_prompts = gather_object(samples.prompts)
    prompts = [gathered_prompts[i] for i in by_id.tolist()]
    terms = samples.reward_terms.new_zeros(len(prompts), 0).cpu()
    if samples.reward_terms.shape[1] > 0:                                   # (P * N, R) of a combined reward
        terms = accelerator.gather(samples.reward_terms).cpu()[by_id]
    finite = bool(torch.isfinite(rewards).all()) and bool(torch.isfinite(terms).all())
    if not finite:
        return Scored(samples, rewards, False, {})
    advantages, stats = algorithm.advantages(prompts, rewards.cpu(), terms)  # (P * N,) by sample id
    in_rank_order = torch.empty_like(advantages)
    in_rank_order[by_id] = advantages
    world, rank = accelerator.num_processes, accelerator.process_index
    return Scored(samples.with_advantages(in_rank_order.reshape(world, -1)[rank]), rewards, True, stats)


def gather_lists(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """{name: every process's values, in rank order}; names sorted (the same on every process)."""
    from accelerate.utils import gather_object

    return {name: gather_object(values[name]) for name in sorted(values)}


def weights_spread(accelerator, params: list[torch.Tensor], sharded_weights: bool) -> float:
    """The spread (max - min) over processes of a checksum of the trained weights: 0 when gradients are
    synchronised, as they must be. NaN under FSDP, where each process holds a different shard by design."""
    if sharded_weights:
        return math.nan
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum()
    checksums = accelerator.gather(checksum[None].to(accelerator.device))
    return (checksums.max() - checksums.min()).item()


def shared_run_dir(accelerator, folder_on_rank0: str | None):
    """The run folder rank 0 chose (Hydra's), told to every process: ranks that start in different
    seconds would otherwise resolve different folders."""
    from pathlib import Path

    from accelerate.utils import broadcast_object_list

    folder = [folder_on_rank0 if accelerator.is_main_process else None]
    broadcast_object_list(folder)
    return Path(folder[0])
