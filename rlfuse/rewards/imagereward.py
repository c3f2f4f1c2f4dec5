"""ImageReward-v1.0 (Xu et al., NeurIPS 2023), a human-preference reward for text-to-image models.

BLIP's ViT-L/16 encodes the image at 224 px; a BERT-base text encoder reads the prompt with
cross-attention to the image tokens in every layer; an MLP 768-1024-128-64-16-1 (linear layers
only, the aesthetic predictor's head) maps the text encoder's [CLS] output to a raw score, which is
standardised with the mean and std the authors measured. Trained on 137k expert comparisons
(ImageRewardDB); a score of 0 is an average image for its prompt.

The image-reward package does not install beside transformers 5 (it needs timm 0.6 and removed
transformers internals), so rlfuse rebuilds the model on transformers' BlipVisionModel and
BlipTextModel and maps the published checkpoint's keys onto them (`convert_state_dict`).
tests/rewards/test_imagereward_equivalence.py (opt-in) checks the scores against the original code.
Facts below cite THUDM/ImageReward, ImageReward/ImageReward.py and ImageReward/models/BLIP/ (the
image-reward 1.5 package), "the original" for short.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from rlfuse.rewards.aesthetic import AestheticMLP
from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.clip import ClipEmbedder
from rlfuse.rewards.weights import ensure_weights

HUB_REPO, WEIGHTS_FILE = "THUDM/ImageReward", "ImageReward.pt"
WEIGHTS_URL = f"https://huggingface.co/{HUB_REPO}/resolve/main/{WEIGHTS_FILE}"
# The raw score's mean and std (ImageReward.__init__ in the original): scores are (raw - mean) / std.
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
# Prompts are padded or truncated to 35 tokens, [CLS] and [SEP] included (ImageReward.score).
MAX_TOKENS = 35
# OpenAI CLIP's normalisation, which the original applies after its 224 px bicubic resize and crop.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP adds [DEC] (as the bos token) and [ENC] to bert-base-uncased's 30522 tokens (blip.init_tokenizer),
# hence the text encoder's 30524 embeddings.
BLIP_TOKENS = ("[DEC]", "[ENC]")

# Model sizes. "imagereward" is the published model: BLIP's ViT-L/16 (blip.create_vit 'large') and
# BLIP's med_config.json BERT-base (12 layers, 12 heads, 3072 wide, 512 positions, vocabulary 30524).
# "tiny" is for tests: random weights and a test vocabulary (`write_test_vocabulary`).
ARCHITECTURES = {
    "imagereward": {
        "vision": dict(image_size=224, patch_size=16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16),
        "text": dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=512, bos_token_id=30522, sep_token_id=102),
    },
    "tiny": {
        "vision": dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4),
        "text": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, bos_token_id=126, sep_token_id=3),
    },
}

# Original checkpoint key -> rlfuse key (first matching rule). The ViT is timm's layout (blip/vit.py);
# the text encoder is BLIP's med.py BertModel, whose names BlipTextModel keeps.
KEY_RULES = [
    (r"blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"blip\.text_encoder\.", "text."),
    (r"mlp\.layers\.", "head.layers."),
]
# In the checkpoint but not used for scoring: BLIP's contrastive projections and a position-index buffer.
UNUSED_KEYS = r"blip\.(vision_proj|text_proj)\.|blip\.text_encoder\.embeddings\.position_ids$"


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the original ImageReward module's keys -> one for `ImageRewardModel`.
    Raises ValueError on a key that no rule maps (a different checkpoint)."""
    converted = {}
    for key, tensor in original.items():
        if re.match(UNUSED_KEYS, key):
            continue
        for pattern, replacement in KEY_RULES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key, count=1)] = tensor
                break
        else:
            raise ValueError(f"unexpected key {key!r}: not an ImageReward-v1.0 checkpoint")
    return converted


