"""The FLUX family on the tiny FluxPipeline: packing, the distilled guidance, the shifted schedule, the
loading, LoRA and export code FLUX.1-dev uses, and a rollout that training re-scores."""

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from rlfuse.errors import UserError
from rlfuse.families.flux import Flux, resolution_multiple, sampler_for_checks
from rlfuse.lora import add_lora, trainable_parameters
from rlfuse.policy import Policy
from rlfuse.rollout import rollout
from rlfuse.seeding import initial_noise

CPU = torch.device("cpu")
OPTIONS = {"max_sequence_length": 16, "resolution": 32}


def tiny(seed: int = 0, **kwargs) -> Flux:
    return Flux.load(None, tiny_seed=seed, **OPTIONS, **kwargs)


def transformer_output(family: Flux, transformer=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 16, 16, generator=g)
    conditioning = family.encode_prompts(["a red circle", "a blue square"], CPU)
    with torch.no_grad():
        return family.predict(transformer or family.network, latents, torch.tensor([900.0, 300.0]), conditioning, 1.0)


def perturb(network, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(network).values():
            p += 0.05 * torch.randn(p.shape, generator=g)


def test_tiny_flux_is_seeded_and_loads_back_from_a_folder(tmp_path):
    a, b, c = tiny(0), tiny(0), tiny(1)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        one, two = getattr(a.pipeline, part).state_dict(), getattr(b.pipeline, part).state_dict()
        assert all(torch.equal(one[k], two[k]) for k in one), part
    assert torch.equal(transformer_output(a), transformer_output(b))
    assert not torch.equal(transformer_output(a), transformer_output(c))
    a.pipeline.save_pretrained(tmp_path / "pipe")
    loaded = Flux.load(str(tmp_path / "pipe"), **OPTIONS)
    assert len(loaded.pipeline.tokenizer_2) == 192
    # text encoders built from a config and loaded from a folder may pick other attention kernels
    torch.testing.assert_close(transformer_output(loaded), transformer_output(a), rtol=1e-5, atol=1e-5)


def test_each_distinct_prompt_is_encoded_once_into_t5_states_clip_pooled_and_text_ids(monkeypatch):
    family = tiny()
    calls = []
    t5 = family.pipeline._get_t5_prompt_embeds

    def counting_t5(prompt, **kwargs):
        calls.append(list(prompt))
        return t5(prompt=prompt, **kwargs)

    monkeypatch.setattr(family.pipeline, "_get_t5_prompt_embeds", counting_t5)
    conditioning = family.encode_prompts(["a cat", "a dog", "a cat"], CPU)
    assert calls == [["a cat", "a dog"]]
    assert conditioning["prompt_embeds"].shape == (3, 16, 32) and conditioning["pooled_embeds"].shape == (3, 32)
    assert conditioning["text_ids"].shape == (3, 16, 3) and not conditioning["text_ids"].any()
    torch.testing.assert_close(conditioning["prompt_embeds"][0], conditioning["prompt_embeds"][2])
    assert not torch.allclose(conditioning["pooled_embeds"][0], conditioning["pooled_embeds"][1])
    # the shapes world's and the animal prompts tokenize into words, not <unk>
    ids = family.pipeline.tokenizer_2(["three green triangles above a purple square", "a kangaroo"]).input_ids
    assert family.pipeline.tokenizer_2.unk_token_id not in [i for row in ids for i in row]
    assert len(ids[0]) == 7 + 1 and len(ids[1]) == 2 + 1  # one piece per word, then </s>


def test_predict_packs_2x2_patches_and_feeds_the_distilled_guidance():
    family = tiny()
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    packed = FluxPipeline._pack_latents(latents, 2, 16, 16, 16)
    assert packed.shape == (2, 64, 64)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 32, 32, 2), latents, rtol=0, atol=0)
    conditioning = family.encode_prompts(["a cat", "a dog"], CPU)
    with torch.no_grad():
        expected = family.network(
            hidden_states=packed, timestep=torch.tensor([0.8, 0.8]), guidance=torch.tensor([3.5, 3.5]),
            pooled_projections=conditioning["pooled_embeds"], encoder_hidden_states=conditioning["prompt_embeds"],
            txt_ids=torch.zeros(16, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, CPU, torch.float32),
        ).sample
        prediction = family.predict(family.network, latents, torch.tensor(800.0), conditioning, 1.0)
        # guidance_scale is classifier-free guidance, which FLUX does not use; model.guidance is the input
        unguided = family.predict(family.network, latents, torch.tensor(800.0), conditioning, 4.5)
        other = Flux(family.pipeline, guidance=1.0, **OPTIONS).predict(family.network, latents, torch.tensor(800.0),
                                                                        conditioning, 1.0)
    torch.testing.assert_close(prediction, FluxPipeline._unpack_latents(expected, 32, 32, 2), rtol=0, atol=0)
    assert torch.equal(unguided, prediction) and not torch.allclose(other, prediction)
    with pytest.raises(UserError, match="model.guidance=null"):
        Flux(family.pipeline, guidance=None)


