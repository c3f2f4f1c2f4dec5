"""PickScore on a tiny random CLIPModel saved to a folder: the score by hand, tensor preprocessing
against the processor's PIL pipeline, start-up errors, and one training epoch."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlfuse.families.tiny import build_tokenizer
from rlfuse.rewards.pickscore import SCALE, ImageSettings, PickScoreReward, preprocess
from tests.test_train import metrics, run_train, train

# The tiny processor resizes the shortest side to 40 px and crops the centre 32 px, the vision encoder's input.
SHORTEST_EDGE, CROP = 40, 32


def tiny_clip(tokenizer):
    """A random CLIPModel for `tokenizer`'s vocabulary: 2-layer, 32-wide text and vision encoders, 32 px
    images in 8 px patches, 16-wide embeddings."""
    from transformers import CLIPConfig, CLIPModel

    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**layers, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {**layers, "image_size": CROP, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # CLIP's cap on logit_scale.exp()
    return model


def tiny_image_processor():
    """A CLIP image processor: shortest side to SHORTEST_EDGE px, centre crop CROP px, OpenAI CLIP mean and std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": SHORTEST_EDGE}, crop_size={"height": CROP, "width": CROP})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, processor folder), written with save_pretrained."""
    from transformers import CLIPProcessor

    root = tmp_path_factory.mktemp("pickscore")
    tokenizer = build_tokenizer(root / "tokenizer", num_merges=200, max_length=77)
    CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer).save_pretrained(root / "processor")
    tiny_clip(tokenizer).save_pretrained(root / "model")
    return root / "model", root / "processor"


@pytest.fixture(scope="module")
def reward(folders) -> PickScoreReward:
    model, processor = folders
    reward = PickScoreReward(model=str(model), processor=str(processor))
    reward.check_ready()
    return reward


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 36, 48, generator=torch.Generator().manual_seed(0))


def smooth_picture(height: int, width: int) -> Image.Image:
    """A smooth RGB picture (real images are; on pixel noise PIL and torch resample further apart)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 3, height), torch.linspace(0, 4, width), indexing="ij")
    picture = torch.stack([torch.sin(xs) * 0.5 + 0.5, torch.cos(ys) * 0.5 + 0.5, (xs + ys) / 7])
    return Image.fromarray((picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_score_is_scale_times_logit_scale_exp_times_the_cosine_by_hand(reward, folders, images):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    prompts = ["a cat", "two dogs on the left", "a red circle"]
    scores = reward(images, prompts).scores
    model = CLIPModel.from_pretrained(folders[0]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folders[1])
    settings = ImageSettings.of(CLIPProcessor.from_pretrained(folders[1]).image_processor, "processor")
    with torch.no_grad():
        image = model.vision_model(pixel_values=preprocess(images, settings)).pooler_output
        image = model.visual_projection(image)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        cosine = F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scores, (1 / 26) * 100.0 * cosine)
    assert SCALE == 1 / 26
    # Each prompt goes with its own image, and a batch scores as its rows one by one.
    assert len(set(scores.tolist())) == 3
    torch.testing.assert_close(torch.cat([reward(images[i:i + 1], prompts[i:i + 1]).scores for i in range(3)]), scores)
    raw = PickScoreReward(model=str(folders[0]), processor=str(folders[1]), scale=1.0)(images, prompts).scores
    torch.testing.assert_close(raw, 100.0 * cosine)


def test_scores_are_float32_on_the_cpu_without_gradients_unless_asked(reward, folders, images):
    scores = reward(images, ["a"] * 3).scores
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert not scores.requires_grad and not any(p.requires_grad for p in reward.model.parameters())
    with_grad = PickScoreReward(model=str(folders[0]), processor=str(folders[1]), grad=True)
    images = images.clone().requires_grad_(True)
    with_grad(images, ["a"] * 3).scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("shortest_edge, crop, size", [(224, 224, (256, 320)), (SHORTEST_EDGE, CROP, (96, 72))],
                         ids=["laion-224", "tiny"])
def test_tensor_preprocessing_matches_the_processors_pil_pipeline(shortest_edge, crop, size):
    """transformers' PIL CLIP image processor (PIL bicubic resize of the shortest side, centre crop,
    OpenAI CLIP mean and std: the laion processor's preprocessor_config.json) on a uint8 picture."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop})
    pil = smooth_picture(*size)
    expected = processor(images=pil, return_tensors="pt")["pixel_values"]
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    ours = preprocess(tensor, ImageSettings.of(processor, "processor"))
    assert ours.shape == expected.shape == (1, 3, crop, crop)
    # PIL resamples a uint8 image and rounds; torch a float tensor: within 1% of the range, on average and
    # at every pixel (seen: 0.08-0.12% on average, 0.3-0.4% at most).
    error = (ours - expected).abs() / (expected.max() - expected.min())
    assert error.mean() < 0.01 and error.max() < 0.01


