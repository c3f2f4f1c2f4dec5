"""The best evaluation so far and early stopping, on constructed metric sequences."""

import math

import pytest

from rlfuse.engine.best import BestTracker
from rlfuse.errors import UserError


def feed(tracker: BestTracker, values: list[float]) -> tuple[list[bool], list[bool]]:
    """(new best?, should stop?) after each value, at epochs 0, 10, 20, ..."""
    bests, stops = [], []
    for i, value in enumerate(values):
        bests.append(tracker.update(value, 10 * i))
        stops.append(tracker.should_stop)
    return bests, stops


def test_a_rise_then_a_collapse_keeps_the_peak_and_stops_after_patience_evaluations():
    # The shape of a collapsing seed: 0.710 -> 0.758 -> 0.730 -> 0.744 -> 0.708 -> 0.485.
    tracker = BestTracker("eval_reward_mean", "max", patience=3)
    bests, stops = feed(tracker, [0.710, 0.714, 0.758, 0.730, 0.744, 0.708, 0.485])
    assert bests == [True, True, True, False, False, False, False]
    assert stops == [False, False, False, False, False, True, True]
    assert (tracker.best, tracker.best_epoch) == (0.758, 20)
    assert "best 0.7580 at epoch 20" in tracker.stop_reason()


def test_gains_within_min_delta_keep_the_best_checkpoint_moving_but_do_not_hold_off_the_stop():
    tracker = BestTracker("eval_reward_mean", "max", patience=2, min_delta=0.01)
    bests, stops = feed(tracker, [0.70, 0.705, 0.709, 0.7095])
    assert bests == [True, True, True, True]          # each is the best evaluated so far
    assert stops == [False, False, True, True]         # none beat 0.70 by more than 0.01
    tracker = BestTracker("eval_reward_mean", "max", patience=2, min_delta=0.01)
    assert feed(tracker, [0.70, 0.705, 0.72, 0.721])[1] == [False, False, False, False]  # 0.72 resets the count


def test_min_mode_follows_falling_values_and_nan_never_becomes_the_best():
    tracker = BestTracker("loss", "min", patience=0)
    bests, stops = feed(tracker, [math.nan, 3.0, 2.0, math.nan, 2.5, 1.0])
    assert bests == [False, True, True, False, False, True]
    assert not any(stops)                              # patience 0: never stop
    assert (tracker.best, tracker.best_epoch) == (1.0, 50)


def test_state_round_trips_so_a_resumed_run_keeps_its_best_and_its_count():
    tracker = BestTracker("eval_reward_mean", "max", patience=3)
    feed(tracker, [0.5, 0.7, 0.6])
    resumed = BestTracker("eval_reward_mean", "max", patience=3)
    resumed.load_state_dict(tracker.state_dict())
    assert (resumed.best, resumed.best_epoch, resumed.stale) == (0.7, 10, 1)
    assert [resumed.update(v, e) for v, e in ((0.65, 30), (0.69, 40))] == [False, False]
    assert resumed.should_stop


def test_a_metric_that_is_not_logged_is_named_with_the_ones_that_are():
    tracker = BestTracker("eval_score", "max")
    assert tracker.observe({"epoch": 0, "eval_reward_mean": 0.5}, 0) is False   # before training: skipped
    with pytest.raises(UserError, match="checkpoint.best=eval_score: not a logged metric; choose one of "
                                        "eval_reward_mean, reward_mean"):
        tracker.observe({"epoch": 10, "eval_reward_mean": 0.5, "reward_mean": 0.4}, 10)
