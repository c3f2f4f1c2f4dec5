"""PickScore (Kirstain et al. 2023, arXiv 2305.01569), a human-preference reward for text-to-image models.

A CLIP ViT-H/14 (LAION-2B) fine-tuned on the Pick-a-Pic preference pairs. The score of an image for
its prompt is logit_scale.exp() * cosine(image embedding, text embedding), both L2-normalised (the
model card of yuvalkirstain/PickScore_v1, which loads the model with transformers' AutoModel, a
CLIPModel, and the processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K with AutoProcessor). CLIP caps
logit_scale.exp() at 100 in training, so raw scores are tens; Flow-GRPO, which trains SD3.5-M on PickScore,
divides them by 26 to bring them near [0, 1] (yifan123/flow_grpo, flow_grpo/pickscore_scorer.py, PickScoreScorer:
`scores = logit_scale * (text_embs @ image_embs.T)`, `.diag()`, then `scores/26`; as in the
forks ltt0716/flow_grpo_official and zqqqqz2000/flow_grpo). There the images go through the processor as PIL
images; here the processor's steps are redone on tensors so that gradients can flow (`preprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlfuse.rewards.base import RewardOutput

MODEL, PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Flow-GRPO's normalisation (flow_grpo/pickscore_scorer.py: `scores = scores/26`, "norm to 0-1").
SCALE = 1 / 26
# Prompts are truncated to CLIP's 77 positions (the model card and flow_grpo: truncation=True, max_length=77).
MAX_TOKENS = 77
# Per config key: the files that part needs (one name of each tuple) and what writes a folder of it.
# A model holds config.json and the weights (save_pretrained writes model.safetensors; older hub repos
# hold pytorch_model.bin). A processor holds the image settings (preprocessor_config.json on the hub;
# transformers 5's CLIPProcessor.save_pretrained folds them into processor_config.json) and the tokenizer.
PARTS = {
    "reward.fn.model": ((("config.json",), ("model.safetensors", "pytorch_model.bin")), "CLIPModel.save_pretrained"),
    "reward.fn.processor": ((("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")),
                            "CLIPProcessor.save_pretrained"),
}


@dataclass(frozen=True)
class ImageSettings:
    """A CLIP image processor's steps: resize the shortest side to `shortest_edge` (bicubic), crop the
    centre to `crop` (height, width), normalise with `mean` and `std` per channel."""

    shortest_edge: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, image_processor, key: str) -> ImageSettings:
        """The settings of a transformers CLIPImageProcessor; ValueError (one line) for other resizes."""
        size, crop = image_processor.size, image_processor.crop_size  # dicts (transformers 4) or SizeDicts (5)
        edge, height, width = size.get("shortest_edge"), crop.get("height"), crop.get("width")
        if not edge or not height or not width or edge < max(height, width):
            raise ValueError(f"{key}: the image processor resizes to {size} and crops to {crop}; PickScore needs "
                             f"CLIP's shortest-edge resize to at least the crop size (as the laion processor does)")
        return cls(int(edge), (int(height), int(width)), tuple(image_processor.image_mean),
                   tuple(image_processor.image_std))


def preprocess(images: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, crop height, crop width) normalised, as tensor operations.

    The CLIP image processor's PIL pipeline (transformers' PilBackend: resize, center_crop, rescale,
    normalize): the shortest side becomes shortest_edge and the other int(shortest_edge * long / short)
    (get_resize_output_image_size truncates), bicubic with antialiasing like PIL's; the crop starts at
    (size - crop) // 2; PIL's uint8 output saturates, hence the clamp.
    """
    height, width = images.shape[-2:]
    edge = settings.shortest_edge
    if height <= width:
        size = (edge, int(edge * width / height))
    else:
        size = (int(edge * height / width), edge)
    images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    (crop_height, crop_width) = settings.crop
    top, left = (size[0] - crop_height) // 2, (size[1] - crop_width) // 2
    images = images[..., top:top + crop_height, left:left + crop_width].clamp(0, 1)
    mean = torch.tensor(settings.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def is_folder_name(name: str) -> bool:
    """A local folder (an existing one, or a name that reads as a path) rather than a hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()


def download_hint(name: str, key: str) -> str:
    """How to get `name` (key reward.fn.model or reward.fn.processor): for a hub id, the command to run on
    a connected machine (huggingface_hub 1.0 renamed huggingface-cli to hf); for a folder, what writes one."""
    writer = PARTS[key][1]
    if is_folder_name(name):
        return f"give a folder {writer} wrote"
    include = " --include '*.json' '*.txt'" if key == "reward.fn.processor" else ""  # not the open_clip weights too
    return f"run `hf download {name}{include}` on a connected machine, or set {key} to a folder {writer} wrote"


def check_folder(name: str, key: str) -> None:
    """Raise ValueError (one line) unless folder `name` exists and holds the files of PARTS[key]."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{key}={name!r}: no such folder; {download_hint(name, key)}, or a hub id")
    for names in PARTS[key][0]:
        if not any((folder / file).is_file() for file in names):
            raise ValueError(f"{key}={name!r}: the folder holds no {' or '.join(names)}; {download_hint(name, key)}")