class ImageRewardModel(nn.Module):
    """Images and tokenised prompts -> raw ImageReward scores (before standardisation)."""

    def __init__(self, architecture: str = "imagereward"):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        sizes = ARCHITECTURES[architecture]
        # timm's ViT as BLIP builds it: LayerNorm eps 1e-6, exact GELU, biased fused qkv, a final norm.
        self.vision = BlipVisionModel(BlipVisionConfig(**sizes["vision"], layer_norm_eps=1e-6, hidden_act="gelu"))
        # BERT with cross-attention to the image tokens in every layer (BlipTextModel builds those layers
        # when is_decoder is set; forward(is_decoder=False) keeps the self-attention bidirectional, as in
        # the original). No token-type embeddings and no pooler, as in BLIP's med.py.
        text_config = BlipTextConfig(**sizes["text"], encoder_hidden_size=sizes["vision"]["hidden_size"],
                                     is_decoder=True, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
                                     eos_token_id=None, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticMLP(sizes["text"]["hidden_size"])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) normalised; input_ids, attention_mask (B, L) -> (B,) raw scores."""
        image_states = self.vision(pixel_values=pixel_values).last_hidden_state         # (B, 1 + patches, Dv)
        # The original passes an all-ones image mask, which masks nothing: omitted.
        text_states = self.text(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_states, is_decoder=False).last_hidden_state  # (B, L, Dt)
        # The [CLS] position (index 0) feeds the head (ImageReward.score; the authors confirm index 0 in
        # THUDM/ImageReward issue #52, where their training code had read the last position by mistake).
        return self.head(text_states[:, 0].float())


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, memory-mapped when the file allows it (tensors are read on use)."""
    return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)


def check_checkpoint(path: Path, architecture: str, key: str) -> None:
    """Raise ValueError (one line) unless `path` holds every tensor of `architecture` under the original
    names, at the right shapes. Reads names and shapes only, so a truncated download or a git-lfs
    pointer file is refused before the run rather than at its first reward."""
    hint = f"download {WEIGHTS_URL} again"
    try:
        original = read_checkpoint(path)
        converted = convert_state_dict(original)
    except ValueError as error:
        raise ValueError(f"{key}={str(path)!r}: {error}; {hint}") from None
    except Exception as error:  # not a torch file: unpickling, zip and format errors alike
        raise ValueError(f"{key}={str(path)!r}: not a readable PyTorch state dict ({type(error).__name__}); {hint}") from None
    with torch.device("meta"):  # shapes without allocating the model
        expected = ImageRewardModel(architecture).state_dict()
    missing = [name for name in expected if name not in converted]
    wrong = [name for name in expected if name in converted and converted[name].shape != expected[name].shape]
    if missing or wrong:
        example = (missing + wrong)[0]
        raise ValueError(f"{key}={str(path)!r}: not an ImageReward checkpoint of architecture={architecture} "
                         f"({len(missing)} tensors missing, {len(wrong)} of other shapes, e.g. {example}); {hint}")


def write_test_vocabulary(folder: str | Path, size: int) -> Path:
    """Write a made-up BERT vocab.txt of `size` word pieces into `folder` (for tests and benchmarks, which
    cannot download bert-base-uncased): the special tokens, letters, digits, punctuation, a few words,
    then filler. Any lower-case ASCII prompt tokenises into it. Returns the folder."""
    letters, digits = "abcdefghijklmnopqrstuvwxyz", "0123456789"
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *digits, *".,;:!?'\"-()&/",
              *(f"##{c}" for c in letters + digits)]
    pieces += ["the", "of", "and", "in", "on", "with", "photo", "painting", "red", "blue", "green", "cat",
               "dog", "circle", "square", "triangle", "left", "right", "above", "below", "two", "three"]
    if size < len(pieces):
        raise ValueError(f"a test vocabulary needs at least {len(pieces)} word pieces, got {size}")
    pieces += [f"[unused{i}]" for i in range(size - len(pieces))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return folder


def load_tokenizer(name_or_folder: str, vocab_size: int, key: str):
    """BLIP's BERT tokenizer: bert-base-uncased (a hub id, from the cache when offline, or a local folder)
    plus [DEC] and [ENC]. Raises ValueError (one line) unless it has exactly `vocab_size` tokens: offline,
    transformers 5 returns an almost empty tokenizer for an uncached hub id instead of failing."""
    from transformers import BertTokenizer

    folder = Path(name_or_folder).expanduser()
    if name_or_folder.startswith((".", "/", "~")) and not folder.is_dir():
        raise ValueError(f"{key}={name_or_folder!r}: no such folder")
    hint = (f"run `hf download bert-base-uncased` on a connected machine, or set {key} to a folder holding "
            f"bert-base-uncased's vocab.txt")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder) if folder.is_dir() else name_or_folder)
    except OSError as error:
        raise ValueError(f"{key}={name_or_folder!r}: cannot load the tokenizer ({type(error).__name__}); {hint}") from None
    tokenizer.add_special_tokens({"bos_token": BLIP_TOKENS[0], "additional_special_tokens": [BLIP_TOKENS[1]]})
    if len(tokenizer) != vocab_size:
        raise ValueError(f"{key}={name_or_folder!r}: the tokenizer has {len(tokenizer)} tokens with [DEC] and [ENC], "
                         f"the text encoder embeds {vocab_size} (offline and uncached it comes back nearly empty); {hint}")
    return tokenizer


