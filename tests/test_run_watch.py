"""A short run watched: the monitors' metrics, the best checkpoint beside rotation, early stopping and the
learning-rate schedule, end to end on model=tiny; and the schedule across a resume."""

import json

import pytest
import torch

from tests.test_train import FAST, RESUMABLE, assert_same_final_run, kill_after_epoch_2, metrics, run_train, train

WATCHED = ["model=tiny", "reward=shapes", "prompts=shapes", "hardware.sample_batch_size=4",
           "hardware.train_batch_size=4", "sample.batches_per_epoch=2", "sample.num_steps=6", "progress=false",
           "log.images_every=0", "epochs=4", "eval.every=1", "eval.num_images=8", "eval.rewards=[jpeg]",
           "eval.diversity.space=pixel", "eval.diversity.prompts=2", "eval.drift=true", "algorithm.learning_rate=3e-3",
           "checkpoint.best=eval_jpeg", "checkpoint.best_mode=min", "checkpoint.every=1", "checkpoint.keep=1",
           "early_stop.patience=2", "lr_schedule.name=cosine", "lr_schedule.warmup_steps=2",
           "log.trackers=[tensorboard,wandb]"]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    root = tmp_path_factory.mktemp("watched")
    result = run_train(root, *WATCHED, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next(root.glob("**/.hydra")).parent
    return run_dir, result.stderr + result.stdout


@pytest.mark.slow  # one watched 4-epoch run shared by the module (30-80 s)
def test_every_evaluation_logs_the_panel_diversity_and_drift(watched):
    run_dir, _ = watched
    rows = [r for r in metrics(run_dir) if "eval_reward_mean" in r]
    for row in rows:
        assert {"eval_jpeg", "eval_diversity", "eval_drift_pixel", "eval_drift_kl"} <= set(row)
        assert row["eval_jpeg"] < 0 and row["eval_diversity"] > 0
    assert rows[0]["epoch"] == 0 and rows[0]["eval_drift_pixel"] == 0 and rows[0]["eval_drift_kl"] == 0
    assert rows[-1]["eval_drift_pixel"] > 0 and rows[-1]["eval_drift_kl"] > 0      # the LoRA moved the model
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb")) and list(run_dir.glob("tensorboard/events.*"))


@pytest.mark.slow
def test_the_best_checkpoint_is_the_best_evaluation_and_survives_rotation(watched):
    run_dir, log = watched
    rows = [r for r in metrics(run_dir) if "eval_jpeg" in r]
    best_row = min(rows, key=lambda r: (r["eval_jpeg"], r["epoch"]))          # mode min, the first of equals
    note = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())
    assert note == {"metric": "eval_jpeg", "mode": "min", "value": best_row["eval_jpeg"], "epoch": best_row["epoch"]}
    state = torch.load(run_dir / "checkpoints" / "best" / "state.pt", weights_only=False)
    assert state["epoch"] == best_row["epoch"]
    epochs = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert sorted(epochs) == sorted(["best", f"epoch_{rows[-1]['epoch']:06d}"])  # keep=1 pruned the others
    assert f"best eval_jpeg {best_row['eval_jpeg']:.4f} at epoch {best_row['epoch']}" in log


@pytest.mark.slow
def test_early_stop_ends_the_run_after_patience_evaluations_without_improvement(watched):
    run_dir, log = watched
    values = [r["eval_jpeg"] for r in metrics(run_dir) if "eval_jpeg" in r]
    best, stale, stop_at = values[0], 0, None
    for epoch, value in enumerate(values[1:], start=1):       # one evaluation per epoch
        stale = 0 if value < best else stale + 1
        best = min(best, value)
        if stale >= 2:
            stop_at = epoch
            break
    assert metrics(run_dir)[-1]["epoch"] == (stop_at or 4)
    assert ("early stop: eval_jpeg has not improved" in log) == (stop_at is not None)


def test_a_run_that_stops_improving_ends_early_with_exit_0_a_line_and_its_best_checkpoint(tmp_path):
    """At learning rate 0 every evaluation scores the same: no improvement after epoch 0, so patience 2
    stops the run after epoch 2 of 6, with the epoch-0 model as the best."""
    result = run_train(tmp_path, *FAST, "epochs=6", "algorithm.learning_rate=0", "algorithm.adam_weight_decay=0",
                       "eval.every=1", "eval.num_images=2", "checkpoint.best=eval_reward_mean",
                       "early_stop.patience=2", "log.images_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next(tmp_path.glob("**/.hydra")).parent
    assert [r["epoch"] for r in metrics(run_dir)] == [0, 1, 2]
    assert "early stop: eval_reward_mean has not improved by more than 0 over the last 2 evaluations " \
           "(early_stop.patience=2)" in result.stdout + result.stderr
    assert json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())["epoch"] == 0
    assert (run_dir / "checkpoints" / "epoch_000002").is_dir()           # the stopped run's last checkpoint


@pytest.mark.slow
def test_the_cosine_schedule_with_warm_up_sets_each_epochs_learning_rate(watched, monkeypatch):
    from diffusers.optimization import get_scheduler

    from rlfuse.cli import check_overrides
    from rlfuse.config import preflight, updates_per_epoch

    run_dir, _ = watched
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = check_overrides("train", WATCHED)
    per_epoch = updates_per_epoch(cfg, preflight(cfg))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=4 * per_epoch)
    expected = []
    for _ in range(4):
        for _ in range(per_epoch):
            optimizer.step()
            schedule.step()
        expected.append(schedule.get_last_lr()[0])
    logged = [r["lr"] for r in metrics(run_dir) if r["epoch"] > 0]
    assert logged == pytest.approx(expected[:len(logged)], rel=1e-9)
    assert expected[0] > expected[-1] and expected[-1] < 3e-3


@pytest.mark.slow
def test_a_scheduled_run_killed_mid_training_resumes_bit_identical(tmp_path):
    """A cosine schedule with warm-up: SIGKILL after the epoch-2 checkpoint, resume=auto, same weights and
    the same learning rate at every epoch as the uninterrupted run."""
    scheduled = [*RESUMABLE, "lr_schedule.name=cosine", "lr_schedule.warmup_steps=3"]
    full = train(tmp_path / "a", *scheduled)
    kill_after_epoch_2(tmp_path / "b", *scheduled)
    resumed = train(tmp_path / "b", *scheduled, "resume=auto")
    assert_same_final_run(full, resumed)
    assert [r["lr"] for r in metrics(full)] == [r["lr"] for r in metrics(resumed)]
    assert len(set(r["lr"] for r in metrics(full))) == 4                # it did change every epoch
    state = torch.load(resumed / "checkpoints" / "epoch_000004" / "state.pt", weights_only=False)
    assert state["lr_schedule"]["last_epoch"] == 4 * 2 * 2                # one step per optimizer update
