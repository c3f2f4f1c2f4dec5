"""Seeds follow (seed, epoch, sample id, purpose): the same draws whatever the process count."""

import torch

from rlfuse.seeding import draw_train_steps, initial_noise, seed_for


def test_trained_steps_are_distinct_drawn_from_the_trainable_ones_and_follow_the_seed():
    trainable = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])      # the steps with std >= min_step_std of 10
    steps = draw_train_steps(trainable, [11, 12, 13, 11], count=4)
    assert steps.shape == (4, 4)
    assert all(len(set(row.tolist())) == 4 and set(row.tolist()) <= set(trainable.tolist()) for row in steps)
    assert torch.equal(steps[0], steps[3]) and not torch.equal(steps[0], steps[1])   # the seed decides
    # Over many trajectories every trainable step is drawn, and never steps 8 and 9.
    drawn = draw_train_steps(trainable, list(range(200)), count=4).unique()
    assert drawn.tolist() == trainable.tolist()
    # With every step trainable (min_step_std=0) the draw is a plain permutation's head, as before the option.
    everything = torch.arange(10)
    assert torch.equal(draw_train_steps(everything, [5], count=3)[0],
                       torch.randperm(10, generator=torch.Generator().manual_seed(5))[:3])


def test_seeds_are_independent_streams_and_initial_noise_follows_its_seed():
    assert seed_for(0, 1, 2) == seed_for(0, 1, 2) != seed_for(0, 2, 1)
    assert 0 <= seed_for(7) < 2**63
    noise = initial_noise((4, 2, 2), [5, 6, 5])
    assert noise.shape == (3, 4, 2, 2)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