def weights_file(weights: str | None, key: str) -> Path | None:
    """The checkpoint: `weights` if a path (it must exist), None for 'random', else THUDM/ImageReward's
    ImageReward.pt from the Hugging Face cache, downloaded now unless HF_HUB_OFFLINE is set. Raises
    ValueError (one line naming the file and where to get it) when it cannot be had."""
    if weights == "random":
        return None
    if weights is not None:
        return ensure_weights(weights, WEIGHTS_URL, WEIGHTS_FILE, key)
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(HUB_REPO, WEIGHTS_FILE)
    if isinstance(cached, str):
        return Path(cached)
    hint = (f"run `hf download {HUB_REPO} {WEIGHTS_FILE}` on a connected machine, or download {WEIGHTS_URL} "
            f"and set {key}=<path>")
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{key}: the weights {WEIGHTS_FILE} ({HUB_REPO}) are not in the Hugging Face cache and "
                         f"HF_HUB_OFFLINE is set; {hint}")
    try:
        return Path(hf_hub_download(HUB_REPO, WEIGHTS_FILE))
    except Exception as error:  # network and hub errors alike become the one-line start-up error
        raise ValueError(f"{key}: could not download {WEIGHTS_FILE} ({type(error).__name__}); {hint}") from None


class ImageReward:
    """reward = ImageReward-v1.0's standardised score of each image for its prompt.

    Args:
        weights: a local ImageReward.pt (the original module's state dict); None: THUDM/ImageReward's from
            the Hugging Face cache (downloaded before the run when online); 'random': random weights
            (tests and benchmarks only).
        tokenizer: bert-base-uncased (a hub id) or a local folder with its vocab.txt.
        architecture: 'imagereward' (the published model) or 'tiny' (tests).
        grad: keep gradients through the reward (for reward backpropagation); off by default.
    """

    def __init__(self, weights: str | None = None, tokenizer: str = "bert-base-uncased",
                 architecture: str = "imagereward", grad: bool = False):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        self.weights, self.tokenizer_name, self.architecture, self.grad = weights, tokenizer, architecture, grad
        self.model: ImageRewardModel | None = None
        self.tokenizer = None
        # The CLIP tensor preprocessing (bicubic resize of the shortest side, centre crop, mean and std),
        # which is ImageReward's own: Resize(224, BICUBIC), CenterCrop(224), Normalize(CLIP mean, std).
        self.preprocessor = ClipEmbedder(model_name="", pretrained=None)
        self.preprocessor.size = ARCHITECTURES[architecture]["vision"]["image_size"]
        self.preprocessor.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.preprocessor.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def check_ready(self) -> None:
        """Before the run: the checkpoint and the tokenizer are at hand and whole (ValueError, one line, if not)."""
        path = weights_file(self.weights, "reward.fn.weights")
        if path is not None:
            check_checkpoint(path, self.architecture, "reward.fn.weights")
        self._load_tokenizer()

    def _load_tokenizer(self) -> None:
        if self.tokenizer is None:
            vocab_size = ARCHITECTURES[self.architecture]["text"]["vocab_size"]
            self.tokenizer = load_tokenizer(self.tokenizer_name, vocab_size, "reward.fn.tokenizer")

    def _load(self, device: torch.device) -> None:
        self._load_tokenizer()
        model = ImageRewardModel(self.architecture)
        path = weights_file(self.weights, "reward.fn.weights")
        if path is not None:
            model.load_state_dict(convert_state_dict(read_checkpoint(path)))  # strict: every tensor from the file
        self.model = model.eval().requires_grad_(False).to(device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """scores: (B,) float on the model's device."""
        if self.model is None:
            self._load(images.device)
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        with torch.set_grad_enabled(self.grad):
            pixel_values = self.preprocessor.preprocess(images.to(device))              # (B, 3, 224, 224)
            raw = self.model(pixel_values, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            return RewardOutput((raw - SCORE_MEAN) / SCORE_STD)                          # (B,)
