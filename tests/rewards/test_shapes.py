"""ShapesReward: rendered captions score 1, each kind of mistake lowers only its own criterion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlfuse.rewards.shapes import CRITERIA, ShapesReward
from rlfuse.toy.world import Scene, SceneObject, render, sample_scene


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """B (H, W, 3) uint8 images -> (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def blur_and_add_noise(images: torch.Tensor, sigma: float, noise_std: float, seed: int) -> torch.Tensor:
    """Separable Gaussian blur of `sigma` pixels, then Gaussian noise: a stand-in for a VAE round trip."""
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    blurred = torch.nn.functional.pad(images, (radius,) * 4, mode="replicate")
    blurred = torch.nn.functional.conv2d(blurred, taps.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    blurred = torch.nn.functional.conv2d(blurred, taps.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    noise = torch.randn(blurred.shape, generator=torch.Generator().manual_seed(seed))
    return (blurred + noise_std * noise).clamp(0, 1)


@pytest.fixture(scope="module")
def reward() -> ShapesReward:
    return ShapesReward()


@pytest.fixture(scope="module")
def rendered_captions() -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(0)
    scenes, captions = zip(*(sample_scene(rng, 32) for _ in range(2000)))
    return to_tensor([render(scene) for scene in scenes]), list(captions)


def test_every_rendered_caption_scores_one(reward, rendered_captions):
    images, captions = rendered_captions
    output = reward(images, captions)
    scores = output.scores
    assert scores.shape == (2000,) and scores.dtype == torch.float32
    assert torch.all(scores == 1.0)
    has_relation = torch.tensor([" of " in c or " above " in c or " below " in c for c in captions])
    for name in ("objects", "colour", "shape", "count"):
        assert torch.all(output.details[name] == 1.0)
    assert torch.all(output.details["position"][has_relation] == 1.0)
    assert torch.all(output.details["position"][~has_relation].isnan())


@pytest.mark.parametrize("sigma, noise_std", [(0.8, 0.03), (1.0, 0.02)])
def test_blur_and_noise_like_a_vae_keep_the_score_at_one(reward, rendered_captions, sigma, noise_std):
    images, captions = rendered_captions
    degraded = blur_and_add_noise(images[:1000], sigma, noise_std, seed=0)
    perfect_rate = (reward(degraded, captions[:1000]).scores == 1.0).float().mean().item()
    assert perfect_rate >= 0.98


def score_scene(reward: ShapesReward, objects: list[SceneObject], prompt: str) -> tuple[float, dict[str, float]]:
    image = render(Scene(objects, image_size=32))
    output = reward(to_tensor([image]), [prompt])
    return output.scores.item(), {name: values.item() for name, values in output.details.items()}


# (prompt, objects drawn, the one criterion the drawing gets wrong, its expected value)
MISTAKES = {
    "wrong colour": (
        "a red circle",
        [SceneObject("circle", "blue", (16, 16), 10)],
        "colour",
        0.0,
    ),
    "wrong shape": (
        "a red circle",
        [SceneObject("square", "red", (16, 16), 10)],
        "shape",
        0.0,
    ),
    "one too many": (
        "two blue squares",
        [SceneObject("square", "blue", (8, 8), 9), SceneObject("square", "blue", (24, 8), 9), SceneObject("square", "blue", (16, 24), 9)],
        "count",
        0.0,
    ),
    "one too few": (
        "three green triangles",
        [SceneObject("triangle", "green", (8, 8), 10), SceneObject("triangle", "green", (24, 24), 10)],
        "count",
        0.0,
    ),
    "swapped position": (
        "a red circle to the left of a blue square",
        [SceneObject("circle", "red", (24, 16), 10), SceneObject("square", "blue", (8, 16), 10)],
        "position",
        0.0,
    ),
    "wrong colour in a relation": (
        "a yellow triangle above a purple circle",
        [SceneObject("triangle", "yellow", (16, 8), 10), SceneObject("circle", "blue", (16, 24), 10)],
        "colour",
        0.5,
    ),
    "wrong colour in a count": (
        "three green triangles",
        [SceneObject("triangle", "green", (8, 8), 10), SceneObject("triangle", "green", (24, 8), 10), SceneObject("triangle", "red", (16, 24), 10)],
        "colour",
        2 / 3,
    ),
    "an unrequested object": (
        "a red circle",
        [SceneObject("circle", "red", (8, 16), 10), SceneObject("square", "blue", (24, 16), 10)],
        "objects",
        0.5,
    ),
    "two unrequested objects": (
        "a red circle",
        [SceneObject("circle", "red", (8, 8), 10), SceneObject("square", "blue", (24, 8), 10), SceneObject("triangle", "green", (16, 24), 10)],
        "objects",
        1 / 3,
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_mistake_lowers_only_its_own_criterion(reward, mistake):
    prompt, objects, wrong_criterion, expected = MISTAKES[mistake]
    score, details = score_scene(reward, objects, prompt)
    assert details[wrong_criterion] == pytest.approx(expected)
    applicable = [name for name in CRITERIA if not math.isnan(details[name])]
    for name in applicable:
        if name != wrong_criterion:
            assert details[name] == 1.0, name
    # The score is the mean of the criteria that apply.
    assert score == pytest.approx((len(applicable) - 1 + expected) / len(applicable))


def test_correct_hand_built_relation_scores_one(reward):
    score, details = score_scene(
        reward,
        [SceneObject("circle", "red", (8, 16), 10), SceneObject("square", "blue", (24, 16), 10)],
        "a red circle to the left of a blue square",
    )
    assert score == 1.0 and details["position"] == 1.0


def test_empty_image_scores_zero(reward):
    white = torch.ones(2, 3, 32, 32)
    output = reward(white, ["a red circle", "a red circle to the left of a blue square"])
    assert output.scores.tolist() == [0.0, 0.0]
    assert all(output.details[name][0].item() == 0.0 for name in ("objects", "colour", "shape", "count"))


def test_prompt_outside_grammar_raises_one_line_error_at_call(reward):
    with pytest.raises(ValueError) as error:
        reward(torch.ones(2, 3, 32, 32), ["a red circle", "a pink elephant"])
    assert "'a pink elephant'" in str(error.value) and "\n" not in str(error.value)


def test_images_and_prompts_must_agree_in_number(reward):
    with pytest.raises(ValueError, match="B prompts"):
        reward(torch.ones(2, 3, 32, 32), ["a red circle"])


def test_reward_runs_without_gradients_at_64_px(reward):
    rng = np.random.default_rng(3)
    scenes, captions = zip(*(sample_scene(rng, 64) for _ in range(8)))
    images = to_tensor([render(scene) for scene in scenes]).requires_grad_()
    scores = reward(images, list(captions)).scores
    assert not scores.requires_grad
    assert torch.all(scores == 1.0)
