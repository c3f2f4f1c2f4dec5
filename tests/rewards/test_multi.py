"""The weighted sum of rewards, with each term kept for logging and for D3PO's Pareto pairs."""

import pytest
import torch

from rlfuse.rewards.jpeg import JpegReward
from rlfuse.rewards.multi import MultiReward
from rlfuse.rewards.shapes import ShapesReward


def test_weighted_sum_of_terms_and_each_term_kept():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    jpeg, shapes = JpegReward(), ShapesReward()
    reward = MultiReward({"jpeg": {"weight": 0.5, "fn": jpeg}, "shapes": {"weight": 2.0, "fn": shapes}})
    output = reward(images, prompts)
    torch.testing.assert_close(output.scores, 0.5 * jpeg(images, prompts).scores + 2.0 * shapes(images, prompts).scores)
    assert set(output.terms) == {"jpeg", "shapes"}
    torch.testing.assert_close(output.terms["jpeg"], jpeg(images, prompts).scores)


def test_prompt_checks_reach_the_terms():
    reward = MultiReward({"jpeg": {"weight": 1.0, "fn": JpegReward()}, "shapes": {"weight": 1.0, "fn": ShapesReward()}})
    with pytest.raises(ValueError, match="outside the shapes grammar"):
        reward.check_prompts(["a cat"])


def test_a_term_without_a_reward_is_refused():
    with pytest.raises(ValueError, match="terms.jpeg: needs fn"):
        MultiReward({"jpeg": {"weight": 1.0}})


def test_a_reward_returning_a_bare_tensor_counts_as_its_scores_and_anything_else_is_one_line():
    import pytest

    from rlfuse.errors import UserError
    from rlfuse.rewards.base import RewardOutput, score

    images = torch.rand(2, 3, 8, 8)
    plain = score(lambda images, prompts: torch.tensor([1.0, 2.0]), images, ["a", "b"])
    assert isinstance(plain, RewardOutput) and plain.scores.tolist() == [1.0, 2.0] and plain.terms == {}
    with pytest.raises(UserError, match="returned list; a reward returns a"):
        score(lambda images, prompts: [1.0, 2.0], images, ["a", "b"])
