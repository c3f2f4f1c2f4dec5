"""The checkpoint stage alone: save an epoch, restore optimizer, algorithm state and RNG from it."""

import torch
from engine_samples import draw_samples

from rlfuse.algorithms.ddpo import DDPO
from rlfuse.engine import checkpoint
from rlfuse.lora import trainable_parameters


def test_a_saved_epoch_restores_weights_optimizer_algorithm_state_and_rng(accelerator, tiny_policy, tmp_path):
    family, policy, optimizer = tiny_policy
    algorithm = DDPO(advantages="per_prompt", buffer_size=4, min_count=2)
    samples = draw_samples(family)
    algorithm.advantages(samples.prompts, samples.rewards)
    for p in trainable_parameters(family.network).values():  # a step, so the optimizer has state
        p.grad = torch.ones_like(p)
    optimizer.step()
    torch.manual_seed(123)
    checkpoint.save_epoch(accelerator, tmp_path, 3, False, family, family.network, optimizer,
                          algorithm.state_dict(), "lora", sharded=False, keep=2)
    expected_draw = torch.rand(3)
    folder = checkpoint.list_checkpoints(tmp_path)[-1]
    assert folder.name == "epoch_000003"
    assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()

    weights = {n: p.detach().clone() for n, p in trainable_parameters(family.network).items()}
    for p in trainable_parameters(family.network).values():
        p.data.zero_()
    fresh_optimizer = torch.optim.AdamW(trainable_parameters(family.network).values(), lr=1e-3)
    fresh_algorithm = DDPO(advantages="per_prompt", buffer_size=4, min_count=2)
    optimizer_state, state = checkpoint.load_checkpoint(folder, family.network)
    first_epoch = checkpoint.restore(accelerator, fresh_optimizer, fresh_algorithm, optimizer_state, state)
    assert first_epoch == 4
    assert all(torch.equal(p, weights[n]) for n, p in trainable_parameters(family.network).items())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh_algorithm.state_dict() == algorithm.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the saved run was
