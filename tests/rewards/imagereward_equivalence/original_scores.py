"""Score images with the ORIGINAL ImageReward code (image-reward 1.5) on random weights.

Runs in the separate environment of requirements.txt (made by test_imagereward_equivalence.py),
never in rlfuse's. Reads <work>/inputs.json (prompts, image files, pairs) and a BERT vocabulary in
<work>/bert-base-uncased/ (the original loads its tokenizer by that name; a folder of that name in
the working directory stands in for the hub). Writes into <work>:
    ImageReward.pt         the model's state dict, the published checkpoint's format (original keys)
    original.json          scores of the pairs through ImageReward.score(prompt, PIL image),
                           token ids and attention masks of the prompts
    original_pixels.pt     the preprocessed image tensors (N, 3, 224, 224)

    cd <work> && <venv>/bin/python original_scores.py
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from PIL import Image

# BLIP's med_config.json, the text encoder's configuration the original downloads next to the
# checkpoint (THUDM/ImageReward med_config.json, as in salesforce/BLIP configs/med_config.json);
# create_vit then sets encoder_width to the ViT-L width, 1024.
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}


def import_original_model():
    """The ImageReward class, without running the package's __init__ files: they also import its ReFL
    trainer (diffusers, datasets) and its CLIP, BLIP and aesthetic scorers (the `clip` module), which
    the model does not use. Empty parent packages are registered, then the model's own modules load."""
    root = Path(importlib.util.find_spec("ImageReward").origin).parent
    for name, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    from ImageReward.ImageReward import ImageReward

    return ImageReward


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights that exercise every tensor. The original's own initialisation leaves every bias
    at 0 and every LayerNorm at 1 (a wrong mapping between them would go unseen) and its MLP at std
    1/769 (every score would be the constant -mean/std): perturb the 1-d tensors, and give the MLP
    weights std 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if name.startswith("mlp.") and parameter.dim() == 2:
            parameter.copy_(noise / parameter.shape[1] ** 0.5)
        elif parameter.dim() == 1:
            parameter.add_(0.05 * noise)


def main() -> None:
    work = Path.cwd()
    inputs = json.loads((work / "inputs.json").read_text())
    (work / "med_config.json").write_text(json.dumps(MED_CONFIG, indent=2))
    ImageReward = import_original_model()

    torch.manual_seed(inputs["seed"])
    model = ImageReward(med_config=str(work / "med_config.json"), device="cpu").eval()
    randomise(model, inputs["seed"])
    torch.save(model.state_dict(), work / "ImageReward.pt")

    images = [Image.open(work / name).convert("RGB") for name in inputs["images"]]
    scores = [model.score(inputs["prompts"][p], images[i]) for i, p in inputs["pairs"]]
    tokens = model.blip.tokenizer(inputs["prompts"], padding="max_length", truncation=True, max_length=35)
    pixels = torch.stack([model.preprocess(image) for image in images])
    torch.save(pixels, work / "original_pixels.pt")
    (work / "original.json").write_text(json.dumps({
        "scores": scores, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
        "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "timm", "fairscale")},
    }))
    print(f"original ImageReward: {len(scores)} scores written to {work}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
