"""rlfuse's ImageReward scores what the ORIGINAL ImageReward code scores, on the same random weights.

Opt-in (it builds a second Python environment and two 446 M-parameter models, a few minutes):

    RLFUSE_IMAGEREWARD_EQUIVALENCE=1 .venv/bin/python -m pytest tests/rewards/test_imagereward_equivalence.py -s

The original (image-reward 1.5) needs timm 0.6, fairscale and transformers 4 internals, so it runs in
its own environment (imagereward_equivalence/requirements.txt; made on first use at
$RLFUSE_IMAGEREWARD_VENV, default /tmp/rlfuse-imagereward-venv; the package registry must be
reachable then). imagereward_equivalence/original_scores.py builds the original model at its real
size with seeded random weights, saves its state dict (the published checkpoint's keys) and scores
images and prompts through its own ImageReward.score; rlfuse then loads that state dict through its
key mapping and scores the same images and prompts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlfuse.rewards.imagereward import ImageReward, write_test_vocabulary

pytestmark = pytest.mark.skipif(os.environ.get("RLFUSE_IMAGEREWARD_EQUIVALENCE") != "1",
                                reason="opt-in: set RLFUSE_IMAGEREWARD_EQUIVALENCE=1 (builds a second environment)")

HERE = Path(__file__).resolve().parent / "imagereward_equivalence"
VENV = Path(os.environ.get("RLFUSE_IMAGEREWARD_VENV", "/tmp/rlfuse-imagereward-venv"))
PROMPTS = [
    "a red circle to the left of a blue square",
    "a photo of two dogs",
    "an oil painting of a lighthouse on a cliff at sunset, dramatic sky, highly detailed, trending on artstation, "
    "by a famous painter, 8k, sharp focus, volumetric light",  # longer than 35 tokens: truncated
    "cat",
]
# (image, prompt) pairs: every image with one prompt, image 0 with every prompt.
PAIRS = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 1), (3, 2), (4, 0), (5, 3)]
SQUARE = 4  # images 0-3 are 224 x 224 (resizing is the identity), 4-5 are 256 x 320


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Random low-frequency colour fields (real images are smooth; on pixel noise PIL's and torch's
    bicubic resamplers differ more than on pictures)."""
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 3)
        channels.append(0.5 + 0.45 * np.sin(2 * np.pi * (fx * xs + fy * ys) + phase * np.cos(3 * ys)))
    return Image.fromarray((np.stack(channels, -1) * 255).round().astype(np.uint8))


def ensure_original_environment() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / ".rlfuse-installed"
    if stamp.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "image-reward==1.5"], check=True)
    stamp.write_text("")
    return python


@pytest.fixture
def work(tmp_path):
    yield tmp_path
    (tmp_path / "ImageReward.pt").unlink(missing_ok=True)  # 1.8 GB


def test_scores_equal_the_original_imagereward_code_on_random_weights(work):
    tmp_path = work
    python = ensure_original_environment()
    rng = np.random.default_rng(0)
    names = []
    for index, (height, width) in enumerate([(224, 224)] * SQUARE + [(256, 320), (320, 256)]):
        names.append(f"image_{index}.png")
        smooth_image(rng, height, width).save(tmp_path / names[-1])
    write_test_vocabulary(tmp_path / "bert-base-uncased", 30522)  # the original loads 'bert-base-uncased'
    (tmp_path / "inputs.json").write_text(json.dumps({"seed": 0, "prompts": PROMPTS, "images": names, "pairs": PAIRS}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([str(python), str(HERE / "original_scores.py")], cwd=tmp_path, env=env, check=True)
    original = json.loads((tmp_path / "original.json").read_text())

    reward = ImageReward(weights=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "bert-base-uncased"))
    reward.check_ready()
    # Tokens: the same ids and masks (35, padded and truncated) from transformers 5 as from 4.36.
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)
    assert tokens["input_ids"] == original["input_ids"] and tokens["attention_mask"] == original["attention_mask"]
    assert sum(original["attention_mask"][2]) == 35  # the long prompt was truncated

    # Images as the loop hands them over: (1, 3, H, W) floats in [0, 1], one pair at a time (sizes differ).
    images = [torch.from_numpy(np.array(Image.open(tmp_path / n))).permute(2, 0, 1)[None].float() / 255 for n in names]
    ours = torch.tensor([reward(images[i], [PROMPTS[p]]).scores.item() for i, p in PAIRS], dtype=torch.float64)
    theirs = torch.tensor(original["scores"], dtype=torch.float64)
    pixels = torch.cat([reward.preprocessor.preprocess(image) for image in images])
    original_pixels = torch.load(tmp_path / "original_pixels.pt")
    square = torch.tensor([index < SQUARE for index, _ in PAIRS])
    # A batch scores as its images one by one.
    batch = torch.cat([images[i] for i, _ in PAIRS[:SQUARE]])
    batch_scores = reward(batch, [PROMPTS[p] for _, p in PAIRS[:SQUARE]]).scores.double()

    spread = theirs.std().item()
    print(f"\noriginal scores {theirs.numpy().round(4)}\nrlfuse scores   {ours.numpy().round(4)}\n"
          f"versions {original['versions']}\nscore std across pairs {spread:.4f}\n"
          f"224 px: max |pixel diff| {(pixels[:SQUARE] - original_pixels[:SQUARE]).abs().max():.2e}, "
          f"max |score diff| {(ours - theirs)[square].abs().max():.2e}\n"
          f"256x320 px: mean |pixel diff| {(pixels[SQUARE:] - original_pixels[SQUARE:]).abs().mean():.2e}, "
          f"max |score diff| {(ours - theirs)[~square].abs().max():.2e}\n"
          f"batched vs one by one: max |diff| {(batch_scores - ours[:SQUARE]).abs().max():.2e}")
    # The weights make the scores depend on both the image and the prompt, well above the tolerances.
    assert spread > 0.1 and len(set(np.round(theirs.numpy(), 3))) == len(PAIRS)
    # 224 px images: resizing is the identity on both sides, so inputs agree to float rounding, and the
    # scores to float32 rounding through 36 transformer layers in a different operation order (fused
    # vs separate projections, masks as -10000 vs the dtype's minimum): 1e-4 is 1000x below the spread.
    torch.testing.assert_close(pixels[:SQUARE], original_pixels[:SQUARE], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[square], theirs[square], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch_scores, ours[:SQUARE], atol=1e-4, rtol=0)
    # Other sizes: the original resizes a uint8 PIL image (PIL bicubic, rounded to uint8), rlfuse the float
    # tensor (torch bicubic with antialiasing, differentiable); inputs differ by about a grey level.
    assert (pixels[SQUARE:] - original_pixels[SQUARE:]).abs().mean() < 0.02
    torch.testing.assert_close(ours[~square], theirs[~square], atol=0.05 * spread, rtol=0)
