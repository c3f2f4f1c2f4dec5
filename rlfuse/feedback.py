"""Human feedback datasets: their format, and the start-up checks that a training run can replay one
(feedback=human).

A feedback dataset (written by `python -m rlfuse.sample`, labelled with `python -m rlfuse.annotate`):

    manifest.json               images and their sha256 (rlfuse/annotate/dataset.py), the sampling
                                settings ("model", "sampler") and "files": {"trajectories.safetensors": sha256}
    images/GGGG-k.png           image k of group (prompt) G
    trajectories.safetensors    row n = G * K + k, in manifest order:
        latents    (N, T+1, C, h, w) float32   x_T ... x_0 of each chain, stored once (the step
                                               t -> t-1 is latents[:, i] -> latents[:, i + 1])
        log_probs  (N, T) float32              log p(x_{t-1} | x_t) at sampling time (the DDPO/D3PO
                                               convention: averaged over latent dimensions)
        timesteps  (T,) int64                  the scheduler timestep of each step
    labels.sqlite               the labels (rlfuse/annotate/store.py)

Text embeddings are not stored: the training run recomputes them from the prompts with the same
(frozen) text encoder, which the settings check guarantees; for Stable Diffusion that saves
77 x 768 floats per image.

Training replays the labelled pairs (rlfuse/sources/replay.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rlfuse.errors import UserError

TRAJECTORIES = "trajectories.safetensors"
RESAMPLE = "re-run `python -m rlfuse.sample`"

# The sampling settings a training run must share with its dataset: (manifest section, key) -> run config key.
MATCHED = {
    ("model", "pretrained"): "model.pretrained",
    ("model", "revision"): "model.revision",
    ("model", "tiny_seed"): "model.tiny_seed",
    ("model", "lora_weights"): "model.lora_weights",
    ("sampler", "resolution"): "model.resolution",
    ("sampler", "num_steps"): "sample.num_steps",
    ("sampler", "guidance_scale"): "sample.guidance_scale",
    ("sampler", "eta"): "sample.eta",
    ("model", "family"): "model.family",
    ("sampler", "sde_type"): "sample.sde_type",
}
# Datasets sampled before the manifest recorded these keys were all DDIM (Stable Diffusion) datasets.
RECORDED_BEFORE = {("model", "family"): "sd", ("sampler", "sde_type"): None}


def sampling_settings(name: str, pretrained: str | None, revision: str | None, variant: str | None, tiny_seed: int,
                      lora_weights: str | list[str] | None, resolution: int, num_steps: int, guidance_scale: float,
                      eta: float, family: str = "sd", sde_type: str | None = None) -> dict[str, dict]:
    """The manifest's "model" and "sampler" sections: what made the chains. Local folders are made
    absolute (so a dataset names the model it came from wherever it is read); tiny_seed counts only
    for the tiny model (pretrained null)."""
    from rlfuse.families.common import lora_folders

    def absolute(folder: str) -> str:
        return str(Path(folder).expanduser().resolve())

    local = pretrained is not None and Path(pretrained).expanduser().is_dir()
    return {
        "model": {"name": name, "pretrained": absolute(pretrained) if local else pretrained, "revision": revision,
                  "variant": variant, "tiny_seed": int(tiny_seed) if pretrained is None else None,
                  "lora_weights": [absolute(folder) for folder in lora_folders(lora_weights)], "family": family},
        "sampler": {"scheduler": "DDIM" if family == "sd" else "flow", "sde_type": sde_type,
                    "num_steps": int(num_steps), "guidance_scale": float(guidance_scale), "eta": float(eta),
                    "resolution": int(resolution)},
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_trajectories(path: Path, latents: torch.Tensor, log_probs: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Write the chains: latents (N, T+1, C, h, w), log_probs (N, T), timesteps (T,) (see the module docstring)."""
    from safetensors.torch import save_file

    save_file({"latents": latents.float().contiguous().cpu(), "log_probs": log_probs.float().contiguous().cpu(),
               "timesteps": timesteps.long().contiguous().cpu()}, str(path), metadata={"format": "rlfuse-trajectories"})


def load_trajectories(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- start-up checks


def check_dataset(path: str, settings: dict[str, dict]) -> int:
    """Everything feedback=human needs of the dataset, before any run folder: it is well formed (images and their sha256), its trajectories file is there and unchanged,
    it was sampled with this run's model and sampler (`settings`, from sampling_settings), and its
    labels state at least one preference. Raises UserError (one line); returns the number of pairs."""
    from rlfuse.annotate.dataset import load_dataset
    from rlfuse.annotate.store import preference_pairs

    where = f"feedback.path={path}"
    dataset = load_dataset(Path(path).expanduser())
    manifest = json.loads((dataset.root / "manifest.json").read_text(encoding="utf-8"))
    files = manifest.get("files")
    listed = files.get(TRAJECTORIES) if isinstance(files, dict) else None
    if not isinstance(listed, str):
        raise UserError(f"{where}: the manifest lists no {TRAJECTORIES} (training replays the sampled chains); "
                        f"{RESAMPLE}")
    trajectories = dataset.root / TRAJECTORIES
    if not trajectories.is_file():
        raise UserError(f"{where}: {TRAJECTORIES} is missing (training replays the sampled chains); restore it "
                        f"or {RESAMPLE}")
    digest = sha256_file(trajectories)
    if digest != listed:
        raise UserError(f"{where}: {TRAJECTORIES} has sha256 {digest[:12]}..., the manifest lists {listed[:12]}...; "
                        f"the file changed since sampling: restore it or {RESAMPLE}")
    for (section, key), run_key in MATCHED.items():
        recorded = dict(manifest.get(section) or {}) if isinstance(manifest.get(section), dict) else None
        if recorded is not None and (section, key) in RECORDED_BEFORE:
            recorded.setdefault(key, RECORDED_BEFORE[(section, key)])
        if not isinstance(recorded, dict) or key not in recorded:
            raise UserError(f"{where}: the manifest does not record {section}.{key} (how the chains were sampled); "
                            f"{RESAMPLE}")
        if recorded[key] != settings[section][key]:
            raise UserError(f"{where}: the dataset was sampled with {run_key}={recorded[key]!r}, this run has "
                            f"{run_key}={settings[section][key]!r}; train with the dataset's settings, or sample a "
                            f"new dataset with this model")
    _check_shapes(where, trajectories, len(dataset.groups) * dataset.images_per_prompt, settings["sampler"]["num_steps"])
    pairs = preference_pairs(dataset.root)  # no labels.sqlite: "annotate first: python -m rlfuse.annotate <path>"
    if not pairs:
        raise UserError(f"{where}: the labels state no preference (all skipped, or opposite votes cancel); "
                        f"annotate first: python -m rlfuse.annotate {path}")
    return len(pairs)


def _check_shapes(where: str, path: Path, rows: int, num_steps: int) -> None:
    from safetensors import SafetensorError, safe_open

    expected = {"latents": (rows, num_steps + 1), "log_probs": (rows, num_steps), "timesteps": (num_steps,)}
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{where}: {TRAJECTORIES} is unreadable ({error}); {RESAMPLE}") from None
    for name, leading in expected.items():
        if shapes.get(name, ())[:len(leading)] != leading:
            raise UserError(f"{where}: {TRAJECTORIES} holds {name} of shape {shapes.get(name)}, expected {leading} "
                            f"first; {RESAMPLE}")
