"""Aesthetic, alignment and diversity rewards on a tiny random CLIP (rlfuse-tiny-clip), checked by hand."""

import numpy as np
import pytest
import torch
from PIL import Image

from rlfuse.rewards.aesthetic import AestheticMLP, AestheticReward
from rlfuse.rewards.alignment import AlignmentReward
from rlfuse.rewards.clip import ClipEmbedder, check_clip_weights
from rlfuse.rewards.diversity import DiversityReward, group_diversity

TINY = {"clip_model": "rlfuse-tiny-clip", "clip_pretrained": None}


@pytest.fixture
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_aesthetic_head_has_the_published_parameter_names_and_is_the_affine_map_by_hand():
    head = AestheticMLP(768).eval()
    assert list(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    embedding = torch.nn.functional.normalize(torch.randn(1, 768, generator=torch.Generator().manual_seed(1)), dim=-1)
    value = embedding
    for i in (0, 2, 4, 6, 7):  # no activations; dropout is off in eval mode
        layer = head.layers[i]
        value = value @ layer.weight.T + layer.bias
    torch.testing.assert_close(head(embedding), value.squeeze(-1))


def test_aesthetic_reward_scores_normalised_clip_embeddings_with_the_head(tmp_path, images):
    torch.manual_seed(0)
    torch.save(AestheticMLP(32).state_dict(), tmp_path / "head.pth")
    reward = AestheticReward(weights=str(tmp_path / "head.pth"), **TINY)
    reward.check_ready()
    scores = reward(images, ["x"] * 4).scores
    head = AestheticMLP(32).eval()
    head.load_state_dict(torch.load(tmp_path / "head.pth"))
    embeddings = reward.embedder.images(images)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(scores, head(embeddings))
    assert scores.shape == (4,) and not scores.requires_grad


def test_alignment_is_the_cosine_of_clip_embeddings_by_hand(images):
    reward = AlignmentReward(scale=2.0, **TINY)
    prompts = ["a red circle", "a dog", "two cats", "a blue square"]
    scores = reward(images, prompts).scores
    model, tokenizer = reward.embedder.model, reward.embedder.tokenizer
    with torch.no_grad():
        image_features = model.encode_image(reward.embedder.preprocess(images))
        text_features = model.encode_text(tokenizer(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(scores, 2.0 * cosine)


def test_tensor_preprocessing_matches_open_clips_pil_transform():
    """Resize (bicubic, shortest side), centre crop and normalise as open_clip does on PIL images."""
    import open_clip

    embedder = ClipEmbedder("rlfuse-tiny-clip", None)
    embedder.images(torch.rand(1, 3, 32, 32))  # loads the model and its preprocessing settings
    _, _, transform = open_clip.create_model_and_transforms("rlfuse-tiny-clip", pretrained=None)
    # A smooth picture (real images are; on pixel noise the two resamplers differ more).
    ys, xs = torch.meshgrid(torch.linspace(0, 3, 48), torch.linspace(0, 4, 64), indexing="ij")
    image = torch.stack([torch.sin(xs) * 0.5 + 0.5, torch.cos(ys) * 0.5 + 0.5, (xs + ys) / 7])[None]
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = transform(pil)[None]
    ours = embedder.preprocess(torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255)
    assert ours.shape == expected.shape
    # PIL and torch resample slightly differently: within 1% of the normalised range on average.
    assert (ours - expected).abs().mean() < 0.01 * (expected.max() - expected.min())


def test_group_diversity_by_hand():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    scores = group_diversity(embeddings, ["a", "a", "b", "b"])
    # a: orthogonal pair, distance 1 each; b: cos 0.6, distance 0.4 each.
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.4, 0.4]))
    assert group_diversity(embeddings[:1], ["alone"]).item() == 0.0


def test_diversity_reward_is_zero_for_identical_images_and_positive_for_different_ones(images):
    reward = DiversityReward(**TINY)
    same = reward(images[:1].expand(3, -1, -1, -1), ["p"] * 3).scores
    assert torch.allclose(same, torch.zeros(3), atol=1e-5)
    assert (reward(images, ["p"] * 4).scores > 0).all()


def test_missing_clip_weights_offline_fail_with_what_to_download(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="hf download timm/vit_large_patch14_clip_224.openai"):
        check_clip_weights("ViT-L-14", "openai", "reward.fn")
    with pytest.raises(ValueError, match="no such file"):
        check_clip_weights("ViT-L-14", "/no/such/weights.bin", "reward.fn")
    with pytest.raises(ValueError, match="not an open_clip model"):
        check_clip_weights("ViT-Q-99", None, "reward.fn")


def test_missing_aesthetic_weights_offline_name_the_file_and_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RLFUSE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="sac\\+logos\\+ava1-l14-linearMSE.pth are not cached.*improved-aesthetic"):
        AestheticReward(**TINY).check_ready()
    with pytest.raises(ValueError, match="no such file"):
        AestheticReward(weights="/no/such.pth", **TINY).check_ready()
