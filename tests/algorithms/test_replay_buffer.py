"""The replay buffer of DPOK's schedule: it keeps the newest transitions, draws single steps of them,
and DPOK updates its value function once per round from it."""

import pytest
import torch

from rlfuse.algorithms.dpok import DPOK
from rlfuse.replay_buffer import TransitionBuffer
from rlfuse.trajectories import Conditioning, Trajectories


def chains(first_id: int, count: int, steps: int = 3) -> Trajectories:
    """`count` chains of `steps` steps whose every value encodes (sample id, step): latents[i, t] = 10 id + t."""
    ids = torch.arange(first_id, first_id + count)
    grid = (10 * ids[:, None] + torch.arange(steps)).float()                       # (count, steps)
    return Trajectories(
        conditioning=Conditioning({"prompt_embeds": ids.float()[:, None, None].expand(count, 2, 4).clone()}),
        latents=grid[:, :, None, None, None].expand(count, steps, 1, 2, 2).clone(),
        next_latents=grid[:, :, None, None, None].expand(count, steps, 1, 2, 2).clone() + 0.5,
        timesteps=(1000 - 100 * torch.arange(steps)).repeat(count, 1), log_probs=-grid,
        rewards=ids.float(), reward_terms=torch.zeros(count, 0), advantages=ids.float(),
        prompts=[f"prompt {i}" for i in ids.tolist()], sample_ids=ids)


def transitions(buffer: TransitionBuffer) -> list[tuple[int, int]]:
    """(sample id, step) of every transition held, oldest first."""
    return [(int(buffer.chains.sample_ids[r]), int(s)) for r, s in zip(buffer.rows, buffer.steps)]


def test_the_buffer_keeps_the_newest_transitions_step_by_step_and_drops_unreferenced_chains():
    buffer = TransitionBuffer(capacity=5, updates_per_round=1)
    buffer.add(chains(0, 2), torch.tensor([0, 1, 2]))
    # DPOK's order: every chain's first step, then every chain's second, ...; 6 transitions, the oldest dropped
    assert transitions(buffer) == [(1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    buffer.add(chains(2, 2), torch.tensor([1, 2]))   # only the trainable steps 1 and 2
    assert transitions(buffer) == [(1, 2), (2, 1), (3, 1), (2, 2), (3, 2)]
    assert buffer.chains.sample_ids.tolist() == [1, 2, 3]  # chain 0 has no transition left


def test_draws_are_single_stored_transitions_distinct_within_a_minibatch():
    buffer = TransitionBuffer(capacity=6, updates_per_round=1)
    buffer.add(chains(0, 3), torch.tensor([0, 2]))
    held = set(transitions(buffer))
    batch, step_index = buffer.draw(6, torch.Generator().manual_seed(0))
    drawn = [(int(i), int(s)) for i, s in zip(batch.sample_ids, step_index)]
    assert sorted(drawn) == sorted(held)                    # all six, each once
    rows = torch.arange(len(batch))
    # the drawn chain's values at the drawn step are that transition's (x_t, x_{t-1}, log-prob)
    expected = torch.tensor([10.0 * i + s for i, s in drawn])
    torch.testing.assert_close(batch.latents[rows, step_index][:, 0, 0, 0], expected)
    torch.testing.assert_close(batch.log_probs[rows, step_index], -expected)
    more, _ = buffer.draw(20, torch.Generator().manual_seed(0))  # more than it holds: with replacement
    assert len(more) == 20


def test_the_buffer_survives_a_state_round_trip():
    buffer = TransitionBuffer(capacity=4, updates_per_round=1)
    buffer.add(chains(0, 3), torch.tensor([0, 1]))
    restored = TransitionBuffer(capacity=4, updates_per_round=1)
    restored.load_state_dict(buffer.state_dict())
    assert transitions(restored) == transitions(buffer)
    a, b = (x.draw(3, torch.Generator().manual_seed(1)) for x in (buffer, restored))
    assert a[0].sample_ids.tolist() == b[0].sample_ids.tolist() and a[1].tolist() == b[1].tolist()


@pytest.mark.parametrize("settings, message", [
    ({"capacity": -1}, "replay_buffer: capacity=-1"),
    ({"capacity": 10, "updates_per_round": 0}, "updates_per_round=0"),
    ({"capacity": 10, "value_batch_size": 0}, "value_batch_size=0"),
])
def test_bad_replay_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DPOK(replay_buffer=settings)


def test_dpok_updates_its_value_function_once_per_round_and_not_in_the_loss(lora_policy, sample):
    pipeline, policy = lora_policy
    objective = DPOK(baseline="value", value_learning_rate=1e-2, clip_range=0.2,
                     replay_buffer={"capacity": 8, "updates_per_round": 2, "value_minibatches": 3, "value_batch_size": 4})
    batch = sample(pipeline, ["a cat", "a dog"], shared_noise_pairs=False)
    rewards, _ = objective.advantages(batch.prompts, torch.tensor([3.0, -1.0]))
    stats = objective.remember(batch.with_advantages(rewards), torch.arange(4), torch.Generator().manual_seed(0))
    assert len(objective.replay_buffer) == 8 and stats["value_loss"] > 0
    state = objective.value_optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {1}  # one AdamW step for the round
    weights = [p.clone() for p in objective.value.parameters()]
    drawn, step_index = objective.replay_buffer.draw(2, torch.Generator().manual_seed(1))
    loss, stats = objective.loss(policy, drawn, step_index)
    assert "value_loss" not in stats and all(torch.equal(a, b) for a, b in zip(weights, objective.value.parameters()))
    restored = DPOK(baseline="value", replay_buffer={"capacity": 8})
    restored.load_state_dict(objective.state_dict())
    assert len(restored.replay_buffer) == 8
