"""Every combination of config groups composes and builds; bad command lines fail in one line with exit 2."""

import io
import itertools
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import hydra.utils
import pytest

from rlfuse.cli import check_overrides, config_groups, group_choices

GROUPS = [g for g in config_groups() if g != "experiment"]
# Algorithm, reward and model family interact (d3po changes sampling keys; families differ in keys):
# every algorithm x reward x family (one model of each) composes and builds; every other choice,
# each model included, is composed once with the defaults.
FAMILY_MODELS = ["model=tiny", "model=tiny_sdxl", "model=tiny_sd3", "model=tiny_flux"]  # families sd, sdxl, sd3, flux
CORE = ("algorithm", "reward")
COMBINATIONS = list(itertools.product(*[[f"{g}={c}" for c in group_choices(g)] for g in CORE], FAMILY_MODELS))
COMBINATIONS += [(f"{g}={c}",) for g in GROUPS if g not in CORE for c in group_choices(g)]


@pytest.mark.parametrize("overrides", COMBINATIONS, ids=lambda o: ",".join(o))
def test_group_choices_compose_together_and_their_parts_build(overrides):
    cfg = check_overrides("train", list(overrides))
    assert cfg.algorithm.name and cfg.reward.name and cfg.model.name and cfg.hardware.name
    hydra.utils.instantiate(cfg.algorithm.objective)
    reward = hydra.utils.instantiate(cfg.reward.fn)
    assert callable(reward)
    if cfg.prompts.name != "file":  # the file source needs a user path (prompts.train=...)
        assert cfg.prompts.train


def test_the_combinations_cover_every_model_family():
    from rlfuse.families import FAMILIES

    assert {check_overrides("train", [m]).model.family for m in FAMILY_MODELS} == set(FAMILIES)


@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_every_experiment_composes_and_its_parts_build(experiment):
    cfg = check_overrides("train", [f"experiment={experiment}"])
    hydra.utils.instantiate(cfg.algorithm.objective)
    assert cfg.epochs > 0


def test_every_config_key_carries_a_comment():
    """STYLE: every value key has a comment on its line (Hydra's own settings excepted)."""
    from rlfuse.cli import CONF_DIR

    for path in CONF_DIR.rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines()):
            if line.startswith("hydra:"):
                break  # Hydra's own settings (run folder, help text) close the root file
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
                continue
            key, _, value = stripped.partition(":")
            if key in ("name", "_target_", "defaults") or not value.split("#")[0].strip():
                continue  # identifiers and section headers
            assert "#" in value, f"{path.name}:{number + 1}: '{stripped}' has no comment"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Result:
    """`python -m rlfuse.train <args>` in this process (the start-up checks are what is tested; the
    program's own process is exercised by tests/test_train.py): exit code, stdout, stderr."""
    from rlfuse.train import main

    argv, stdout, stderr = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["rlfuse.train", *args]
    code = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            main()
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        sys.argv = argv
    return Result(code, stdout.getvalue(), stderr.getvalue())


