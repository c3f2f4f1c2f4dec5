"""The optimize stage alone: micro-steps, accumulation, pairs kept together, NaN/Inf updates skipped."""

import math

import pytest
import torch
from engine_samples import NUM_STEPS, draw_samples

from rlfuse.algorithms.d3po import D3PO
from rlfuse.algorithms.ddpo import DDPO
from rlfuse.engine.optimize import NonFiniteGuard, OptimizeSettings, minibatches, optimize
from rlfuse.errors import UserError
from rlfuse.lora import trainable_parameters


def settings(**changes) -> OptimizeSettings:
    values = {"seed": 0, "inner_epochs": 1, "batch_size": 4, "steps_per_trajectory": 2, "max_grad_norm": 1.0}
    return OptimizeSettings(**{**values, **changes})


def run(accelerator, policy, optimizer, algorithm, samples, guard=None, **changes):
    params = list(trainable_parameters(policy.network).values())
    guard = guard or NonFiniteGuard(3)
    guard.start_epoch()
    return optimize(policy, algorithm, samples, torch.arange(NUM_STEPS), settings(**changes), accelerator,
                    optimizer, params, guard, epoch=1), guard


def test_every_minibatch_trains_its_steps_and_moves_the_weights(accelerator, tiny_policy):
    family, policy, optimizer = tiny_policy
    samples = draw_samples(family)
    algorithm = DDPO(clip_range=0.2, advantages="batch")
    samples = samples.with_advantages(algorithm.advantages(samples.prompts, samples.rewards)[0])
    before = {n: p.detach().clone() for n, p in trainable_parameters(family.network).items()}
    (stats, micro_steps), guard = run(accelerator, policy, optimizer, algorithm, samples, inner_epochs=2)
    assert micro_steps == 2 * (8 // 4) * 2            # inner epochs x minibatches x steps per trajectory
    assert math.isfinite(stats["loss"]) and 0 <= stats["clipfrac"] <= 1
    assert guard.skipped == {"skipped_nonfinite_rewards": 0, "skipped_nonfinite_updates": 0}
    after = trainable_parameters(family.network)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_pairs_stay_together_in_minibatches():
    from rlfuse.trajectories import Trajectories

    samples = Trajectories.__new__(Trajectories)
    samples.prompts = ["p"] * 12
    shuffle = torch.Generator().manual_seed(0)
    batches = list(minibatches(samples, unit=2, batch_size=4, shuffle=shuffle))
    assert len(batches) == 3
    rows = torch.cat([r for r, _ in batches])
    assert sorted(rows.tolist()) == list(range(12))
    for batch_rows, _ in batches:
        assert all(batch_rows[i] % 2 == 0 and batch_rows[i + 1] == batch_rows[i] + 1 for i in range(0, 4, 2))


def test_d3po_trains_on_pairs_of_its_samples(accelerator, tiny_policy):
    family, policy, optimizer = tiny_policy
    samples = draw_samples(family)
    algorithm = D3PO()
    samples = samples.with_advantages(algorithm.advantages(samples.prompts, samples.rewards)[0])
    (stats, micro_steps), _ = run(accelerator, policy, optimizer, algorithm, samples, steps_per_trajectory=1)
    assert micro_steps == 2
    # The first minibatch sees the policy equal to its reference: log 2 per pair; the mean is near it.
    assert abs(stats["loss"] - math.log(2)) < 0.05


def test_a_nan_gradient_skips_the_update_and_too_many_stop_the_run(accelerator, tiny_policy):
    family, policy, optimizer = tiny_policy
    samples = draw_samples(family)
    samples = samples.with_advantages(torch.full((len(samples),), float("nan")))
    before = {n: p.detach().clone() for n, p in trainable_parameters(family.network).items()}
    (_, micro_steps), guard = run(accelerator, policy, optimizer, DDPO(), samples, guard=NonFiniteGuard(100))
    assert guard.skipped["skipped_nonfinite_updates"] == micro_steps == 4
    after = trainable_parameters(family.network)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped update moved a weight"
    with pytest.raises(UserError, match="the loss gave NaN or Inf gradients 3 times in a row"):
        run(accelerator, policy, optimizer, DDPO(), samples, guard=NonFiniteGuard(3))


def test_guard_counts_nonfinite_rewards_and_resets_on_a_finite_epoch():
    guard = NonFiniteGuard(2)
    guard.start_epoch()
    guard.rewards(False, epoch=1)
    assert guard.skipped["skipped_nonfinite_rewards"] == 1
    guard.start_epoch()
    guard.rewards(True, epoch=2)
    guard.rewards(False, epoch=3)
    with pytest.raises(UserError, match="epoch 4: the reward returned NaN or Inf 2 times in a row"):
        guard.rewards(False, epoch=4)
