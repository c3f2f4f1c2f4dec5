"""The optimize stage: inner epochs over shuffled minibatches, a random subset of each trajectory's
steps, gradient accumulation, clipping, and updates skipped when the gradients are not finite; or, for
an algorithm with a replay buffer (DPOK's schedule), a fixed number of updates on random single
transitions of the buffer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from rlfuse.algorithms import Algorithm
from rlfuse.errors import UserError
from rlfuse.policy import Policy
from rlfuse.seeding import draw_train_steps, seed_for
from rlfuse.trajectories import Trajectories


@dataclass(frozen=True)
class OptimizeSettings:
    """seed: the run's; inner_epochs: passes over the epoch's samples; batch_size: trajectories per
    minibatch (per process); steps_per_trajectory: how many of each trajectory's trainable steps are
    trained on; max_grad_norm: the clipping norm; accumulation_steps: minibatches per optimizer step
    (used by the replay schedule, which counts its updates)."""

    seed: int
    inner_epochs: int
    batch_size: int
    steps_per_trajectory: int
    max_grad_norm: float
    accumulation_steps: int = 1


@dataclass
class NonFiniteGuard:
    """Counts NaN/Inf rewards (the epoch's training is skipped) and NaN/Inf gradients (the update is
    skipped), and stops the run after max_in_row of either in a row. skipped: this epoch's counts."""

    max_in_row: int
    rewards_in_row: int = 0
    updates_in_row: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def start_epoch(self) -> None:
        self.skipped = {"skipped_nonfinite_rewards": 0, "skipped_nonfinite_updates": 0}

    def rewards(self, finite: bool, epoch: int) -> None:
        self.rewards_in_row = 0 if finite else self.rewards_in_row + 1
        self.skipped["skipped_nonfinite_rewards"] += 0 if finite else 1
        self._stop_if_stuck(self.rewards_in_row, epoch, "the reward returned NaN or Inf")

    def update(self, finite: bool, epoch: int) -> None:
        self.updates_in_row = 0 if finite else self.updates_in_row + 1
        self.skipped["skipped_nonfinite_updates"] += 0 if finite else 1
        self._stop_if_stuck(self.updates_in_row, epoch, "the loss gave NaN or Inf gradients")

    def _stop_if_stuck(self, in_row: int, epoch: int, what: str) -> None:
        if in_row >= self.max_in_row:
            raise UserError(f"epoch {epoch}: {what} {in_row} times in a row (max_nonfinite_in_row="
                            f"{self.max_in_row}); stopping. Check the reward (and the learning rate); the "
                            f"last checkpoint is intact and resume=auto continues from it")


