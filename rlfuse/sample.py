"""Sample a feedback dataset: K images per prompt from one shared initial noise, for people to label.

    python -m rlfuse.sample out=<folder> [model=...] [prompts=...] [num_prompts=16] [sample.images_per_prompt=4]
    python -m rlfuse.sample out=<folder> model.lora_weights=<run>/checkpoints/epoch_N/lora     (a later round)
    python -m rlfuse.sample out=<folder> model.pretrained=<run>/checkpoints/epoch_N/pipeline   (after full fine-tuning)

Writes <out>/manifest.json, <out>/images/GGGG-k.png and <out>/trajectories.safetensors (the denoising
chains and their log-probs; format in rlfuse/feedback.py), all at once: into a temporary folder that
is renamed to <out> last. An existing <out> is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlfuse.cli import run_hydra_app
from rlfuse.errors import UserError, check

log = logging.getLogger("rlfuse")


def preflight(cfg: DictConfig) -> list[str]:
    """Check values, the prompt list and the weights before anything is loaded or written."""
    from rlfuse.config import check_complete, check_resolution, family_of
    from rlfuse.prompts import load_prompts

    check_complete(cfg)
    for key in ("num_prompts", "sample.num_steps", "hardware.sample_batch_size"):
        check(OmegaConf.select(cfg, key) >= 1, f"{key}={OmegaConf.select(cfg, key)}: must be >= 1")
    check(cfg.sample.images_per_prompt >= 2, f"sample.images_per_prompt={cfg.sample.images_per_prompt}: must be >= 2 "
                                             f"(people compare the images of a prompt)")
    check(cfg.sample.eta > 0, f"sample.eta={cfg.sample.eta}: must be > 0, or the sampler has no log-probabilities")
    check(cfg.split in ("train", "eval"), f"split={cfg.split!r}: use train or eval")
    out = Path(cfg.out).expanduser()
    check(not out.exists(), f"out={cfg.out}: already exists; a dataset is never overwritten: choose a new folder")
    load_prompts(cfg.prompts[cfg.split])
    family_of(cfg).check_source(cfg.model.pretrained, cfg.model.revision, cfg.model.get("lora_weights"))
    check_resolution(cfg)
    return []


def choose_prompts(prompts: list[str], count: int, seed: int) -> list[str]:
    """count prompts in a seeded order, without repeats until the list is used up (then again)."""
    from rlfuse.seeding import seed_for

    rng = np.random.default_rng(seed_for(seed, 0))
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(-(-count // len(prompts)))])
    return [prompts[i] for i in order[:count]]


def sample(cfg: DictConfig) -> None:
    """Roll out K chains per prompt (shared x_T per group), decode, and write the dataset folder."""
    from rlfuse.config import load_family
    from rlfuse.families.common import lora_folders
    from rlfuse.feedback import TRAJECTORIES, sampling_settings
    from rlfuse.prompts import load_prompts
    from rlfuse.rewards.jpeg import to_uint8
    from rlfuse.rollout import rollout
    from rlfuse.seeding import seed_for

    preflight(cfg)  # again: a sweep changes values per job
    start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    hw, sample_cfg, k_images = cfg.hardware, cfg.sample, cfg.sample.images_per_prompt
    device = torch.device("cuda" if not hw.cpu and torch.cuda.is_available() else "cpu")
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(hw.mixed_precision)
    lora_weights = lora_folders(cfg.model.get("lora_weights"))
    family = load_family(cfg)
    for part in (*family.frozen, family.network):
        part.requires_grad_(False).to(device).eval()
    sampler = family.sampler(sample_cfg.eta, sample_cfg.get("sde_type"))
    prompts = choose_prompts(load_prompts(cfg.prompts[cfg.split]), cfg.num_prompts, cfg.seed)
    group_seeds = [seed_for(cfg.seed, 1, g) for g in range(len(prompts))]  # each group's initial noise
    latent_shape = family.latent_shape(cfg.model.resolution)
    groups_per_batch = max(1, hw.sample_batch_size // k_images)
    chains, log_probs, images = [], [], []
    for first in tqdm(range(0, len(prompts), groups_per_batch), desc="sample", disable=not cfg.progress):
        groups = range(first, min(first + groups_per_batch, len(prompts)))
        sampled = rollout(
            family.network, family, sampler, [prompts[g] for g in groups for _ in range(k_images)],
            [group_seeds[g] for g in groups for _ in range(k_images)],          # x_T equal within a group
            [seed_for(cfg.seed, 2, g, k) for g in groups for k in range(k_images)], latent_shape,
            sample_cfg.num_steps, sample_cfg.guidance_scale, device,
            lambda: torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                   enabled=autocast_dtype is not None))
        images.append(to_uint8(sampled.images))                                 # (B, H, W, 3)
        chains.append(sampled.chains.float().cpu())                             # (B, T+1, C, h, w)
        log_probs.append(sampled.log_probs.float().cpu())                       # (B, T)
    settings = sampling_settings(cfg.model.name, cfg.model.pretrained, cfg.model.revision, cfg.model.variant,
                                 cfg.model.tiny_seed, lora_weights, cfg.model.resolution, sample_cfg.num_steps,
                                 sample_cfg.guidance_scale, sample_cfg.eta, family.name, sample_cfg.get("sde_type"))
    extra = {**settings, "seed": cfg.seed, "prompts": {"source": cfg.prompts[cfg.split], "split": cfg.split}}
    write_dataset(out, extra, prompts, group_seeds, np.concatenate(images), torch.cat(chains), torch.cat(log_probs),
                  sampled.timesteps.cpu())
    megabytes = (out / TRAJECTORIES).stat().st_size / 1e6
    log.info("wrote %s: %d prompts x %d images, trajectories %.1f MB, in %.1f s; label it: python -m rlfuse.annotate %s",
             out, len(prompts), k_images, megabytes, time.perf_counter() - start, out)


def write_dataset(out: Path, manifest: dict, prompts: list[str], seeds: list[int], images: np.ndarray,
                  latents: torch.Tensor | None, log_probs: torch.Tensor | None, timesteps: torch.Tensor | None,
                  documents: dict[str, dict] | None = None) -> None:
    """Write a feedback dataset folder atomically: everything goes into a temporary folder beside
    `out`, which is renamed into place last; `out` must not exist (a dataset is never overwritten).

    manifest: the extra manifest keys (model, sampler, seed, ...); prompts, seeds: one per group;
    images: (G * K, H, W, 3) uint8, row g * K + k; latents, log_probs, timesteps: as save_trajectories,
    or None for a dataset of images only (one to label, not to replay); documents: further JSON files
    {name: content} written beside the manifest.
    """
    import shutil
    from datetime import datetime, timezone

    from PIL import Image

    from rlfuse.annotate.dataset import FORMAT, VERSION, image_id
    from rlfuse.feedback import TRAJECTORIES, save_trajectories, sha256_file

    k_images = len(images) // len(prompts)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier crash of this very process id
    (staging / "images").mkdir(parents=True)
    try:
        groups = []
        for g, (prompt, seed) in enumerate(zip(prompts, seeds)):
            entries = []
            for k in range(k_images):
                name = f"images/{image_id(g, k)}.png"
                Image.fromarray(images[g * k_images + k]).save(staging / name)
                entries.append({"id": image_id(g, k), "file": name, "sha256": sha256_file(staging / name)})
            groups.append({"index": g, "prompt": prompt, "seed": seed, "images": entries})
        files = {}
        if latents is not None:
            save_trajectories(staging / TRAJECTORIES, latents, log_probs, timesteps)
            files[TRAJECTORIES] = sha256_file(staging / TRAJECTORIES)
        for name, content in (documents or {}).items():
            (staging / name).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        document = {"format": FORMAT, "version": VERSION, "images_per_prompt": k_images, "groups": groups,
                    "files": files, **manifest,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / "manifest.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            raise UserError(f"out={out}: appeared while sampling; the dataset is not overwritten: choose a new folder")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_hydra_app(sample, config_name="sample", extra_overrides=preflight)


if __name__ == "__main__":
    main()