def download(repo: str, names: tuple[str, ...], key: str) -> None:
    """Download the first of `names` that `repo` has into the Hugging Face cache (ValueError, one line, if none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for file in names:
        try:
            hf_hub_download(repo, file)
            return
        except RemoteEntryNotFoundError:
            continue  # the repository may hold the file under its other name
        except OSError as error:  # network and hub errors (OSErrors all) become the one-line start-up error
            raise ValueError(f"{key}={repo!r}: could not download {file} ({type(error).__name__}); "
                             f"{download_hint(repo, key)}") from None
    raise ValueError(f"{key}={repo!r}: the repository has no {' or '.join(names)}; {download_hint(repo, key)}")


def check_hub(repo: str, key: str) -> None:
    """Make sure the Hugging Face cache holds the files of PARTS[key] of `repo`, downloading the missing
    ones now when online. Raises ValueError (one line naming what to download) when they cannot be had."""
    from huggingface_hub import constants, try_to_load_from_cache

    missing = [names for names in PARTS[key][0]
               if not any(isinstance(try_to_load_from_cache(repo, file), str) for file in names)]
    if missing and constants.HF_HUB_OFFLINE:
        wanted = ", ".join(" or ".join(names) for names in missing)
        raise ValueError(f"{key}={repo!r}: not in the Hugging Face cache ({wanted}) and HF_HUB_OFFLINE is set; "
                         f"{download_hint(repo, key)}")
    for names in missing:
        download(repo, names, key)


def source(name: str, key: str) -> str:
    """`name` as from_pretrained takes it (a folder expanded), its files checked present (see above)."""
    if is_folder_name(name):
        check_folder(name, key)
        return str(Path(name).expanduser())
    check_hub(name, key)
    return name


def embeds(output) -> torch.Tensor:
    """get_image_features / get_text_features' answer -> (B, D) L2-normalised float embeddings (transformers
    5 returns an output whose pooler_output is the projected embedding, transformers 4 the tensor itself)."""
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(features.float(), dim=-1)


class PickScoreReward:
    """reward = scale * PickScore of each image for its prompt: scale * logit_scale.exp() * cosine.

    Args:
        model: the CLIPModel: a hub id (yuvalkirstain/PickScore_v1) or a folder CLIPModel.save_pretrained wrote.
        processor: its processor (tokenizer and image settings): a hub id or a folder
            CLIPProcessor.save_pretrained wrote.
        scale: multiplies the score; 1/26 (Flow-GRPO's) brings it near [0, 1], 1.0 gives the raw PickScore.
        grad: keep gradients through the reward (for reward backpropagation); off by default.
    """

    def __init__(self, model: str = MODEL, processor: str = PROCESSOR, scale: float = SCALE, grad: bool = False):
        self.model_name, self.processor_name, self.scale, self.grad = model, processor, scale, grad
        self.model = self.tokenizer = self.settings = None

    def _sources(self) -> tuple[str, str]:
        """The model and processor as from_pretrained takes them, their files checked present."""
        return source(self.model_name, "reward.fn.model"), source(self.processor_name, "reward.fn.processor")

    def check_ready(self) -> None:
        """Before the run: the model's files and a whole processor are at hand (ValueError, one line, if not).
        Reads the configs and the tokenizer, not the weights."""
        from transformers import AutoConfig

        model, processor = self._sources()
        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as error:
            raise ValueError(f"reward.fn.model={self.model_name!r}: cannot read its config.json "
                             f"({type(error).__name__}); {download_hint(self.model_name, 'reward.fn.model')}") from None
        if config.model_type != "clip":
            raise ValueError(f"reward.fn.model={self.model_name!r}: a {config.model_type!r} model, not a CLIP model")
        self._load_processor(processor)
        self._check_match(config)

    def _load_processor(self, processor: str) -> None:
        from transformers import AutoProcessor

        key = "reward.fn.processor"
        try:
            loaded = AutoProcessor.from_pretrained(processor)
        except (OSError, ValueError) as error:
            raise ValueError(f"{key}={self.processor_name!r}: cannot load the processor ({type(error).__name__}); "
                             f"{download_hint(self.processor_name, key)}") from None
        if not hasattr(loaded, "tokenizer") or not hasattr(loaded, "image_processor"):
            raise ValueError(f"{key}={self.processor_name!r}: a {type(loaded).__name__}, not a CLIP processor "
                             f"(a tokenizer and an image processor)")
        self.tokenizer, self.settings = loaded.tokenizer, ImageSettings.of(loaded.image_processor, key)

    def _check_match(self, config) -> None:
        """The tokenizer fills the text encoder's vocabulary and the crop is the vision encoder's input size.
        (Offline, an uncached tokenizer may load nearly empty without an error: its size tells.)"""
        key = "reward.fn.processor"
        vocab_size, image_size = config.text_config.vocab_size, config.vision_config.image_size
        if len(self.tokenizer) != vocab_size:
            raise ValueError(f"{key}={self.processor_name!r}: the tokenizer has {len(self.tokenizer)} tokens, the text "
                             f"encoder embeds {vocab_size} (a tokenizer loaded from an incomplete download is nearly "
                             f"empty); {download_hint(self.processor_name, key)}")
        if self.settings.crop != (image_size, image_size):
            raise ValueError(f"{key}={self.processor_name!r}: crops images to {self.settings.crop}, the model takes "
                             f"{image_size} px")

    def _load(self, device: torch.device) -> None:
        from transformers import AutoModel
        from transformers.utils import logging

        model, processor = self._sources()
        if self.tokenizer is None:
            self._load_processor(processor)
        shown = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the training log
        try:
            self.model = AutoModel.from_pretrained(model).eval().requires_grad_(False).to(device)
        finally:
            if shown:
                logging.enable_progress_bar()
        self._check_match(self.model.config)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """images (B, 3, H, W) in [0, 1], B prompts -> scores (B,) float32 on the CPU."""
        if self.model is None:
            self._load(images.device)
        device = self.model.logit_scale.device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.set_grad_enabled(self.grad):
            pixel_values = preprocess(images.to(device), self.settings)                           # (B, 3, S, S)
            image = embeds(self.model.get_image_features(pixel_values=pixel_values))              # (B, D)
            text = embeds(self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                       attention_mask=tokens["attention_mask"].to(device)))  # (B, D)
            scores = self.scale * self.model.logit_scale.exp().float() * (image * text).sum(dim=-1)
            return RewardOutput(scores.float().cpu())                                             # (B,)