def test_the_deterministic_chain_is_flux_pipelines_on_its_resolution_shifted_schedule():
    family = tiny()
    sampler = family.sampler(0.0)  # eta 0: the Euler step of FlowMatchEulerDiscreteScheduler.step
    assert sampler.mu == pytest.approx(calculate_shift(8 * 8))  # 64 packed tokens at 32 px
    assert sampler_for_checks(None, None, 0.0, resolution=32).mu == sampler.mu
    assert sampler_for_checks(None, None, 0.0).mu == pytest.approx(1.15)  # FluxPipeline's default 128 latents
    prompts, seeds = ["a red circle", "a cat"], [1, 2]
    sampled = rollout(family.network, family, sampler, prompts, seeds, [3, 4], family.latent_shape(32), 4, 5.0, CPU)
    noise = FluxPipeline._pack_latents(initial_noise((16, 16, 16), seeds), 2, 16, 16, 16)
    expected = family.pipeline(prompts, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                               max_sequence_length=16, latents=noise, output_type="latent").images
    torch.testing.assert_close(sampled.chains[:, -1], FluxPipeline._unpack_latents(expected, 32, 32, 2),
                               rtol=1e-5, atol=1e-5)


def test_rollout_log_probs_are_rescored_by_the_policy():
    family = tiny()
    for sde_type in ("sde", "cps"):
        sampler = family.sampler(0.7, sde_type)
        prompts = ["a cat", "a dog", "a cat"]
        args = (family.network, family, sampler, prompts, [1, 2, 1], [10, 11, 12], family.latent_shape(32), 4, 5.0, CPU)
        first, second = rollout(*args), rollout(*args)
        assert torch.equal(first.chains, second.chains) and torch.equal(first.log_probs, second.log_probs)
        assert first.chains.shape == (3, 5, 16, 16, 16) and first.log_probs.shape == (3, 4)
        assert first.images.shape == (3, 3, 32, 32) and 0 <= first.images.min() and first.images.max() <= 1
        samples = first.trajectories(prompts, torch.arange(3), torch.zeros(3))
        policy = Policy(family.network, family, sampler, 5.0)
        with torch.no_grad():
            rescored = torch.stack([policy.log_prob(samples, torch.full((3,), j)) for j in range(4)], dim=1)
        torch.testing.assert_close(rescored, first.log_probs, atol=1e-5, rtol=0)


def test_lora_on_joint_and_single_blocks_loads_with_load_lora_weights_at_its_alpha(tmp_path):
    tiny().pipeline.save_pretrained(tmp_path / "base")
    trained = Flux.load(str(tmp_path / "base"), **OPTIONS)
    add_lora(trained.network, rank=4, alpha=8, target_modules=list(trained.default_lora_targets))
    names = list(trainable_parameters(trained.network))
    for module in ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_out.0",
                   "single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.proj_mlp"):
        assert any(n.startswith(module + ".lora_A") for n in names), module
    assert not any(n.startswith("proj_out.") for n in names), "the final output projection stays as it is"
    perturb(trained.network)
    trained.export_lora(trained.network, tmp_path / "lora")
    user = FluxPipeline.from_pretrained(tmp_path / "base")
    user_family = Flux(user, **OPTIONS)
    before = transformer_output(user_family)
    user.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(transformer_output(user_family), transformer_output(trained), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(transformer_output(user_family), before)


def test_full_fine_tune_exports_a_pipeline_folder_that_from_pretrained_loads(tmp_path):
    family = tiny()
    tuned = tiny(3).network  # stands in for a fine-tuned transformer
    family.export_pipeline(tuned, tmp_path / "pipeline")
    assert isinstance(FluxPipeline.from_pretrained(tmp_path / "pipeline"), FluxPipeline)
    loaded = Flux.load(str(tmp_path / "pipeline"), **OPTIONS)
    torch.testing.assert_close(transformer_output(loaded), transformer_output(family, tuned), rtol=1e-5, atol=1e-5)
    assert family.network is not tuned


def test_a_resolution_the_vae_and_the_packing_cannot_make_is_refused():
    family = tiny()
    assert resolution_multiple(None) == 4
    assert family.latent_shape(36) == (16, 18, 18)
    with pytest.raises(UserError, match=r"model.resolution=34: must be a multiple of 4 \(the VAE's factor times "):
        family.latent_shape(34)
    images = family.decode(torch.zeros(1, 16, 16, 16))
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
