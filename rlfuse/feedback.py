"""Human feedback for training: the sampled denoising chains of a feedback dataset, replayed as
D3PO pairs in the order people labelled them (feedback=human).

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

Training is offline replay: each epoch takes every labelled pair (group g, winner w, loser l) from
`preference_pairs`, with repeats when several votes agree, and makes rows 2i (the winner's chain)
and 2i + 1 (the loser's) with rewards 1 and 0, so that D3PO's pair_preferences gives +1 and -1.
Both chains start from the group's shared initial noise, as D3PO's pairs do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlfuse.cli import UserError
from rlfuse.trajectories import Trajectories

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
}


def sampling_settings(name: str, pretrained: str | None, revision: str | None, variant: str | None, tiny_seed: int,
                      lora_weights: str | list[str] | None, resolution: int, num_steps: int, guidance_scale: float,
                      eta: float) -> dict[str, dict]:
    """The manifest's "model" and "sampler" sections: what made the chains. Local folders are made
    absolute (so a dataset names the model it came from wherever it is read); tiny_seed counts only
    for the tiny model (pretrained null)."""
    from rlfuse.model import lora_folders

    def absolute(folder: str) -> str:
        return str(Path(folder).expanduser().resolve())

    local = pretrained is not None and Path(pretrained).expanduser().is_dir()
    return {
        "model": {"name": name, "pretrained": absolute(pretrained) if local else pretrained, "revision": revision,
                  "variant": variant, "tiny_seed": int(tiny_seed) if pretrained is None else None,
                  "lora_weights": [absolute(folder) for folder in lora_folders(lora_weights)]},
        "sampler": {"scheduler": "DDIM", "num_steps": int(num_steps), "guidance_scale": float(guidance_scale),
                    "eta": float(eta), "resolution": int(resolution)},
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


def check_dataset(path: str, algorithm: str, settings: dict[str, dict]) -> int:
    """Everything feedback=human needs, before any run folder: the algorithm learns from pairs, the
    dataset is well formed (images and their sha256), its trajectories file is there and unchanged,
    it was sampled with this run's model and sampler (`settings`, from sampling_settings), and its
    labels state at least one preference. Raises UserError (one line); returns the number of pairs."""
    from rlfuse.annotate.dataset import load_dataset
    from rlfuse.annotate.store import preference_pairs

    where = f"feedback.path={path}"
    if algorithm != "d3po":
        raise UserError(f"feedback=human: algorithm={algorithm} cannot learn from preference labels; "
                        f"add algorithm=d3po")
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
        recorded = manifest.get(section)
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


# ----------------------------------------------------------------------------- replay


@dataclass
class Replay:
    """The labelled pairs of a feedback dataset, as D3PO training batches (see the module docstring).

    pairs: (group, winner k, loser k), repeated by their net votes; latents (N, T+1, C, h, w),
    log_probs (N, T), timesteps (T,): the stored chains, row g * K + k, on the training device;
    prompt_embeds (G, L, D) one per group; negative_embed (1, L, D).
    """

    pairs: list[tuple[int, int, int]]
    images_per_prompt: int
    prompts: list[str]
    image_files: list[list[Path]]
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embed: torch.Tensor

    def epoch(self, seed: int, epoch: int, rank: int, world: int, num_images: int) -> tuple[Trajectories, torch.Tensor]:
        """This process's share of every pair, in an order shuffled per epoch; and the first
        num_images of its images as they were labelled, (n, 3, H, W) in [0, 1] (for the log grid).

        Returns Trajectories of 2P rows: 2i the winner, 2i + 1 the loser (rewards 1 and 0). Each
        process takes an equal, contiguous slice (pairs beyond a multiple of `world` wait for
        another epoch); sample ids are places in the shuffled list, so runs repeat exactly.
        """
        from rlfuse.train import seed_for

        order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(seed_for(seed, epoch, 5)))
        share = len(order) // world
        places = order[rank * share:(rank + 1) * share].tolist()
        chosen = [self.pairs[p] for p in places]
        device, k_images = self.latents.device, self.images_per_prompt
        rows = torch.tensor([[g * k_images + w, g * k_images + l] for g, w, l in chosen], device=device).reshape(-1)
        groups = torch.tensor([g for g, _, _ in chosen], device=device).repeat_interleave(2)   # (2P,)
        chains = self.latents[rows]                                                          # (2P, T+1, C, h, w)
        count = len(rows)
        rewards = torch.tensor([1.0, 0.0], device=device).repeat(len(chosen))               # winner, loser
        ids = torch.tensor([[2 * (rank * share + i), 2 * (rank * share + i) + 1] for i in range(len(chosen))],
                           device=device).reshape(-1)
        batch = Trajectories(
            prompt_embeds=self.prompt_embeds[groups], negative_embeds=self.negative_embed.expand(count, -1, -1),
            latents=chains[:, :-1], next_latents=chains[:, 1:],
            timesteps=self.timesteps.expand(count, -1), log_probs=self.log_probs[rows],
            rewards=rewards, advantages=torch.zeros_like(rewards), prompts=[self.prompts[g] for g in groups.tolist()],
            sample_ids=ids,
        )
        return batch, self.images(rows[:num_images].tolist())

    def images(self, rows: list[int]) -> torch.Tensor:
        """(n, 3, H, W) in [0, 1]: the PNGs of the given rows, as the annotators saw them."""
        from PIL import Image

        k_images = self.images_per_prompt
        pixels = [np.asarray(Image.open(self.image_files[r // k_images][r % k_images]).convert("RGB")) for r in rows]
        if not pixels:
            return torch.zeros(0, 3, 1, 1)
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255


def load_replay(path: str, encode: Callable[[list[str]], torch.Tensor], negative_embed: torch.Tensor,
                device: torch.device, world: int = 1) -> Replay:
    """The dataset's pairs and chains on `device`, with each group's prompt encoded by `encode`
    (prompts -> (B, L, D), the run's text encoder). The dataset was checked by check_dataset."""
    from rlfuse.annotate.dataset import load_dataset
    from rlfuse.annotate.store import preference_pairs

    root = Path(path).expanduser()
    dataset = load_dataset(root, check_images=False)
    pairs = preference_pairs(root)
    if len(pairs) < world:
        raise UserError(f"feedback.path={path}: {len(pairs)} labelled pairs cannot be shared by {world} processes; "
                        f"label more, or train with fewer processes")
    chains = load_trajectories(root / TRAJECTORIES)
    prompts = [group.prompt for group in dataset.groups]
    chunk = 64  # prompts encoded at a time
    prompt_embeds = torch.cat([encode(prompts[i:i + chunk]) for i in range(0, len(prompts), chunk)])
    return Replay(
        pairs=pairs, images_per_prompt=dataset.images_per_prompt, prompts=prompts,
        image_files=[list(group.files) for group in dataset.groups],
        latents=chains["latents"].to(device), log_probs=chains["log_probs"].to(device),
        timesteps=chains["timesteps"].to(device), prompt_embeds=prompt_embeds.to(device),
        negative_embed=negative_embed.to(device),
    )