@pytest.mark.parametrize("args, expected", [
    (["nonsense_key=1"], "unknown config key 'nonsense_key'"),
    (["sample.num_stepz=3"], "unknown config key 'sample.num_stepz'"),
    (["model=sd99"], "valid choices: flux_dev, flux_schnell, sd14, sd15, sd21, sd3, sd35l, sd35m, sdxl, tiny, tiny_flux, tiny_sd3, tiny_sdxl, toy, toy_flow"),
    (["sample.eta=fast"], "'sample.eta' must be a float"),
    (["epochs=2.5"], "'epochs' must be an int"),
    (["sample.eta=0"], "must be > 0"),
    (["model.pretrained=/no/such/folder"], "no such folder"),
    (["model.pretrained=nobody/not-cached-model"], "not in the Hugging Face cache"),
    (["-m", "seed=0,1", "model=tiny,nope"], "valid choices"),
    (["prompts=file"], "prompts.train: required but not set"),
    (["sample.num_steps=${nope}"], "Interpolation key 'nope' not found"),
    (["sample.batches_per_epoch=0"], "must be >= 1"),
    (["reward=jpeg", "prompts=simple_animals", "reward.fn.objective=compresibility"], "reward.fn: objective='compresibility'"),
    (["algorithm.learning_rate=interval(1e-5,1e-3)"], "an interval needs a sweeper"),
    (["resume=/no/such/run"], "not a run folder"),
    (["reward=shapes", "prompts=simple_animals"], "outside the shapes grammar"),
    (["reward=aesthetic", "prompts=simple_animals"], "not in the Hugging Face cache"),
    (["reward=multi", "prompts=simple_animals"], "not in the Hugging Face cache"),
    (["reward=http", "prompts=simple_animals", "reward.fn.url=http://127.0.0.1:9"], "no reward server answers"),
    (["hardware=deepspeed_zero2"], "hardware.strategy=deepspeed needs CUDA GPUs"),
    (["hardware=fsdp_flux_full", "model=tiny_flux", "model.finetune=full", "reward=jpeg", "prompts=simple_animals"],
     "hardware.strategy=fsdp needs CUDA GPUs"),
    (["algorithm.min_step_std=-0.1"], "algorithm.min_step_std=-0.1: must be in [0, sample.eta=1.0)"),
    (["algorithm.min_step_std=0.9"], "algorithm.min_step_std=0.9: no sampler step has that much noise"),
    (["model.resolution=33"], "model.resolution=33: must be a positive multiple of 2 for model=toy"),
    (["model=tiny", "reward=jpeg", "prompts=simple_animals", "model.resolution=31"],
     "model.resolution=31: must be a positive multiple of 2 for model=tiny"),
    (["model.family=sd4"], "model.family='sd4': no such model family; valid: flux, sd, sd3, sdxl"),
    (["sample.sde_type=cps"], "sample.sde_type=cps: model=toy takes null (its DDIM sampler has no SDE type"),
    (["model=tiny_sd3", "reward=jpeg", "prompts=simple_animals", "sample.sde_type=ode"],
     "sample.sde_type=ode: model=tiny_sd3 takes null, sde, cps"),
    (["model=tiny_sd3", "reward=jpeg", "prompts=simple_animals", "model.resolution=34"],
     "model.resolution=34: must be a positive multiple of 4 for model=tiny_sd3"),
    (["algorithm=grpo", "sample.images_per_prompt=1"], "algorithm=grpo compares the images of a prompt"),
    (["sample.sde_window.size=12"], "sample.sde_window.size=12: must be in [0, sample.num_steps=10]"),
    (["sample.sde_window.size=3", "sample.sde_window.range=[4,6]"], "sample.sde_window.range=[4, 6]: must hold a window of 3"),
    (["eval.num_steps=0"], "eval.num_steps=0: must be >= 1"),
    (["model=tiny_sd3", "reward=jpeg", "prompts=simple_animals", "sample.sde_type=cps", "sample.eta=1.5"],
     "sample.eta=1.5: the cps step's std is sigma' sin(eta pi / 2)"),
    (["model=tiny_sd3", "reward=jpeg", "prompts=simple_animals", "sample.sde_type=cps", "sample.sde_window.size=2",
      "sample.sde_window.range=[8,10]"], "it reaches a deterministic step"),
    (["sample.sde_window.size=2", "sample.sde_window.shift_every=-1"], "sample.sde_window.shift_every=-1: must be >= 0"),
    (["model=tiny_sd3", "reward=jpeg", "prompts=simple_animals", "hardware.attention=eager"],
     "hardware.attention=eager: plain-matmul attention is for UNet models"),
    (["algorithm=d3po", "sample.same_noise_per_prompt=false"], "trains on pairs of images of one prompt"),
    (["algorithm.objective.estimator=score_function", "algorithm.inner_epochs=2"], "takes one step per sampling round"),
    (["algorithm=dpok", "algorithm.objective.kl=squared"], "algorithm.objective: kl='squared': use one of exact, noise"),
    (["algorithm=dpok", "algorithm.objective.replay_buffer.capacity=-5"], "replay_buffer: capacity=-5: must be >= 0"),
    (["algorithm=dpok", "algorithm.objective.replay_buffer.capacity=100", "algorithm.inner_epochs=2"],
     "with a replay buffer the updates per epoch are algorithm.objective.replay_buffer.updates_per_round"),
    (["algorithm=rwr", "algorithm.objective.prediction=unguided"], "algorithm.objective: prediction='unguided'"),
    (["algorithm=nft"], "algorithm=nft trains flow models on the velocity target: model=toy is a sd (DDIM) model"),
    (["algorithm=nft", "model=tiny_sdxl"], "algorithm=nft trains flow models on the velocity target: model=tiny_sdxl is a "
                                           "sdxl (DDIM) model"),
    (["model=sdxl", "reward=jpeg", "prompts=simple_animals"], "model.pretrained='stabilityai/stable-diffusion-xl-base-1.0': "
                                                              "not in the Hugging Face cache"),
    (["model=tiny_sdxl", "sample.sde_type=cps"], "sample.sde_type=cps: model=tiny_sdxl takes null"),
    (["model=tiny_sdxl", "algorithm.min_step_std=1.0"], "algorithm.min_step_std=1.0: must be in [0, sample.eta=1.0)"),
    (["model=tiny_sdxl", "model.resolution=33"], "model.resolution=33: must be a positive multiple of 2 for model=tiny_sdxl"),
    (["algorithm=nft", "model=tiny_sd3", "model.finetune=full"], "second LoRA adapter: set model.finetune=lora"),
    (["algorithm=nft", "model=tiny_sd3", "sample.sde_window.size=2"], "sample.sde_window: algorithm=nft samples with"),
])
def test_bad_command_lines_fail_in_one_line_with_exit_code_2(args, expected, tmp_path):
    result = run_cli(*args, f"run_root={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "no run folder is made for a bad command line"


def test_a_bad_command_line_in_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """The cases above run in this process; the program's own process prints nothing else (no import
    warnings, no traceback) and makes no run folder."""
    import os
    import subprocess

    result = subprocess.run([sys.executable, "-m", "rlfuse.train", "model.resolution=33", f"run_root={tmp_path}"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rlfuse: error: model.resolution=33: must be a positive multiple of 2 for model=toy (its VAE's factor); use 32"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("accepted", [
    ["+extra.key=1"], ["~eval.seed"], ["hydra.job.name=x"], ["model.lora.target_modules=[to_q]"],
    ["model.pretrained=null"], ["-cn", "train"], ["-m", "seed=0,1"],
])
def test_valid_overrides_pass_the_checker(accepted, tmp_path):
    """They reach the run's own value checks (here a deliberately bad eta), so none was refused."""
    result = run_cli(*accepted, "sample.eta=0", f"run_root={tmp_path}")
    assert result.returncode == 2 and "sample.eta=0: must be > 0" in result.stderr, result.stderr


def test_help_lists_groups_and_choices():
    result = run_cli("--help")
    assert result.returncode == 0
    for group in config_groups():
        assert f"{group}:" in result.stdout
    assert "flux_dev, flux_schnell, sd14, sd15, sd21, sd3, sd35l, sd35m, sdxl, tiny, tiny_flux, tiny_sd3, tiny_sdxl, toy, toy_flow" in result.stdout
