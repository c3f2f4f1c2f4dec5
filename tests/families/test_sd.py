"""The Stable Diffusion family: the tiny pipeline goes through the same loading and export code as real models."""

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline, write_clip_tokenizer_files
from rlfuse.lora import add_lora
from helpers_models import perturb_lora, unet_output


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
    loaded = StableDiffusion.load(str(tmp_path / "pipe")).pipeline
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert torch.equal(unet_output(loaded.unet), unet_output(tiny_pipeline.unet))
    assert loaded.tokenizer("a red circle").input_ids == tiny_pipeline.tokenizer("a red circle").input_ids


def test_exported_lora_loads_with_diffusers_load_lora_weights(tmp_path):
    base = build_tiny_pipeline(seed=0)
    base.save_pretrained(tmp_path / "base")
    family = StableDiffusion.load(str(tmp_path / "base"))
    trained = family.pipeline
    add_lora(trained.unet, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    perturb_lora(trained.unet)
    family.export_lora(trained.unet, tmp_path / "lora")
    user = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    before = unet_output(user.unet)
    user.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_output(user.unet), unet_output(trained.unet), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unet_output(user.unet), before)


def test_full_fine_tune_exports_a_pipeline_folder_that_from_pretrained_loads(tmp_path):
    pipeline = build_tiny_pipeline(seed=0)
    tuned_unet = build_tiny_pipeline(seed=3).unet  # stands in for a fine-tuned UNet
    StableDiffusion(pipeline).export_pipeline(tuned_unet, tmp_path / "pipeline")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert torch.equal(unet_output(loaded.unet), unet_output(tuned_unet))
    assert pipeline.unet is not tuned_unet  # the pipeline object is left as it was
