"""The evaluate stage alone: held-out prompts at fixed seeds, and the captioned before/after sheet."""

import torch
from PIL import Image

from rlfuse.engine.evaluation import EvalSettings, Evaluation, evaluate, save_eval_images
from rlfuse.rewards.jpeg import JpegReward

SETTINGS = EvalSettings(["a cat", "a dog", "a fox"], num_images=5, seed=7, num_steps=3, guidance_scale=5.0)


def run(family):
    from contextlib import nullcontext

    return evaluate(family.network, family, family.sampler(1.0), JpegReward(), SETTINGS, family.latent_shape(32),
                    rank=0, world=1, device=torch.device("cpu"), autocast=nullcontext)


def test_the_same_images_at_every_evaluation_and_prompts_cycled(accelerator, tiny_policy):
    family, _, _ = tiny_policy
    first, second = run(family), run(family)
    assert first.prompts == ["a cat", "a dog", "a fox", "a cat", "a dog"]
    assert first.images.shape == (5, 3, 32, 32)
    assert torch.equal(first.images, second.images)
    assert first.metrics == second.metrics and first.metrics["eval_reward_mean"] < 0  # JPEG kB, negated


def test_before_after_sheet_has_a_row_per_caption_and_the_first_images_on_the_left(tmp_path):
    images = torch.rand(5, 3, 32, 32)
    before = Evaluation({}, images, ["one", "two", "three", "four", "five"])
    save_eval_images(tmp_path, before, 0, final=False)
    assert (tmp_path / "eval" / "epoch_0000.png").is_file()
    assert not (tmp_path / "eval" / "before_after.png").exists()
    after = Evaluation({}, torch.zeros(5, 3, 32, 32), before.prompts)
    save_eval_images(tmp_path, after, 3, final=True)
    sheet = Image.open(tmp_path / "eval" / "before_after.png").convert("RGB")
    scale, columns = 3, 1  # 5 captions: one column (about a square sheet)
    assert sheet.height >= 5 * 32 * scale
    # Row 2's left image is the first evaluation's third image (scaled 3x), read back from its grid.
    row_top, left = 18 + 2 * (32 * scale + 4), 4
    assert columns == max(1, round((5 / 4) ** 0.5))
    pixel = sheet.getpixel((left + 1, row_top + 1))
    expected = tuple(round(v * 255) for v in images[2, :, 0, 0].tolist())
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, expected)), (pixel, expected)
    # ... and its right image is the last evaluation's (black here).
    assert sheet.getpixel((left + 32 * scale + 4 + 1, row_top + 1)) == (0, 0, 0)
