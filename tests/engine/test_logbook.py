"""The log stage alone: metrics.jsonl lines, TensorBoard events, the summary line, resume truncation."""

import json
import math

import torch

from rlfuse.engine.logbook import Logbook, drop_epochs_from, epoch_metrics, summary_line


def test_resume_drops_the_epochs_logged_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(5)) + '{"epoch": 5, "rew')
    drop_epochs_from(path, 3)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_epoch_metrics_over_all_processes_and_nan_criteria_left_out():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    row = epoch_metrics(2, rewards, {"position": [1.0, math.nan, 0.0, math.nan]}, {"weight_ess": 3.0},
                        {"loss": 0.5}, {"skipped_nonfinite_rewards": 0}, 0.0, transitions=40, sample_seconds=2.0,
                        train_seconds=4.0)
    assert row["reward_mean"] == 2.5 and row["reward_std"] == torch.tensor([1.0, 2, 3, 4]).std(unbiased=False).item()
    assert row["reward_position"] == 0.5  # NaN where a criterion does not apply
    assert row["samples"] == 4 and row["samples_per_s"] == 2.0 and row["transitions_per_s"] == 10.0
    assert row["loss"] == 0.5 and row["weight_ess"] == 3.0


def test_an_epoch_goes_to_metrics_jsonl_tensorboard_and_one_summary_line(tmp_path, caplog):
    logbook = Logbook(tmp_path, first_epoch=1, epochs=3, progress=False)
    metrics = {"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1, "loss": 0.25, "clipfrac": 0.0, "seconds": 1.5}
    with caplog.at_level("INFO", logger="rlfuse"):
        logbook.epoch(metrics, torch.rand(3, 10, 10))
    logbook.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == metrics
    assert (tmp_path / "samples" / "epoch_0001.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert "epoch 1/3 | reward 0.5000 ± 0.1000 | loss 0.25 | clipfrac 0 | 1.5s" in caplog.text
    assert summary_line({**metrics, "eval_reward_mean": 0.7}, 3).endswith("| eval 0.7000")
