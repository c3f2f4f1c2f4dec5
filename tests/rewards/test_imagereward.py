"""ImageReward on its tiny random configuration: normalisation, head, key mapping, preprocessing,
tokens, start-up errors and one training epoch. (Against the original code:
test_imagereward_equivalence.py, opt-in.)"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rlfuse.rewards.aesthetic import AestheticMLP
from rlfuse.rewards.imagereward import (
    ARCHITECTURES,
    ImageReward,
    ImageRewardModel,
    convert_state_dict,
    write_test_vocabulary,
)
from tests.test_train import FAST, metrics, train

TINY_VISION, TINY_TEXT = ARCHITECTURES["tiny"]["vision"], ARCHITECTURES["tiny"]["text"]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    """A made-up BERT vocabulary the size the tiny text encoder embeds, less BLIP's [DEC] and [ENC]."""
    return write_test_vocabulary(tmp_path_factory.mktemp("vocab"), TINY_TEXT["vocab_size"] - 2)


def original_tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the ORIGINAL ImageReward module's key names and shapes (timm's ViT in
    BLIP's vit.py, BLIP's med.py BertModel, BLIP_Pretrain's projections, the MLP), at the tiny size,
    written out by hand; every tensor random, so each one is recognisable where it lands."""
    vision, text = TINY_VISION["hidden_size"], TINY_TEXT["hidden_size"]
    vision_mlp, text_mlp, patch = TINY_VISION["intermediate_size"], TINY_TEXT["intermediate_size"], TINY_VISION["patch_size"]
    positions = TINY_TEXT["max_position_embeddings"]
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, vision),
        "blip.visual_encoder.pos_embed": (1, (TINY_VISION["image_size"] // patch) ** 2 + 1, vision),
        "blip.visual_encoder.patch_embed.proj.weight": (vision, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": (vision,),
        "blip.visual_encoder.norm.weight": (vision,), "blip.visual_encoder.norm.bias": (vision,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (TINY_TEXT["vocab_size"], text),
        "blip.text_encoder.embeddings.position_embeddings.weight": (positions, text),
        "blip.text_encoder.embeddings.LayerNorm.weight": (text,), "blip.text_encoder.embeddings.LayerNorm.bias": (text,),
        "blip.vision_proj.weight": (256, vision), "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, text), "blip.text_proj.bias": (256,),
    }
    for i in range(TINY_VISION["num_hidden_layers"]):
        block = f"blip.visual_encoder.blocks.{i}."
        shapes |= {block + "norm1.weight": (vision,), block + "norm1.bias": (vision,),
                   block + "attn.qkv.weight": (3 * vision, vision), block + "attn.qkv.bias": (3 * vision,),
                   block + "attn.proj.weight": (vision, vision), block + "attn.proj.bias": (vision,),
                   block + "norm2.weight": (vision,), block + "norm2.bias": (vision,),
                   block + "mlp.fc1.weight": (vision_mlp, vision), block + "mlp.fc1.bias": (vision_mlp,),
                   block + "mlp.fc2.weight": (vision, vision_mlp), block + "mlp.fc2.bias": (vision,)}
    for i in range(TINY_TEXT["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for attention, source in (("attention", text), ("crossattention", vision)):  # keys, values read the image
            shapes |= {f"{layer}{attention}.self.query.weight": (text, text),
                       f"{layer}{attention}.self.key.weight": (text, source),
                       f"{layer}{attention}.self.value.weight": (text, source),
                       f"{layer}{attention}.output.dense.weight": (text, text)}
            shapes |= {f"{layer}{attention}.{name}": (text,) for name in (
                "self.query.bias", "self.key.bias", "self.value.bias", "output.dense.bias", "output.LayerNorm.weight",
                "output.LayerNorm.bias")}
        shapes |= {layer + "intermediate.dense.weight": (text_mlp, text), layer + "intermediate.dense.bias": (text_mlp,),
                   layer + "output.dense.weight": (text, text_mlp), layer + "output.dense.bias": (text,),
                   layer + "output.LayerNorm.weight": (text,), layer + "output.LayerNorm.bias": (text,)}
    for index, (outputs, inputs) in zip((0, 2, 4, 6, 7), ((1024, text), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes |= {f"mlp.layers.{index}.weight": (outputs, inputs), f"mlp.layers.{index}.bias": (outputs,)}
    generator = torch.Generator().manual_seed(seed)
    checkpoint = {key: 0.2 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    checkpoint["blip.text_encoder.embeddings.position_ids"] = torch.arange(positions)[None]  # a buffer in med.py
    return checkpoint


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "ImageReward.pt"
    torch.save(original_tiny_checkpoint(), path)
    return path


@pytest.fixture(scope="module")
def reward(checkpoint_file, vocabulary):
    return ImageReward(weights=str(checkpoint_file), tokenizer=str(vocabulary), architecture="tiny")


@pytest.fixture
def images():
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_original_checkpoint_keys_land_on_the_right_tensors():
    original = original_tiny_checkpoint()
    model = ImageRewardModel("tiny")
    model.load_state_dict(convert_state_dict(original))  # strict: no missing, no unexpected key
    vision, text = model.vision, model.text
    expected = {
        "blip.visual_encoder.cls_token": vision.embeddings.class_embedding,
        "blip.visual_encoder.pos_embed": vision.embeddings.position_embedding,
        "blip.visual_encoder.patch_embed.proj.weight": vision.embeddings.patch_embedding.weight,
        "blip.visual_encoder.patch_embed.proj.bias": vision.embeddings.patch_embedding.bias,
        "blip.visual_encoder.norm.weight": vision.post_layernorm.weight,
        "blip.visual_encoder.norm.bias": vision.post_layernorm.bias,
    }
    for i, layer in enumerate(vision.encoder.layers):
        for theirs, ours in (("norm1", layer.layer_norm1), ("attn.qkv", layer.self_attn.qkv),
                             ("attn.proj", layer.self_attn.projection), ("norm2", layer.layer_norm2),
                             ("mlp.fc1", layer.mlp.fc1), ("mlp.fc2", layer.mlp.fc2)):
            for kind in ("weight", "bias"):
                expected[f"blip.visual_encoder.blocks.{i}.{theirs}.{kind}"] = getattr(ours, kind)
    for name, parameter in text.named_parameters():  # BlipTextModel keeps the names of BLIP's med.py
        expected[f"blip.text_encoder.{name}"] = parameter
    for i in (0, 2, 4, 6, 7):
        expected[f"mlp.layers.{i}.weight"], expected[f"mlp.layers.{i}.bias"] = model.head.layers[i].weight, model.head.layers[i].bias

    assert len(expected) == len(list(model.parameters())), "every parameter of the model is accounted for"
    unused = {key for key in original if key.startswith(("blip.vision_proj", "blip.text_proj")) or "position_ids" in key}
    assert set(original) - unused == set(expected)
    for key, parameter in expected.items():
        assert torch.equal(parameter, original[key]), key


def test_a_key_no_rule_maps_is_refused_by_name():
    with pytest.raises(ValueError, match="unexpected key 'blip.itm_head.weight'"):
        convert_state_dict({**original_tiny_checkpoint(), "blip.itm_head.weight": torch.zeros(2, 32)})


def test_head_is_the_linear_map_768_1024_128_64_16_1_by_hand():
    assert ARCHITECTURES["imagereward"]["text"]["hidden_size"] == 768
    head = AestheticMLP(768).eval()  # ImageRewardModel's head: the same layers as the aesthetic predictor's
    assert [tuple(head.layers[i].weight.shape) for i in (0, 2, 4, 6, 7)] == [(1024, 768), (128, 1024), (64, 128),
                                                                          (16, 64), (1, 16)]
    feature = torch.linspace(-1, 1, 768)[None]
    value = feature
    for i in (0, 2, 4, 6, 7):  # no activations; dropout is off in eval mode
        value = value @ head.layers[i].weight.T + head.layers[i].bias
    torch.testing.assert_close(head(feature), value[:, 0])


def test_score_is_the_head_on_the_cls_output_standardised_with_the_published_mean_and_std(reward, images):
    prompts = ["a red circle", "two dogs on the left", "a cat"]
    scores = reward(images, prompts).scores
    model, tokens = reward.model, reward.tokenizer(prompts, padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_states = model.vision(pixel_values=reward.preprocessor.preprocess(images)).last_hidden_state
        text_states = model.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                 encoder_hidden_states=image_states).last_hidden_state
        raw = model.head(text_states[:, 0])  # the [CLS] position
    torch.testing.assert_close(scores, (raw - 0.16717362830052426) / 1.0333394966054072)
    # Both the image and the prompt matter (cross-attention), and a batch scores as its rows one by one.
    assert len(set(scores.tolist())) == 3
    assert reward(images[:1], prompts[1:2]).scores.item() != pytest.approx(scores[0].item(), abs=1e-4)
    torch.testing.assert_close(torch.cat([reward(images[i:i + 1], prompts[i:i + 1]).scores for i in range(3)]), scores)


def test_reward_is_a_float_vector_on_the_images_device_without_gradients_unless_asked(checkpoint_file, vocabulary,
                                                                                       reward, images):
    scores = reward(images, ["a"] * 3).scores
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device == images.device
    assert not scores.requires_grad and not any(p.requires_grad for p in reward.model.parameters())
    with_grad = ImageReward(weights=str(checkpoint_file), tokenizer=str(vocabulary), architecture="tiny", grad=True)
    images = images.clone().requires_grad_(True)
    with_grad(images, ["a"] * 3).scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_tensor_preprocessing_matches_the_original_pil_bicubic_pipeline():
    """The original: Resize(224, BICUBIC) of the shortest side, CenterCrop(224), ToTensor, Normalize(CLIP)."""
    from torchvision import transforms

    original = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    ys, xs = torch.meshgrid(torch.linspace(0, 3, 256), torch.linspace(0, 4, 320), indexing="ij")
    picture = torch.stack([torch.sin(xs) * 0.5 + 0.5, torch.cos(ys) * 0.5 + 0.5, (xs + ys) / 7])
    pil = Image.fromarray((picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = original(pil)[None]
    ours = ImageReward().preprocessor.preprocess(torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255)
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    # PIL resamples a uint8 image and rounds; torch a float tensor: within 1% of the range on average.
    assert (ours - expected).abs().mean() < 0.01 * (expected.max() - expected.min())


def test_prompts_are_padded_and_truncated_to_35_tokens_with_blips_extra_tokens(reward):
    reward._load_tokenizer()
    tokenizer = reward.tokenizer
    vocab_size = TINY_TEXT["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [vocab_size - 2, vocab_size - 1]
    tokens = tokenizer(["A Red circle", "red " * 50], padding="max_length", truncation=True, max_length=35)
    short, long = tokens["input_ids"]
    assert len(short) == len(long) == 35
    cls, sep, pad = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]"])
    assert short[:5] == [cls, *tokenizer.convert_tokens_to_ids(["a", "red", "circle"]), sep]  # lower-cased
    assert short[5:] == [pad] * 30 and tokens["attention_mask"][0] == [1] * 5 + [0] * 30
    assert long[0] == cls and long[-1] == sep and tokens["attention_mask"][1] == [1] * 35


def test_missing_or_broken_weights_and_tokenizer_fail_at_start_up_in_one_line(monkeypatch, tmp_path, vocabulary,
                                                                               checkpoint_file):
    pointer = tmp_path / "pointer.pt"  # what a clone without git-lfs leaves in place of the weights
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1786880927\n")
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in original_tiny_checkpoint().items() if k != "mlp.layers.7.bias"}, partial)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty cache
    for reward, message in [
        (ImageReward(tokenizer=str(vocabulary), architecture="tiny"),
         r"ImageReward.pt \(THUDM/ImageReward\) are not in the Hugging Face cache.*hf download THUDM/ImageReward"),
        (ImageReward(weights="/no/such/ImageReward.pt"), "no such file; download https://huggingface.co/THUDM"),
        (ImageReward(weights=str(pointer), tokenizer=str(vocabulary), architecture="tiny"),
         "not a readable PyTorch state dict"),
        (ImageReward(weights=str(partial), tokenizer=str(vocabulary), architecture="tiny"),
         r"1 tensors missing, 0 of other shapes, e.g. head.layers.7.bias"),
        (ImageReward(weights=str(checkpoint_file)), r"architecture=imagereward \(524 tensors missing, 87 of other shapes"),
        (ImageReward(weights="random", tokenizer="rlfuse-tests/no-such-tokenizer"), "reward.fn.tokenizer="),
        (ImageReward(weights="random", tokenizer="/no/such/folder"), "no such folder"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            reward.check_ready()
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="architecture='huge'"):
        ImageReward(architecture="huge")


def test_missing_weights_stop_the_run_in_its_preflight_with_one_line(monkeypatch, tmp_path, vocabulary):
    """The trainer's checks before any folder or model (a UserError is one line and exit code 2)."""
    from rlfuse.cli import check_overrides
    from rlfuse.config import preflight
    from rlfuse.errors import UserError

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    cfg = check_overrides("train", ["model=tiny", "reward=imagereward", "prompts=simple_animals",
                                    f"reward.fn.tokenizer={vocabulary}", "reward.fn.architecture=tiny"])
    with pytest.raises(UserError, match="reward.fn.weights: the weights ImageReward.pt") as error:
        preflight(cfg)
    assert "\n" not in str(error.value)


def test_trains_one_epoch_on_the_tiny_model(tmp_path, checkpoint_file, vocabulary):
    run_dir = train(tmp_path, *FAST, "reward=imagereward", f"reward.fn.weights={checkpoint_file}",
                    f"reward.fn.tokenizer={vocabulary}", "reward.fn.architecture=tiny", "epochs=1",
                    "sample.batches_per_epoch=1", "sample.num_steps=3", "log.images_every=0")
    row = metrics(run_dir)[0]
    assert math.isfinite(row["reward_mean"]) and math.isfinite(row["loss"]) and row["reward_std"] > 0
