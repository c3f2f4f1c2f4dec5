"""Sweeps through Hydra's launchers and sweepers (the basic launcher: test_train's algorithm sweep)."""

import math

import pytest
import yaml

from tests.test_train import FAST, metrics, run_train


@pytest.mark.slow  # two training runs in parallel processes: about 13 s
def test_joblib_runs_a_sweeps_jobs_in_parallel_each_in_its_own_folder(tmp_path):
    result = run_train(tmp_path, "-m", "hydra/launcher=local_parallel", "seed=0,1", *FAST, "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    folders = sorted(p.parent for p in tmp_path.glob("multirun/**/metrics.jsonl"))
    assert [p.name for p in folders] == ["0_ddpo_jpeg_tiny", "1_ddpo_jpeg_tiny"]
    assert metrics(folders[0])[0]["reward_mean"] != metrics(folders[1])[0]["reward_mean"]  # seeds differ


@pytest.mark.slow  # a training run under submitit's subprocess: about 13 s
def test_submitit_runs_a_job_through_its_local_executor(tmp_path):
    """The SLURM launcher's code path but for srun: submitit pickles the job and runs it in a subprocess."""
    result = run_train(tmp_path, "-m", "hydra/launcher=submitit_local", "seed=3", *FAST, "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p.parent for p in tmp_path.glob("multirun/**/metrics.jsonl")]
    assert metrics(folder)[-1]["epoch"] == 1
    assert list(folder.parent.glob(".submitit/*/*_result.pkl")), "the job ran under submitit"


def test_the_slurm_launcher_config_fits_submitits_schema(tmp_path):
    result = run_train(tmp_path, "--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == ("gpu", 1, 1)


@pytest.mark.slow  # two training runs (trials): about 9 s
def test_optuna_search_maximises_the_held_out_reward_the_runs_return(tmp_path):
    result = run_train(tmp_path, "-m", "hparams_search=ddpo_toy", "hydra.sweeper.n_trials=2", *FAST, "epochs=1",
                       "eval.every=1", "eval.num_images=4")
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = tmp_path.glob("multirun/**/optimization_results.yaml")
    best = yaml.safe_load(report.read_text())
    trials = sorted(p.parent for p in tmp_path.glob("multirun/**/metrics.jsonl"))
    assert len(trials) == 2
    finals = [metrics(trial)[-1]["eval_reward_mean"] for trial in trials]
    assert math.isclose(best["best_value"], max(finals), rel_tol=1e-9), (best, finals)
    assert set(best["best_params"]) == {"algorithm.learning_rate", "algorithm.objective.clip_range",
                                        "algorithm.timestep_fraction"}
