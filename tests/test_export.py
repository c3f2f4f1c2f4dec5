"""rlfuse.export on a short tiny run: the LoRA folder and the merged pipeline load and redraw the run's
held-out images at its fixed seeds; the model card's YAML parses; an upload is refused offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlfuse.export import export, model_card
from tests.test_train import FAST, train

# One epoch with a large learning rate (the LoRA must move), evaluated on 4 held-out images.
RUN = [*FAST, "epochs=1", "eval.every=1", "eval.num_images=4", "checkpoint.best=eval_reward_mean",
       "algorithm.learning_rate=3e-3", "log.images_every=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train(tmp_path_factory.mktemp("export_run"), *RUN)


def held_out_images(cfg, family) -> torch.Tensor:
    """(n, 3, H, W) the run's evaluation images drawn again: its prompts, seeds and sampler, 8-bit."""
    from rlfuse.config import eval_sampler
    from rlfuse.prompts import load_prompts
    from rlfuse.rollout import rollout
    from rlfuse.seeding import seed_for

    prompts = load_prompts(cfg.prompts.eval)
    count, seed = cfg.eval.num_images, cfg.eval.seed
    sampled = rollout(family.network.eval(), family, eval_sampler(cfg, family),
                      [prompts[i % len(prompts)] for i in range(count)], [seed_for(seed, 0, i) for i in range(count)],
                      [seed_for(seed, 1, i) for i in range(count)], family.latent_shape(cfg.model.resolution),
                      cfg.sample.num_steps, cfg.sample.guidance_scale, torch.device("cpu"))
    return (sampled.images * 255).round() / 255   # as save_image rounds them into the PNG


def logged_images(run_dir: Path, cfg, epoch: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, read_image

    from rlfuse.images import grid_cells

    grid = read_image(str(run_dir / "eval" / f"epoch_{epoch:04d}.png"), ImageReadMode.RGB).float() / 255
    side = cfg.model.resolution
    return grid_cells(grid, cfg.eval.num_images, side, side)


def test_the_lora_folder_loads_into_the_base_pipeline_and_redraws_the_held_out_images(run_dir, tmp_path):
    from rlfuse.config import load_family

    out = export(run_dir, "last", out=tmp_path / "lora")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    family = load_family(cfg)
    family.pipeline.load_lora_weights(str(out))               # diffusers' own loader
    images = held_out_images(cfg, family)
    assert (images - logged_images(run_dir, cfg, 1)).abs().max() <= 1 / 255 + 1e-6
    assert (images - logged_images(run_dir, cfg, 0)).abs().max() > 4 / 255   # the LoRA changed them
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "images",
                                                     "pytorch_lora_weights.safetensors"]


def test_the_merged_pipeline_loads_with_from_pretrained_and_redraws_the_held_out_images(run_dir, tmp_path):
    from rlfuse.families.sd import StableDiffusion

    out = export(run_dir, "last", merge=True, out=tmp_path / "merged")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    family = StableDiffusion.load(str(out))                     # StableDiffusionPipeline.from_pretrained
    images = held_out_images(cfg, family)
    assert (images - logged_images(run_dir, cfg, 1)).abs().max() <= 1 / 255 + 1e-6
    weights = [p.suffix for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and set(weights) == {".safetensors"}


def test_the_model_card_yaml_parses_and_names_the_run_and_its_best_checkpoint(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = export(run_dir, "best", out=tmp_path / "best")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"ddpo", "reward-jpeg", "lora"} <= set(card.data.tags)
    assert "the best evaluation by eval_reward_mean (max)" in card.text
    assert "python -m rlfuse.train model=tiny reward=jpeg" in card.text and "checkpoint.best=eval_reward_mean" in card.text
    assert "| 0 | " in card.text and "| 1 | " in card.text          # the held-out scores of both evaluations
    best_epoch = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())["epoch"]
    assert (out / "images" / "before_after.png").is_file() == (best_epoch > 0)   # none for the untrained model


def test_a_constant_schedule_keeps_the_learning_rate(run_dir):
    from tests.test_train import metrics

    assert [row["lr"] for row in metrics(run_dir) if row["epoch"] > 0] == [3e-3]


def test_a_hub_base_model_is_named_in_the_yaml_with_its_licence(run_dir):
    from huggingface_hub import ModelCard

    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    text = model_card(cfg, run_dir, run_dir / "checkpoints" / "best", "lora", [])
    data = ModelCard(text).data
    assert data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and data.license == "creativeml-openrail-m"
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in text


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "--push-to-hub someone/model: HF_HUB_OFFLINE is set, so nothing was exported or uploaded"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}, "--push-to-hub someone/model: no Hugging Face token"),
])
def test_an_upload_is_refused_in_one_line_before_anything_is_written(run_dir, tmp_path, env, message):
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    environment.update({**env, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": os.getcwd()})
    if not environment.get("HF_TOKEN"):
        environment.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-m", "rlfuse.export", str(run_dir), "--out", str(tmp_path / "out"),
                             "--push-to-hub", "someone/model"], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlfuse: error: {message}"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which, message", [("epoch_7", "--checkpoint epoch_7: no such checkpoint"),
                                            ("newest", "--checkpoint newest: use best, last or epoch_N")])
def test_a_missing_checkpoint_is_named_with_what_the_run_kept(run_dir, which, message):
    from rlfuse.errors import UserError

    with pytest.raises(UserError, match=message):
        export(run_dir, which)
