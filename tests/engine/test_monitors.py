"""The monitors alone: warnings on constructed drifts, pairwise distances, the chain KL to the base model."""

import math

import torch

from rlfuse.engine.monitors import Watch, chain_kl, mean_pairwise_distance, paired_fall
from rlfuse.rollout import rollout
from tests.helpers_models import perturb_lora

N = 32
BASE = {"reward": [0.5 + 0.01 * (i % 2) for i in range(N)], "jpeg": [-1.5 + 0.01 * (i % 2) for i in range(N)]}


def shifted(scores: dict, reward: float, jpeg: float) -> dict:
    return {"reward": [v + reward for v in scores["reward"]], "jpeg": [v + jpeg for v in scores["jpeg"]]}


def test_a_panel_reward_falling_while_the_trained_one_rises_gives_one_warning_line():
    watch = Watch(collapse_ratio=0.5)
    assert watch.warnings(0, BASE, None) == []                   # the first evaluation is the baseline
    lines = watch.warnings(10, shifted(BASE, reward=+0.05, jpeg=-0.02), None)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("epoch 10: possible reward hacking: the trained reward rose (0.5050 -> 0.5550) "
                               "while eval_jpeg, not trained on, fell (-1.4950 -> -1.5150)")


def test_no_warning_when_the_panel_holds_or_the_trained_reward_falls_too_or_the_change_is_noise():
    watch = Watch(collapse_ratio=0.5)
    watch.warnings(0, BASE, None)
    assert watch.warnings(10, shifted(BASE, reward=+0.05, jpeg=+0.01), None) == []
    assert watch.warnings(20, shifted(BASE, reward=-0.05, jpeg=-0.02), None) == []
    noisy = {"reward": [v + 0.05 for v in BASE["reward"]], "jpeg": [v + (0.02 if i % 2 else -0.021)
                                                                    for i, v in enumerate(BASE["jpeg"])]}
    assert watch.warnings(30, noisy, None) == []               # a mean fall of 0.0005 against a spread of 0.02


def test_a_diversity_collapse_below_the_ratio_of_its_first_value_warns():
    watch = Watch(collapse_ratio=0.5)
    watch.warnings(0, BASE, 0.20)
    assert watch.warnings(10, BASE, 0.11) == []
    (line,) = watch.warnings(20, BASE, 0.09)
    assert line.startswith("epoch 20: diversity collapse: eval_diversity 0.0900 is below 0.5 x its first value 0.2000")


def test_paired_fall_needs_two_standard_errors():
    assert paired_fall([0.0] * 4 + [1.0] * 4, [-0.1] * 4 + [0.9] * 4)          # every image fell by 0.1
    assert not paired_fall([0.0, 1.0, 0.0, 1.0], [0.1, 0.8, -0.1, 1.05])        # mixed: mean -0.0375, noisy


def test_pixel_diversity_is_the_mean_rms_distance_between_two_images_of_a_prompt():
    same = torch.full((4, 3, 2, 2), 0.5)
    assert mean_pairwise_distance(same, 2, "pixel") == 0.0
    images = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.5)])
    # prompt 1: images 0 and 1 differ by 1 in every pixel (RMS 1); prompt 2: by 0.5 (RMS 0.5)
    assert math.isclose(mean_pairwise_distance(images, 2, "pixel"), 0.75, rel_tol=1e-6)
    assert math.isnan(mean_pairwise_distance(images, 4, "pixel"))              # one image per prompt


def test_clip_diversity_is_zero_for_copies_and_positive_otherwise():
    from rlfuse.rewards.clip import ClipEmbedder

    clip = ClipEmbedder("rlfuse-tiny-clip", None)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    assert abs(mean_pairwise_distance(image.repeat(4, 1, 1, 1), 2, "clip", clip)) < 1e-5
    assert mean_pairwise_distance(torch.rand(4, 3, 32, 32), 2, "clip", clip) > 1e-4


def test_the_chain_kl_is_zero_for_the_base_model_and_grows_with_the_lora(tiny_policy):
    family, policy, _ = tiny_policy
    sampler = family.sampler(1.0)
    sampled = rollout(family.network, family, sampler, ["a cat", "a dog"], [1, 2], [3, 4], (4, 16, 16), 4, 5.0,
                      torch.device("cpu"))
    args = (family, family.sampler(1.0), sampled.chains, sampled.timesteps, sampled.conditioning, 5.0)
    assert torch.equal(chain_kl(family.network, policy.reference, *args), torch.zeros(2))  # LoRA B starts at 0
    perturb_lora(family.network)
    kl = chain_kl(family.network, policy.reference, *args)
    # By hand: each noisy step's |mean_theta - mean_ref|^2 / (2 std^2), averaged over latent dimensions,
    # then over those steps.
    steps = family.sampler(1.0)
    steps.set_timesteps(4)
    by_hand = []
    for i, t in enumerate(sampled.timesteps):
        x = sampled.chains[:, i]
        with torch.no_grad():
            ours = steps.transition(family.predict(family.network, steps.model_input(x, t), t, sampled.conditioning,
                                                   5.0), t.expand(2), x)
            with policy.reference() as base:
                theirs = steps.transition(family.predict(base, steps.model_input(x, t), t, sampled.conditioning, 5.0),
                                          t.expand(2), x)
        if float(ours.std.max()) > 0:
            by_hand.append(((ours.mean - theirs.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * ours.std.reshape(-1) ** 2))
    assert len(by_hand) >= 2 and (kl > 0).all()
    assert torch.allclose(kl, torch.stack(by_hand, dim=1).mean(dim=1).float(), rtol=1e-5)
