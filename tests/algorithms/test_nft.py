"""DiffusionNFT: r from the advantages, the loss by hand, the direction it moves the velocity, and the
old policy as a second LoRA adapter that follows the trained one by a moving average."""

import pytest
import torch

from rlfuse.algorithms.nft import NFT, nft_loss, optimality_probability
from rlfuse.errors import UserError
from rlfuse.families.sd3 import StableDiffusion3
from rlfuse.families.tiny import build_tiny_sd3
from rlfuse.lora import ReferencePolicy, add_lora
from rlfuse.policy import Policy
from rlfuse.rollout import rollout


def test_optimality_probability_maps_clipped_advantages_to_0_1():
    r = optimality_probability(torch.tensor([-7.0, -5.0, 0.0, 2.5, 9.0]), adv_clip_max=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_loss_by_hand():
    torch.manual_seed(0)
    shape = (3, 2, 2, 2)
    v_theta, v_old, x0, eps = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    r = torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64)
    beta, c = 0.5, 5.0
    loss, stats = nft_loss(v_theta, v_old, x_t, x0, sigma, r, beta, c)
    expected = 0.0
    for i in range(3):
        t = sigma[i].item()
        positive = beta * v_theta[i] + (1 - beta) * v_old[i]
        negative = (1 + beta) * v_old[i] - beta * v_theta[i]
        terms = []
        for v in (positive, negative):
            difference = x_t[i] - t * v - x0[i]
            weight = max(difference.abs().mean().item(), 1e-5)
            terms.append((difference**2).mean().item() / weight)
        expected += (r[i].item() * terms[0] + (1 - r[i].item()) * terms[1]) / beta
    assert loss.item() == pytest.approx(expected / 3 * c, rel=1e-6)  # computed in fp32
    assert stats["old_deviation"].item() == pytest.approx(((v_theta - v_old) ** 2).mean().item(), rel=1e-9)


@pytest.mark.parametrize("r, closer", [(1.0, True), (0.0, False)])
def test_a_gradient_step_moves_the_velocity_towards_a_good_sample_and_away_from_a_bad_one(r, closer):
    """Starting at v_theta = v_old (as every epoch nearly does), a good sample (r = 1) pulls the
    velocity towards its target eps - x_0, a bad one (r = 0) pushes it away."""
    torch.manual_seed(1)
    x0, eps, v_old = (torch.randn(1, 4, 4, 4, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.6], dtype=torch.float64)
    x_t = (1 - sigma) * x0 + sigma * eps
    target = eps - x0
    v_theta = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v_theta, v_old, x_t, x0, sigma, torch.tensor([r], dtype=torch.float64), 1.0, 5.0)
    loss.backward()
    moved = v_theta.detach() - 1e-3 * v_theta.grad
    before, after = (v_old - target).norm().item(), (moved - target).norm().item()
    assert (after < before) == closer, (before, after)


def test_advantages_are_group_normalised_rewards():
    prompts = ["a", "a", "b", "b"]
    advantages, stats = NFT(global_std=False).advantages(prompts, torch.tensor([1.0, 3.0, 5.0, 5.0]))
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (1 + 1e-4))
    assert stats["groups_without_signal"] == 0.5


def test_bad_settings_are_refused():
    for bad in ({"beta": 0.0}, {"adv_clip_max": -1.0}, {"kl_beta": -1.0}, {"decay_max": 1.0}):
        with pytest.raises(ValueError):
            NFT(**bad)


