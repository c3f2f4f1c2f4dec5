"""The SD3 family on the tiny StableDiffusion3Pipeline: the same loading, LoRA and export code as SD3.5."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from rlfuse.errors import UserError
from rlfuse.families.sd3 import StableDiffusion3
from rlfuse.lora import add_lora, trainable_parameters

CPU = torch.device("cpu")


def transformer_output(family: StableDiffusion3, transformer=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 16, 16, generator=g)
    conditioning = family.encode_prompts(["a red circle", "a blue square"], CPU)
    with torch.no_grad():
        return family.predict(transformer or family.network, latents, torch.tensor([900.0, 300.0]), conditioning, 4.5)


def perturb(network, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(network).values():
            p += 0.05 * torch.randn(p.shape, generator=g)


def test_tiny_sd3_is_seeded_and_loads_back_from_a_folder_without_t5(tmp_path):
    a, b, c = (StableDiffusion3.load(None, tiny_seed=s, max_sequence_length=16) for s in (0, 0, 1))
    assert torch.equal(transformer_output(a), transformer_output(b))
    assert not torch.equal(transformer_output(a), transformer_output(c))
    a.pipeline.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusion3.load(str(tmp_path / "pipe"), text_encoder_3=False, max_sequence_length=16)
    assert loaded.pipeline.text_encoder_3 is None
    # text encoders built from a config and loaded from a folder may pick other attention kernels
    torch.testing.assert_close(transformer_output(loaded), transformer_output(a), rtol=1e-5, atol=1e-6)


def test_prompts_are_encoded_once_each_with_the_empty_prompt_as_negative():
    family = StableDiffusion3.load(None, max_sequence_length=16)
    conditioning = family.encode_prompts(["a cat", "a dog", "a cat"], CPU)
    assert conditioning["prompt_embeds"].shape == (3, 32, 64) and conditioning["pooled_embeds"].shape == (3, 64)
    torch.testing.assert_close(conditioning["prompt_embeds"][0], conditioning["prompt_embeds"][2])
    empty = family.encode_prompts([""], CPU)
    torch.testing.assert_close(conditioning["negative_embeds"][1], empty["prompt_embeds"][0])
    torch.testing.assert_close(conditioning["negative_pooled_embeds"][1], empty["pooled_embeds"][0])
    # guidance 1 is the conditional branch alone; another scale mixes in the unconditional one
    latents = torch.randn(3, 16, 16, 16)
    cond = family.network(hidden_states=latents, timestep=torch.full((3,), 500.0),
                          encoder_hidden_states=conditioning["prompt_embeds"],
                          pooled_projections=conditioning["pooled_embeds"]).sample
    torch.testing.assert_close(family.predict(family.network, latents, torch.tensor(500.0), conditioning, 1.0), cond)


def test_lora_covers_the_second_attention_and_loads_with_load_lora_weights_at_its_alpha(tmp_path):
    base = StableDiffusion3.load(None, max_sequence_length=16)
    base.pipeline.save_pretrained(tmp_path / "base")
    trained = StableDiffusion3.load(str(tmp_path / "base"), text_encoder_3=False, max_sequence_length=16)
    add_lora(trained.network, rank=4, alpha=8, target_modules=list(trained.default_lora_targets))
    names = list(trainable_parameters(trained.network))
    assert any(".attn2.to_q." in n for n in names) and any(".attn.add_q_proj." in n for n in names)
    perturb(trained.network)
    trained.export_lora(trained.network, tmp_path / "lora")
    user = StableDiffusion3Pipeline.from_pretrained(tmp_path / "base", text_encoder_3=None, tokenizer_3=None)
    user_family = StableDiffusion3(user, max_sequence_length=16)
    before = transformer_output(user_family)
    user.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(transformer_output(user_family), transformer_output(trained), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(transformer_output(user_family), before)


def test_full_fine_tune_exports_a_pipeline_folder_that_from_pretrained_loads(tmp_path):
    family = StableDiffusion3.load(None, max_sequence_length=16)
    tuned = StableDiffusion3.load(None, tiny_seed=3).network  # stands in for a fine-tuned transformer
    family.export_pipeline(tuned, tmp_path / "pipeline")
    loaded = StableDiffusion3.load(str(tmp_path / "pipeline"), text_encoder_3=False, max_sequence_length=16)
    torch.testing.assert_close(transformer_output(loaded), transformer_output(family, tuned), rtol=1e-5, atol=1e-6)
    assert family.network is not tuned


def test_a_resolution_the_vae_and_patches_cannot_make_is_refused():
    family = StableDiffusion3.load(None, max_sequence_length=16)
    assert family.latent_shape(36) == (16, 18, 18)
    with pytest.raises(UserError, match="model.resolution=34: must be a multiple of 4"):
        family.latent_shape(34)
    images = family.decode(torch.zeros(1, 16, 16, 16))
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
