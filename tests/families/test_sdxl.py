"""The SDXL family on the tiny StableDiffusionXLPipeline: the conditioning SDXL's pipeline builds, its
sampled chain at eta 0, and the loading, LoRA and export code SDXL base uses, through a pipeline folder."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from rlfuse.errors import UserError
from rlfuse.families.sdxl import StableDiffusionXL, sampler_for_checks
from rlfuse.families.tiny import build_tiny_sdxl
from rlfuse.lora import add_lora
from rlfuse.rollout import rollout
from rlfuse.seeding import initial_noise
from helpers_models import perturb_lora

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "a cat"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]  # conf/model/tiny_sdxl.yaml


def tiny(seed: int = 0, **options) -> StableDiffusionXL:
    return StableDiffusionXL.load(None, tiny_seed=seed, **{"resolution": 32, **options})


def unet_output(family: StableDiffusionXL, network=None, guidance_scale: float = 5.0) -> torch.Tensor:
    """The guided prediction at fixed latents and timesteps for PROMPTS."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    conditioning = family.encode_prompts(PROMPTS, CPU)
    with torch.no_grad():
        return family.predict(network or family.network, latents, torch.tensor([801, 301]), conditioning,
                              guidance_scale)


def sample(family: StableDiffusionXL, network=None):
    """A 4-step chain at eta 0 (deterministic DDIM) from the noise of seeds 1 and 2, guidance 5."""
    return rollout(network or family.network, family, family.sampler(0.0), PROMPTS, [1, 2], [3, 4],
                   family.latent_shape(32), 4, 5.0, CPU)


def pipeline_images(pipeline: StableDiffusionXLPipeline) -> torch.Tensor:
    """StableDiffusionXLPipeline.__call__ from the rollout's initial noise: (2, 3, 32, 32) in [0, 1]."""
    with torch.no_grad():
        return pipeline(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                        latents=initial_noise((4, 16, 16), [1, 2]), output_type="pt").images


def test_tiny_sdxl_is_seeded_and_loads_back_from_a_folder_with_a_ddim_scheduler_of_its_schedule(tmp_path):
    a, b, c = tiny(0), tiny(0), tiny(1)
    assert torch.equal(unet_output(a), unet_output(b)) and not torch.allclose(unet_output(a), unet_output(c))
    build_tiny_sdxl(seed=0).save_pretrained(tmp_path / "pipe")  # as SDXL base's folder: with an Euler scheduler
    saved = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(saved.scheduler, EulerDiscreteScheduler)
    loaded = StableDiffusionXL.load(str(tmp_path / "pipe"), resolution=32)
    scheduler = loaded.pipeline.scheduler
    assert isinstance(scheduler, DDIMScheduler)
    assert (scheduler.config.clip_sample, scheduler.config.set_alpha_to_one, scheduler.config.steps_offset,
            scheduler.config.timestep_spacing) == (False, False, 1, "leading")
    torch.testing.assert_close(scheduler.alphas_cumprod, saved.scheduler.alphas_cumprod, rtol=0, atol=0)
    # the start-up checks read the same schedule from the folder's config alone
    stds = sampler_for_checks(str(tmp_path / "pipe"), None, 1.0).step_stds(4)
    torch.testing.assert_close(stds, loaded.sampler(1.0).step_stds(4))
    assert loaded.pipeline.vae.config.scaling_factor == 0.13025
    # text encoders built from a config and loaded from a folder may pick other attention kernels
    torch.testing.assert_close(unet_output(loaded), unet_output(a), rtol=1e-5, atol=1e-5)


