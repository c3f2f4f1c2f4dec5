"""The start-up checks of trackers, monitors, best checkpoint, early stopping and schedules: one line,
exit 2, no run folder."""

import pytest

from tests.test_configs import run_cli


@pytest.mark.parametrize("args, expected", [
    (["log.trackers=[neptune]"], "log.trackers: no tracker 'neptune'; use any of tensorboard, wandb, mlflow"),
    (["lr_schedule.name=exponential"], "lr_schedule.name=exponential: use one of constant, linear, cosine"),
    (["lr_schedule.warmup_steps=-1"], "lr_schedule.warmup_steps=-1: must be >= 0"),
    (["checkpoint.best_mode=highest"], "checkpoint.best_mode=highest: use max or min"),
    (["checkpoint.best=eval_reward_mean", "eval.every=0"], "the best checkpoint is chosen at evaluations"),
    (["early_stop.patience=3"], "early_stop.patience=3: early stopping watches checkpoint.best's metric"),
    (["checkpoint.best=eval_reward_mean", "early_stop.min_delta=-0.1"], "early_stop.min_delta=-0.1: must be >= 0"),
    (["eval.rewards=[jpg]"], "eval.rewards: no reward 'jpg'; choose among"),
    (["eval.rewards=[shapes]"], "eval.rewards: shapes is the trained reward"),
    (["eval.rewards=[aesthetic]"], "eval.rewards: aesthetic: "),
    (["eval.diversity.space=lpips"], "eval.diversity.space=lpips: use null (off), pixel or clip"),
    (["eval.diversity.space=pixel", "eval.diversity.images_per_prompt=1"],
     "eval.diversity.images_per_prompt=1: must be >= 2"),
    (["eval.diversity.space=clip"], "eval.diversity: CLIP weights ViT-L-14/openai are not in the Hugging Face cache"),
])
def test_bad_watch_settings_fail_in_one_line_with_exit_code_2(args, expected, tmp_path):
    result = run_cli(*args, f"run_root={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "no run folder is made for a bad command line"


def test_wandb_without_a_key_or_offline_mode_is_refused_before_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                  # no ~/.netrc
    result = run_cli("log.trackers=[wandb]", f"run_root={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert "log.trackers: wandb has no API key; run `wandb login`" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_tracker_that_is_not_installed_names_the_extra_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = run_cli("log.trackers=[tensorboard,wandb]", f"run_root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rlfuse: error: log.trackers: wandb is not installed; pip install 'rlfuse[wandb]' (or drop it from log.trackers)"]
