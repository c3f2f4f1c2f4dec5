"""What every diffusers-pipeline family shares: where weights come from, LoRA folders fused into a
pipeline, and a pipeline folder written with a fine-tuned network."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from rlfuse.errors import UserError

# The file export_lora writes (and pipeline.load_lora_weights reads) in a LoRA folder.
LORA_FILE = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------- start-up checks (no weights read)


def lora_folders(lora_weights: str | list[str] | None) -> list[str]:
    """model.lora_weights as a list of folders: null -> [], one folder -> [it]."""
    if lora_weights is None:
        return []
    return [lora_weights] if isinstance(lora_weights, str) else [str(folder) for folder in lora_weights]


def check_source(pretrained: str | None, revision: str | None = None,
                 lora_weights: str | list[str] | None = None) -> None:
    """Fail fast, before any run folder exists, when the weights cannot be had.

    A local folder must hold model_index.json; a hub id must be cached when offline
    (HF_HUB_OFFLINE=1), otherwise from_pretrained will download it. Each LoRA folder of
    lora_weights must hold the diffusers-format file that export_lora writes.
    """
    for folder in lora_folders(lora_weights):
        if not (Path(folder).expanduser() / LORA_FILE).is_file():
            raise UserError(f"model.lora_weights={folder!r}: no {LORA_FILE} there; give a LoRA folder such as "
                            f"<run>/checkpoints/epoch_NNNNNN/lora")
    if pretrained is None:
        return
    pretrained = os.path.expanduser(pretrained)
    if os.path.isdir(pretrained):
        if not os.path.isfile(os.path.join(pretrained, "model_index.json")):
            raise UserError(f"model.pretrained={pretrained!r}: the folder holds no model_index.json; point it at a "
                            f"diffusers pipeline folder (pipeline.save_pretrained writes one)")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    looks_like_path = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if looks_like_path:
        raise UserError(f"model.pretrained={pretrained!r}: no such folder; give an existing pipeline folder or a hub id")
    if constants.HF_HUB_OFFLINE and not isinstance(
        try_to_load_from_cache(pretrained, "model_index.json", revision=revision), str
    ):
        raise UserError(f"model.pretrained={pretrained!r}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                        f"run `hf download {pretrained}` on a connected machine, or set "
                        f"model.pretrained to a local pipeline folder")


def load_pipeline(pipeline_class, pretrained: str, revision: str | None, variant: str | None, **kwargs):
    """pipeline_class.from_pretrained(pretrained) (a hub id or a folder, `~` expanded); UserError (one line,
    what to do) when the weights are neither local nor cached."""
    pretrained = os.path.expanduser(pretrained)
    try:
        return pipeline_class.from_pretrained(pretrained, revision=revision, variant=variant, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"model.pretrained={pretrained!r}: cannot load a {pipeline_class.__name__} from it; "
                        f"download it with `hf download {pretrained}` or give a local pipeline "
                        f"folder [{type(error).__name__}]") from None


def fuse_lora_weights(family, lora_weights: str | list[str] | None):
    """Fuse each LoRA folder of model.lora_weights into the family's network, in order; returns the family."""
    for folder in lora_folders(lora_weights):
        family.fuse_lora(Path(folder).expanduser())
    return family


def fuse_lora_folder(pipeline, folder: Path) -> None:
    """Add a diffusers-format LoRA folder into the pipeline's network weights for good.

    The adapter is unloaded after fusing, so the network is a plain one again: new adapters and the
    reference policy then start from the fused model, the one that sampled the next round.
    """
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "no LoRA keys for the text encoder": rlfuse trains the denoiser only
    try:
        pipeline.load_lora_weights(str(folder), adapter_name="fused")
        pipeline.fuse_lora(adapter_names=["fused"])
        pipeline.unload_lora_weights()
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        raise UserError(f"model.lora_weights={str(folder)!r}: cannot fuse it into this model (was it trained on "
                        f"another one?) [{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}]") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def save_pipeline_with(pipeline, part: str, network: torch.nn.Module, folder: Path) -> None:
    """Write the pipeline with `network` in place of its `part` (unet, transformer): from_pretrained(folder)
    loads it. Every module is written in fp32, whatever the training precision: frozen parts cast to
    fp16 for speed would otherwise load back beside an fp32 network and fail on the first matrix product."""
    original = getattr(pipeline, part)
    setattr(pipeline, part, network)
    modules = {name: module for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
    dtypes = {name: module.dtype for name, module in modules.items()}
    try:
        for name, dtype in dtypes.items():
            if dtype != torch.float32:
                modules[name].to(torch.float32)
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        for name, dtype in dtypes.items():
            if dtype != torch.float32:
                modules[name].to(dtype)
        setattr(pipeline, part, original)


def decode_shifted(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents of a VAE with a scaling and a shift (SD3, FLUX) -> (B, 3, H, W) images in [0, 1]."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, C, h, w) latents as the family's sampler sees them: the mean
    of the VAE's posterior, shifted (SD3, FLUX; SD has no shift) and scaled, the inverse of decoding.
    Every family keeps its diffusers pipeline's VAE as pipeline.vae."""
    posterior = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((posterior.mean.float() - shift) * vae.config.scaling_factor)


def export_transformer_lora(pipeline_class, network: torch.nn.Module, folder: Path) -> None:
    """A transformer's LoRA in the diffusers format, its alpha in the adapter metadata (without it the
    loader assumes alpha = rank): pipeline_class.load_lora_weights(folder) gives the trained model exactly."""
    from peft.utils import get_peft_model_state_dict

    pipeline_class.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(network), safe_serialization=True,
        transformer_lora_adapter_metadata=network.peft_config["default"].to_dict())


class PromptCache:
    """The text conditioning of recently seen prompts, kept on the CPU; the least recently used is
    dropped past `size` prompts (0: no cache, every batch encodes its distinct prompts).

    Text encoders are frozen in training, so a prompt's conditioning never changes: with a cache,
    each prompt of a run goes through the text encoders (T5-XXL is the largest part) once. A prompt
    is encoded alone, so its conditioning does not depend on which prompts it came with (a resumed
    run, whose cache starts empty, sees the same numbers).
    """

    def __init__(self, size: int):
        from collections import OrderedDict

        if size < 0:
            raise UserError(f"model.prompt_cache={size}: use 0 (no cache) or a number of prompts")
        self.size, self.rows = size, OrderedDict()

    def encode(self, prompts: list[str], device: torch.device,
               encode: Callable[[list[str], torch.device], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{name: (B, ...)} for the B prompts; encode(prompts, device) -> {name: (n, ...)} encodes new ones."""
        if self.size == 0:
            unique = sorted(set(prompts))
            encoded = encode(unique, device)
            rows = [unique.index(p) for p in prompts]
            return {name: value[rows] for name, value in encoded.items()}
        batch = {}
        for prompt in dict.fromkeys(prompts):
            if prompt in self.rows:
                self.rows.move_to_end(prompt)
            else:
                self.rows[prompt] = {name: value[0].cpu() for name, value in encode([prompt], device).items()}
            batch[prompt] = self.rows[prompt]
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        names = batch[prompts[0]].keys()
        return {name: torch.stack([batch[p][name] for p in prompts]).to(device) for name in names}