def lora_sd3():
    pipeline = build_tiny_sd3(seed=0)
    add_lora(pipeline.transformer, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    return pipeline


def test_the_old_policy_is_a_second_adapter_that_follows_by_a_moving_average():
    pipeline = lora_sd3()
    network = pipeline.transformer
    sizes = sum(p.numel() for p in network.parameters()), sum(p.numel() for p in network.parameters()
                                                                  if p.requires_grad)
    algorithm = NFT(decay_rate=0.1, decay_max=0.5)
    algorithm.attach(network)
    # one more adapter's worth of parameters, not another network; only the trained adapter trains
    assert sum(p.numel() for p in network.parameters()) == sizes[0] + sizes[1]
    assert sum(p.numel() for p in network.parameters() if p.requires_grad) == sizes[1]
    pairs = algorithm._adapter_pairs()
    assert len(pairs) > 0 and all(torch.equal(old, trained) for old, trained in pairs)

    family = StableDiffusion3(pipeline, max_sequence_length=16)
    conditioning = family.encode_prompts(["a cat"], torch.device("cpu"))
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))

    def velocity():
        with torch.no_grad():
            return family.predict(network, latents, torch.tensor([500.0]), conditioning, 1.0)

    before = velocity()
    saved_old = [old.clone() for old, _ in pairs]
    with torch.no_grad():  # a training step moves the trained adapter only
        for _, trained in pairs:
            trained.add_(0.05 * torch.randn_like(trained))
    assert not torch.allclose(velocity(), before)
    with algorithm.sampling():  # rollouts sample with the old policy, still the one before the step
        torch.testing.assert_close(velocity(), before)
    assert all(p.requires_grad for _, p in pairs) and not any(old.requires_grad for old, _ in pairs)

    stats = algorithm.end_epoch(updates=3)  # decay = min(3 * 0.1, 0.5) = 0.3
    assert stats["old_policy_decay"] == pytest.approx(0.3)
    for (old, trained), previous in zip(pairs, saved_old):
        torch.testing.assert_close(old, 0.3 * previous + 0.7 * trained)
    assert algorithm.end_epoch(updates=10)["old_policy_decay"] == 0.5  # capped

    state = algorithm.state_dict()
    other = NFT()
    other.attach(lora_sd3().transformer)
    other.load_state_dict(state)
    assert other.updates == 13
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(other._adapter_pairs(), pairs))


def test_the_exported_lora_is_the_trained_adapter_alone(tmp_path):
    from safetensors.torch import load_file

    pipeline = lora_sd3()
    family = StableDiffusion3(pipeline, max_sequence_length=16)
    family.export_lora(pipeline.transformer, tmp_path / "before")
    algorithm = NFT()
    algorithm.attach(pipeline.transformer)
    family.export_lora(pipeline.transformer, tmp_path / "after")
    before, after = (load_file(tmp_path / f / "pytorch_lora_weights.safetensors") for f in ("before", "after"))
    assert before.keys() == after.keys() and not any(".old." in key for key in after)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_attach_refuses_a_network_without_lora():
    with pytest.raises(UserError, match="model.finetune=lora"):
        NFT().attach(build_tiny_sd3(seed=0).transformer)


def test_loss_on_clean_samples_is_finite_and_has_zero_kl_and_deviation_at_the_start():
    pipeline = lora_sd3()
    network = pipeline.transformer
    algorithm = NFT(kl_beta=0.1)
    algorithm.attach(network)
    family = StableDiffusion3(pipeline, max_sequence_length=16)
    sampler = family.sampler(0.0)
    prompts = ["a cat", "a cat", "a dog", "a dog"]
    with algorithm.sampling():
        sampled = rollout(network, family, sampler, prompts, [0, 1, 2, 3], [0, 1, 2, 3], family.latent_shape(32), 4,
                          1.0, torch.device("cpu"), window=(0, 0))
    batch = sampled.clean_trajectories(prompts, torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 1.0]))
    assert batch.next_latents.shape == (4, 1, 16, 16, 16) and batch.timesteps.shape == (4, 4)
    advantages, _ = algorithm.advantages(prompts, batch.rewards)
    batch = batch.with_advantages(advantages)
    policy = Policy(network, family, sampler, 1.0, ReferencePolicy(network, "lora", torch.device("cpu")))
    loss, stats = algorithm.loss(policy, batch, torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    assert stats["old_deviation"].item() == 0 and stats["kl"].item() == 0  # LoRA B starts at zero
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters() if p.requires_grad)
