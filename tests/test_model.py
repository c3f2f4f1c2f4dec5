"""Loading, LoRA and export: the tiny pipeline goes through the same code path as real models."""

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from rlfuse.model import (ReferencePolicy, add_lora, adapters_disabled, build_tiny_pipeline, export_lora,
                          export_pipeline, load_pipeline, trainable_parameters, write_clip_tokenizer_files)


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    states = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), encoder_hidden_states=states).sample


def perturb_lora(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in trainable_parameters(unet).items():
        p.data += 0.05 * torch.randn(p.shape, generator=g)


def test_full_clip_vocabulary_gives_openai_clip_ids(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp_path, num_merges=48894, max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 49408
    # OpenAI CLIP: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_pipeline_is_seeded():
    a, b, c = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=1)
    assert torch.equal(unet_output(a.unet), unet_output(b.unet))
    assert not torch.equal(unet_output(a.unet), unet_output(c.unet))
    assert len(a.tokenizer) == a.text_encoder.config.vocab_size == 512 + 2000 + 2


def test_pipeline_saved_to_a_folder_loads_back_by_path(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert torch.equal(unet_output(loaded.unet), unet_output(tiny_pipeline.unet))
    assert loaded.tokenizer("a red circle").input_ids == tiny_pipeline.tokenizer("a red circle").input_ids


def test_lora_starts_equal_to_base_and_reference_is_adapters_off():
    pipeline = build_tiny_pipeline(seed=0)
    base_out = unet_output(pipeline.unet)
    total_before = sum(p.numel() for p in pipeline.unet.parameters())
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    trainable = trainable_parameters(pipeline.unet)
    assert trainable and all("lora" in name for name in trainable)
    torch.testing.assert_close(unet_output(pipeline.unet), base_out)
    perturb_lora(pipeline.unet)
    assert not torch.allclose(unet_output(pipeline.unet), base_out)
    with adapters_disabled(pipeline.unet):
        torch.testing.assert_close(unet_output(pipeline.unet), base_out)
    # The reference policy costs only the adapters, never a second UNet.
    total_after = sum(p.numel() for p in pipeline.unet.parameters())
    assert total_after - total_before == sum(p.numel() for p in trainable.values()) < 0.5 * total_before


def test_reference_policy_with_lora_is_the_same_unet_with_adapters_off():
    pipeline = build_tiny_pipeline(seed=0)
    base_out = unet_output(pipeline.unet)
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=["to_q", "to_v", "conv1"])
    reference = ReferencePolicy(pipeline.unet, "lora", torch.device("cpu"))
    perturb_lora(pipeline.unet)
    with reference() as reference_unet:
        assert reference_unet is pipeline.unet  # no second network
        torch.testing.assert_close(unet_output(reference_unet), base_out)
        assert not torch.is_grad_enabled()
    assert not torch.allclose(unet_output(pipeline.unet), base_out), "adapters are back on afterwards"


def test_reference_policy_with_full_fine_tuning_is_a_frozen_copy():
    pipeline = build_tiny_pipeline(seed=0)
    base_out = unet_output(pipeline.unet)
    reference = ReferencePolicy(pipeline.unet, "full", torch.device("cpu"))
    with torch.no_grad():
        for p in pipeline.unet.parameters():
            p.add_(0.01)  # training moves the policy ...
    with reference() as reference_unet:
        assert reference_unet is not pipeline.unet
        torch.testing.assert_close(unet_output(reference_unet), base_out)  # ... not the reference
        assert not any(p.requires_grad for p in reference_unet.parameters())


def test_exported_lora_loads_with_diffusers_load_lora_weights(tmp_path):
    base = build_tiny_pipeline(seed=0)
    base.save_pretrained(tmp_path / "base")
    trained = load_pipeline(str(tmp_path / "base"))
    add_lora(trained.unet, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    perturb_lora(trained.unet)
    export_lora(trained.unet, tmp_path / "lora")
    user = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    before = unet_output(user.unet)
    user.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_output(user.unet), unet_output(trained.unet), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unet_output(user.unet), before)


def test_full_fine_tune_exports_a_pipeline_folder_that_from_pretrained_loads(tmp_path):
    pipeline = build_tiny_pipeline(seed=0)
    tuned_unet = build_tiny_pipeline(seed=3).unet  # stands in for a fine-tuned UNet
    export_pipeline(pipeline, tuned_unet, tmp_path / "pipeline")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert torch.equal(unet_output(loaded.unet), unet_output(tuned_unet))
    assert pipeline.unet is not tuned_unet  # the pipeline object is left as it was