def minibatches(samples: Trajectories, unit: int, batch_size: int, shuffle: torch.Generator):
    """Yield (rows (b,), units (b / unit,)) of a shuffled pass; units of `unit` adjacent rows (pairs)
    stay together."""
    order = torch.randperm(len(samples) // unit, generator=shuffle)
    for start in range(0, len(order), batch_size // unit):
        units = order[start:start + batch_size // unit]
        yield (units[:, None] * unit + torch.arange(unit)).reshape(-1), units


def optimize(policy: Policy, algorithm: Algorithm, samples: Trajectories, trainable_steps: torch.Tensor,
             settings: OptimizeSettings, accelerator, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
             guard: NonFiniteGuard, epoch: int, progress: bool = False) -> tuple[dict[str, float], int]:
    """Train on the epoch's samples; returns (loss and diagnostics averaged over every micro-step of
    every process, micro-steps taken by this process).

    trainable_steps: (T',) the sampler steps that may be trained on. The steps of each trajectory (or
    pair) are drawn from its sample id's seed, so they do not depend on the process count.
    """
    if getattr(algorithm, "replay_buffer", None) is not None:
        return optimize_from_buffer(policy, algorithm, samples, trainable_steps, settings, accelerator, optimizer,
                                    params, guard, epoch, progress)
    network, device = policy.network, accelerator.device
    network.train()
    rank = accelerator.process_index
    shuffle = torch.Generator().manual_seed(seed_for(settings.seed, epoch, rank, 4))  # minibatch order
    stats_sum: dict[str, torch.Tensor] = {}    # name -> sum over micro-steps (NaN entries skipped)
    stats_count: dict[str, torch.Tensor] = {}
    micro_steps, count = 0, settings.steps_per_trajectory
    unit = 2 if algorithm.pairs else 1          # pairs (rows 2i, 2i+1) stay together, on the same steps
    for inner in range(settings.inner_epochs):
        # (N / unit, count) the steps of each trajectory (or pair) trained on, seeded by its sample id.
        step_order = draw_train_steps(trainable_steps, [seed_for(settings.seed, epoch, 3, inner, i)
                                                        for i in samples.sample_ids[::unit].tolist()], count)
        bar = tqdm(total=len(samples) // settings.batch_size * count, disable=not progress, leave=False,
                   desc=f"epoch {epoch} train {inner + 1}/{settings.inner_epochs}")
        for rows, units in minibatches(samples, unit, settings.batch_size, shuffle):
            batch = samples[rows.to(samples.rewards.device)]
            batch_steps = step_order[units].repeat_interleave(unit, dim=0).to(device)  # (b, count)
            for j in range(count):
                loss, stats = accumulation_step(policy, algorithm, batch, batch_steps[:, j], accelerator,
                                                optimizer, params, settings.max_grad_norm, guard, epoch)
                add_stats(stats_sum, stats_count, {"loss": loss, **stats})
                micro_steps += 1
                bar.update(1)
        bar.close()
    return reduce_means(accelerator, stats_sum, stats_count), micro_steps


def optimize_from_buffer(policy: Policy, algorithm: Algorithm, samples: Trajectories, trainable_steps: torch.Tensor,
                         settings: OptimizeSettings, accelerator, optimizer: torch.optim.Optimizer,
                         params: list[torch.Tensor], guard: NonFiniteGuard, epoch: int,
                         progress: bool = False) -> tuple[dict[str, float], int]:
    """DPOK's schedule: the epoch's chains join the algorithm's replay buffer (every trainable step a
    transition; the algorithm may update its value function there), then buffer.updates_per_round
    optimizer steps, each on settings.accumulation_steps minibatches of settings.batch_size random
    transitions. Returns what optimize returns. The draws follow (seed, epoch, rank)."""
    policy.network.train()
    buffer, device = algorithm.replay_buffer, accelerator.device
    draws = torch.Generator().manual_seed(seed_for(settings.seed, epoch, accelerator.process_index, 5))
    stats_sum: dict[str, torch.Tensor] = {}
    stats_count: dict[str, torch.Tensor] = {}
    add_stats(stats_sum, stats_count, algorithm.remember(samples, trainable_steps, draws))
    micro_steps = buffer.updates_per_round * settings.accumulation_steps
    bar = tqdm(total=micro_steps, disable=not progress, leave=False, desc=f"epoch {epoch} train (replay)")
    for _ in range(micro_steps):
        batch, step_index = buffer.draw(settings.batch_size, draws)                 # (b,) chains, (b,) steps
        loss, stats = accumulation_step(policy, algorithm, batch, step_index.to(device), accelerator, optimizer,
                                        params, settings.max_grad_norm, guard, epoch)
        add_stats(stats_sum, stats_count, {"loss": loss, **stats})
        bar.update(1)
    bar.close()
    return reduce_means(accelerator, stats_sum, stats_count), micro_steps


def add_stats(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], stats: dict) -> None:
    """Add one micro-step's scalar diagnostics to the running sums and counts (NaN entries skipped), with
    no device sync."""
    for name, value in stats.items():
        value = value.detach().float()
        present = ~torch.isnan(value)
        sums[name] = sums.get(name, 0.0) + torch.where(present, value, 0.0)
        counts[name] = counts.get(name, 0.0) + present.float()


def accumulation_step(policy: Policy, algorithm: Algorithm, batch: Trajectories, step_index: torch.Tensor,
                      accelerator, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                      max_grad_norm: float, guard: NonFiniteGuard, epoch: int) -> tuple[torch.Tensor, dict]:
    """One micro-step: the loss of step step_index (b,) of each trajectory, backward, and, at the end of
    an accumulation, a clipped optimizer step unless the gradients are not finite."""
    with accelerator.accumulate(policy.network):
        with accelerator.autocast():
            loss, stats = algorithm.loss(policy, batch, step_index)
        accelerator.backward(loss)
        finite = True
        if accelerator.sync_gradients:
            # A NaN or Inf gradient (synchronised, so the same on every process) skips the update: no
            # step at all, since AdamW's decay and momentum move weights even at zero gradient. (fp16's
            # loss scaler skips such steps itself; DeepSpeed clips inside its engine, returns no norm,
            # and skips them itself.)
            grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
            finite = accelerator.scaler is not None or grad_norm is None or bool(torch.isfinite(grad_norm))
            guard.update(finite, epoch)
        if finite:
            optimizer.step()
        optimizer.zero_grad()
    return loss, stats


def reduce_means(accelerator, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: sum over processes / count over processes} (NaN where nothing was counted); {} if no names."""
    names = sorted(sums)  # the same names on every process (none when the epoch was skipped)
    if not names:
        return {}
    device = accelerator.device
    total = accelerator.reduce(torch.stack([sums[n] for n in names]).to(device), reduction="sum")
    count = accelerator.reduce(torch.stack([counts[n] for n in names]).to(device), reduction="sum")
    return {name: (t / c if c > 0 else math.nan) for name, t, c in zip(names, total.tolist(), count.tolist())}
