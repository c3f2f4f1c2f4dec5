"""Pretraining of the toy model: the smoke size runs end to end and leaves a loadable, small pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlfuse.cli import CONF_DIR
from rlfuse.toy.pretrain import (PIPELINE_NAME, RECORD_NAME, SMOKE_OVERRIDES, SMOKE_OVERRIDES_FLOW, build_tokenizer,
                                 check_vocabulary)
from rlfuse.toy.world import all_prompts

torch.set_num_threads(1)  # the test machine's cores are shared


def run_smoke(run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "rlfuse.toy.pretrain", *SMOKE_OVERRIDES, "progress=false", "torch_threads=1",
               f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_smoke(run_dir)
    return run_dir


def test_default_tokenizer_knows_every_caption_word_and_fits_every_caption():
    cfg = OmegaConf.load(CONF_DIR / "pretrain_toy.yaml")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(Path(folder), cfg.text_encoder.num_merges, cfg.text_encoder.max_length)
        summary = check_vocabulary(tokenizer, all_prompts())
    assert summary["max_caption_tokens"] <= cfg.text_encoder.max_length
    assert summary["vocab_size"] == len(tokenizer)


@pytest.mark.slow  # smoke_run: a smoke pretraining run in a subprocess, about 14 s
def test_smoke_pipeline_loads_offline_and_generates_32px_images(smoke_run):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(smoke_run / PIPELINE_NAME)
    pipeline.set_progress_bar_config(disable=True)
    # fp16 files load back as fp32: the pipeline runs on a CPU as it is.
    assert pipeline.unet.dtype == pipeline.text_encoder.dtype == pipeline.vae.dtype == torch.float32
    images = pipeline(["a red circle", "two blue squares"], num_inference_steps=2, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()


@pytest.mark.slow  # smoke_run: a smoke pretraining run in a subprocess, about 14 s
def test_smoke_record_holds_the_heldout_evaluation(smoke_run):
    from rlfuse.rewards.shapes import CRITERIA

    record = json.loads((smoke_run / RECORD_NAME).read_text())
    for field in ("reward", *CRITERIA, "num_prompts", "num_steps", "guidance_scale", "seed"):
        assert field in record["eval"], field
    assert 0.0 <= record["eval"]["reward"] <= 1.0
    assert record["eval"]["prompts"] == "heldout"
    assert record["vae"]["steps"] == 30 and record["unet"]["steps"] == 30
    assert {"psnr_db", "reward"} <= record["vae"]["heldout"].keys()
    assert record["vae"]["scaling_factor"] == pytest.approx(1 / record["vae"]["latent_std"])
    assert record["unet"]["losses"] and record["wall_seconds"] > 0
    assert record["seed"] == record["config"]["seed"]


@pytest.mark.slow  # smoke_run: a smoke pretraining run in a subprocess, about 14 s
def test_smoke_folder_is_under_25_mb_and_leaves_no_temporary_folder(smoke_run):
    size = sum(path.stat().st_size for path in (smoke_run / PIPELINE_NAME).rglob("*") if path.is_file())
    assert size < 25e6
    assert not [path.name for path in smoke_run.iterdir() if ".tmp" in path.name]


@pytest.mark.slow  # a second smoke pretraining run in a subprocess: about 14 s
def test_same_seed_gives_the_same_losses_and_evaluation(smoke_run, tmp_path):
    run_smoke(tmp_path / "again")
    first = json.loads((smoke_run / RECORD_NAME).read_text())
    second = json.loads((tmp_path / "again" / RECORD_NAME).read_text())
    assert first["vae"]["losses"] == second["vae"]["losses"]
    assert first["unet"]["losses"] == second["unet"]["losses"]
    assert first["eval"] == second["eval"]


@pytest.mark.slow  # a smoke pretraining run of the flow model in a subprocess: about 15 s
def test_flow_smoke_run_leaves_an_sd3_pipeline_that_loads_and_a_record_with_relation_sensitivity(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "rlfuse.toy.pretrain", "--config-name", "pretrain_toy_flow", *SMOKE_OVERRIDES_FLOW,
               "progress=false", "torch_threads=1", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    assert record["transformer"]["steps"] == 30 and record["vae"]["steps"] == 0  # the VAE was loaded
    # SD3's convention: latents = (z - shift) * scale, both measured on the loaded VAE's latents
    assert record["vae"]["shift_factor"] == pytest.approx(record["vae"]["latent_mean"])
    assert record["vae"]["scaling_factor"] == pytest.approx(1 / record["vae"]["latent_std"])
    assert all(0 < value < 2 for value in record["relation_sensitivity"].values())
    pipeline = StableDiffusion3Pipeline.from_pretrained(tmp_path / "run" / PIPELINE_NAME, text_encoder_3=None,
                                                        tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(["a red circle"], num_inference_steps=2, guidance_scale=4.5, max_sequence_length=0,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("overrides, expected", [
    (["architecture=unet3"], "architecture='unet3': use one of ['sd', 'sd3']"),
    (["vae.pretrained=/no/such/vae"], "vae.pretrained='/no/such/vae': no AutoencoderKL folder there"),
    (["vae.pretrained=null"], "vae.steps=0: must be >= 1 when vae.pretrained is null"),
])
def test_bad_flow_pretraining_settings_fail_in_one_line(overrides, expected, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "rlfuse.toy.pretrain", "--config-name", "pretrain_toy_flow", *overrides,
               f"output_root={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(tmp_path.iterdir())
