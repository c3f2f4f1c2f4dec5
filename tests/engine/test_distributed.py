"""The advantages stage alone: over the whole batch in sample-id order, each process its own slice."""

import torch
from engine_samples import draw_samples

from rlfuse.algorithms.d3po import D3PO
from rlfuse.algorithms.ddpo import DDPO
from rlfuse.engine.distributed import assign_advantages, weights_spread


def test_advantages_follow_the_sample_ids_not_the_row_order(accelerator, tiny_policy):
    family, _, _ = tiny_policy
    samples = draw_samples(family)
    scored = assign_advantages(accelerator, samples, DDPO(advantages="per_prompt", buffer_size=2, min_count=2))
    shuffled = samples[torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])]
    rescored = assign_advantages(accelerator, shuffled, DDPO(advantages="per_prompt", buffer_size=2, min_count=2))
    assert scored.finite and rescored.finite
    assert torch.equal(scored.rewards, rescored.rewards)  # gathered in sample-id order
    by_id = dict(zip(rescored.samples.sample_ids.tolist(), rescored.samples.advantages.tolist()))
    assert [by_id[i] for i in range(8)] == scored.samples.advantages.tolist()
    # Per-prompt normalisation: each pair of one prompt gets +1 and -1 (two different rewards).
    pairs = scored.samples.advantages.reshape(4, 2)
    torch.testing.assert_close(pairs.sum(dim=1), torch.zeros(4), atol=1e-4, rtol=0)


def test_a_nonfinite_reward_or_term_leaves_the_advantages_unset(accelerator, tiny_policy):
    family, _, _ = tiny_policy
    samples = draw_samples(family)
    samples.rewards[3] = float("nan")
    scored = assign_advantages(accelerator, samples, DDPO())
    assert not scored.finite and torch.equal(scored.samples.advantages, torch.zeros(8))
    samples = draw_samples(family)
    samples.reward_terms = torch.ones(8, 2)
    samples.reward_terms[0, 1] = float("inf")
    assert not assign_advantages(accelerator, samples, DDPO()).finite


def test_d3po_compares_the_reward_terms_when_the_reward_has_several(accelerator, tiny_policy):
    family, _, _ = tiny_policy
    samples = draw_samples(family)
    samples.rewards = torch.zeros(8)                       # the weighted sum ties every pair ...
    samples.reward_terms = torch.tensor([[1.0, 1.0], [0.0, 0.0]] * 4)  # ... the terms do not
    scored = assign_advantages(accelerator, samples, D3PO())
    assert scored.samples.advantages.tolist() == [1.0, -1.0] * 4


def test_one_process_holds_the_same_weights_as_itself(accelerator):
    assert weights_spread(accelerator, [torch.ones(3)], sharded_weights=False) == 0
    assert weights_spread(accelerator, [torch.ones(3)], sharded_weights=True) != 0  # NaN: not compared