def test_conditioning_is_both_encoders_penultimate_states_the_second_pooled_and_the_image_size():
    family = tiny()
    pipeline = family.pipeline
    conditioning = family.encode_prompts(["a cat", "a dog", "a cat"], CPU)
    assert conditioning["prompt_embeds"].shape == (3, 16, 64)  # 16 tokens, 32 + 32 wide (SDXL base: 77 x 2048)
    assert conditioning["pooled_embeds"].shape == (3, 32)
    assert conditioning["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 3
    ids = [tokenizer(["a dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
           for tokenizer in (pipeline.tokenizer, pipeline.tokenizer_2)]
    with torch.no_grad():
        first = pipeline.text_encoder(ids[0], output_hidden_states=True)
        second = pipeline.text_encoder_2(ids[1], output_hidden_states=True)
    expected = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(conditioning["prompt_embeds"][1:2], expected)
    torch.testing.assert_close(conditioning["pooled_embeds"][1:2], second.text_embeds)
    torch.testing.assert_close(conditioning["prompt_embeds"][0], conditioning["prompt_embeds"][2])
    # SDXL base's force_zeros_for_empty_prompt: the unconditional branch is zeros, not the empty prompt
    assert pipeline.config.force_zeros_for_empty_prompt
    assert not conditioning["negative_embeds"].any() and not conditioning["negative_pooled_embeds"].any()
    assert conditioning["negative_embeds"].shape == (3, 16, 64)
    assert tiny(resolution=64).encode_prompts(["a cat"], CPU)["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_without_force_zeros_the_negative_is_the_empty_prompt():
    family = tiny(prompt_cache=0)
    family.pipeline.register_to_config(force_zeros_for_empty_prompt=False)
    conditioning = family.encode_prompts(["a cat"], CPU)
    empty = family.encode_prompts([""], CPU)
    torch.testing.assert_close(conditioning["negative_embeds"], empty["prompt_embeds"])
    torch.testing.assert_close(conditioning["negative_pooled_embeds"], empty["pooled_embeds"])
    assert conditioning["negative_embeds"].abs().sum() > 0


def test_guidance_1_is_the_conditional_unet_call_with_the_added_conditioning():
    family = tiny()
    latents = torch.randn(2, 4, 16, 16)
    conditioning = family.encode_prompts(PROMPTS, CPU)
    with torch.no_grad():
        cond = family.network(latents, torch.tensor([500, 500]), encoder_hidden_states=conditioning["prompt_embeds"],
                              added_cond_kwargs={"text_embeds": conditioning["pooled_embeds"],
                                                 "time_ids": conditioning["time_ids"]}).sample
        guided = family.predict(family.network, latents, torch.tensor(500), conditioning, 5.0)
        torch.testing.assert_close(family.predict(family.network, latents, torch.tensor(500), conditioning, 1.0), cond)
        # the size conditioning reaches the UNet: another size gives another prediction
        resized = conditioning.clone()
        resized.tensors["time_ids"] = resized["time_ids"] * 2
        assert not torch.allclose(family.predict(family.network, latents, torch.tensor(500), resized, 1.0), cond)
    assert not torch.allclose(guided, cond)


def test_the_deterministic_chain_and_its_images_are_stable_diffusion_xl_pipelines():
    """At eta 0 the rollout is DDIM; StableDiffusionXLPipeline with the family's DDIM scheduler, from the
    same initial noise, samples the same latents and decodes the same images."""
    family = tiny()
    sampled = sample(family)
    with torch.no_grad():
        latents = family.pipeline(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                                  latents=initial_noise((4, 16, 16), [1, 2]), output_type="latent").images
    torch.testing.assert_close(sampled.chains[:, -1], latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled.images, pipeline_images(family.pipeline), rtol=1e-5, atol=1e-5)
    assert sampled.images.std() > 0


def test_trained_lora_loads_into_a_fresh_pipeline_with_load_lora_weights_and_samples_the_same_images(tmp_path):
    tiny().pipeline.save_pretrained(tmp_path / "base")
    trained = StableDiffusionXL.load(str(tmp_path / "base"), resolution=32)
    add_lora(trained.network, rank=4, alpha=8, target_modules=TARGETS)
    perturb_lora(trained.network)
    trained.export_lora(trained.network, tmp_path / "lora")
    user = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    user.scheduler = DDIMScheduler.from_config(user.scheduler.config)
    user_family = StableDiffusionXL(user, resolution=32)
    before = unet_output(user_family)
    user.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_output(user_family), unet_output(trained), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unet_output(user_family), before, atol=1e-3)  # alpha 8 / rank 4 loads at scale 2
    images = sample(trained).images
    torch.testing.assert_close(pipeline_images(user), images, rtol=1e-4, atol=1e-4)
    # the reverse: model.lora_weights fuses the exported LoRA into a freshly loaded UNet
    started = StableDiffusionXL.load(str(tmp_path / "base"), resolution=32, lora_weights=str(tmp_path / "lora"))
    torch.testing.assert_close(unet_output(started), unet_output(trained), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sample(started).images, images, rtol=1e-4, atol=1e-4)


def test_full_fine_tune_exports_a_pipeline_folder_that_from_pretrained_loads(tmp_path):
    family = tiny()
    tuned = tiny(seed=3).network  # stands in for a fine-tuned UNet
    family.export_pipeline(tuned, tmp_path / "pipeline")
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipeline")
    assert loaded.config.force_zeros_for_empty_prompt
    reloaded = StableDiffusionXL(loaded, resolution=32)
    torch.testing.assert_close(unet_output(reloaded), unet_output(family, tuned), rtol=1e-5, atol=1e-5)
    assert family.network is not tuned


def test_an_fp16_vae_that_asks_for_it_is_upcast_before_decoding():
    """SDXL's VAE overflows in fp16 (its config says force_upcast): cast to fp16 with the frozen parts, it
    decodes in fp32, as StableDiffusionXLPipeline does."""
    import copy

    family = tiny()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vae = family.pipeline.vae.to(torch.float16)
    assert vae.config.force_upcast
    in_fp32 = copy.deepcopy(vae).to(torch.float32)  # the same fp16-rounded weights
    with torch.no_grad():
        images = family.decode(latents)
        expected = (in_fp32.decode(latents / 0.13025).sample / 2 + 0.5).clamp(0, 1)
    assert family.pipeline.vae.dtype == torch.float32 and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


def test_a_resolution_the_vae_cannot_make_is_refused_and_a_missing_folder_named():
    family = tiny()
    assert family.latent_shape(64) == (4, 32, 32)
    with pytest.raises(UserError, match="model.resolution=33: must be a multiple of 2"):
        family.latent_shape(33)
    with pytest.raises(UserError, match="cannot load a StableDiffusionXLPipeline"):
        StableDiffusionXL.load("/nonexistent/sdxl-folder")