def test_missing_weights_fail_at_start_up_in_one_line_naming_the_download(monkeypatch, tmp_path, folders):
    model, processor = folders
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty cache
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model / "config.json").read_text())
    for arguments, message in [
        ({}, (r"reward.fn.model='yuvalkirstain/PickScore_v1': not in the Hugging Face cache \(config.json, "
              r"model.safetensors or pytorch_model.bin\) and HF_HUB_OFFLINE is set; run `hf download "
              r"yuvalkirstain/PickScore_v1`")),
        ({"model": str(model)}, (r"reward.fn.processor='laion/CLIP-ViT-H-14-laion2B-s32B-b79K': not in the Hugging "
                                 r"Face cache .*run `hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K")),
        ({"model": "/no/such/folder", "processor": str(processor)}, "reward.fn.model='/no/such/folder': no such folder"),
        ({"model": str(model), "processor": "./no/such/processor"}, "reward.fn.processor='./no/such/processor': no such"),
        ({"model": str(no_weights), "processor": str(processor)}, "holds no model.safetensors or pytorch_model.bin"),
        ({"model": str(model), "processor": str(model)}, "holds no preprocessor_config.json or processor_config.json"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            PickScoreReward(**arguments).check_ready()
        assert "\n" not in str(error.value)


def test_online_the_missing_files_are_downloaded_before_the_run_or_fail_in_one_line(monkeypatch, tmp_path):
    """Online and uncached, check_ready fetches each needed file (the first of its names the repository
    has); a network failure becomes one line naming the download command. hf_hub_download is a stand-in."""
    from unittest import mock

    from huggingface_hub.errors import RemoteEntryNotFoundError

    from rlfuse.rewards.pickscore import check_hub

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty cache
    asked = []

    def fake_download(repo, file):
        asked.append(file)
        if file == "model.safetensors":  # an older repository: pytorch_model.bin only
            raise RemoteEntryNotFoundError("404", response=mock.MagicMock())
        return str(tmp_path / file)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    check_hub("yuvalkirstain/PickScore_v1", "reward.fn.model")
    assert asked == ["config.json", "model.safetensors", "pytorch_model.bin"]

    def offline_network(repo, file):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline_network)
    with pytest.raises(ValueError, match=r"could not download config.json \(ConnectionError\); run `hf download "
                                         r"yuvalkirstain/PickScore_v1`") as error:
        check_hub("yuvalkirstain/PickScore_v1", "reward.fn.model")
    assert "\n" not in str(error.value)


def test_a_tokenizer_that_does_not_fill_the_vocabulary_is_refused(tmp_path, folders):
    """What an incomplete download looks like: a tokenizer much smaller than the text encoder's vocabulary."""
    from transformers import CLIPProcessor

    tokenizer = build_tokenizer(tmp_path / "tokenizer", num_merges=20, max_length=77)
    CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"the tokenizer has 534 tokens, the text encoder embeds 714"):
        PickScoreReward(model=str(folders[0]), processor=str(tmp_path / "small")).check_ready()


def test_trains_one_epoch_on_the_tiny_model(tmp_path, folders):
    model, processor = folders
    run_dir = train(tmp_path, "model=tiny", "reward=pickscore", "prompts=simple_animals", f"reward.fn.model={model}",
                    f"reward.fn.processor={processor}", "epochs=1", "eval.every=0", "hardware.sample_batch_size=4",
                    "hardware.train_batch_size=4", "sample.num_steps=4", "progress=false")  # asserts exit code 0
    row = metrics(run_dir)[0]
    assert math.isfinite(row["reward_mean"]) and math.isfinite(row["loss"])


def test_without_the_weights_offline_the_run_stops_at_start_up_in_one_line_with_exit_code_2(tmp_path):
    """The trainer's preflight calls check_ready: one line on stderr, exit code 2, no run folder."""
    result = run_train(tmp_path / "runs", "reward=pickscore", "prompts=simple_animals",
                       env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "reward=pickscore: reward.fn.model='yuvalkirstain/PickScore_v1': not in the Hugging Face cache" in lines[0]
    assert "hf download yuvalkirstain/PickScore_v1" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
