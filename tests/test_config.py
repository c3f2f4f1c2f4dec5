"""The start-up check as a function: what it builds, and the capability mismatches it refuses."""

import pytest
import torch

from rlfuse.cli import check_overrides
from rlfuse.config import micro_steps_per_update, preflight, steps_per_trajectory
from rlfuse.errors import UserError

TINY = ["model=tiny", "reward=jpeg", "prompts=simple_animals"]


def checked(*overrides: str):
    cfg = check_overrides("train", list(overrides))
    return cfg, preflight(cfg)


def test_the_default_run_trains_three_of_the_six_noisiest_steps():
    cfg, result = checked()
    assert torch.equal(result.trainable_steps, torch.arange(6))  # std >= 0.4 of the toy's 10 DDIM steps
    assert steps_per_trajectory(cfg, result) == 3
    assert not result.replay and len(result.eval_prompts) == 133
    # one optimizer step per minibatch (accumulation 1), each of 3 trained steps
    assert micro_steps_per_update(cfg, result) == 3


def test_the_score_function_estimator_accumulates_the_whole_round():
    cfg, result = checked(*TINY, "algorithm.objective.estimator=score_function", "sample.batches_per_epoch=4",
                          "algorithm.min_step_std=0")
    minibatches = 4 * cfg.hardware.sample_batch_size // cfg.hardware.train_batch_size
    assert micro_steps_per_update(cfg, result) == minibatches * steps_per_trajectory(cfg, result)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm=d3po", "sample.images_per_prompt=1"], "trains on pairs of images of one prompt"),
    (["algorithm=d3po", "hardware.train_batch_size=3", "hardware.sample_batch_size=6"], "needs an even minibatch"),
    (["algorithm.objective.estimator=score_function", "algorithm.inner_epochs=2"], "one step per sampling round"),
    (["feedback=human", "feedback.path=/nowhere"], "cannot learn from preference labels"),
    (["model.resolution=30", "model.pretrained=null"], None),
])
def test_capability_mismatches_are_refused_once_at_start_up(overrides, message):
    if message is None:  # a valid resolution of the tiny model passes
        checked(*TINY, *overrides)
        return
    with pytest.raises(UserError, match=message):
        checked(*TINY, *overrides)
