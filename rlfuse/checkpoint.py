"""Checkpoints that resume a run exactly, written atomically.

A checkpoint is a folder checkpoints/epoch_NNNNNN/ holding:
    trainable.safetensors   every trainable UNet parameter (LoRA or all), by name
    optimizer.pt            the optimizer state
    state.pt                epoch, algorithm state (e.g. per-prompt statistics), RNG states of
                            every process, fp16 loss scale
    lora/                   LoRA in the diffusers format (pipeline.load_lora_weights(folder)), or
    pipeline/               a full pipeline folder (full fine-tuning, final checkpoint)
It is written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoints untouched and never a half-written one under a real name.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlfuse.cli import UserError

PREFIX = "epoch_"


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{epoch:06d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    extra_state: dict,
    export: Callable[[Path], None],
    keep: int,
) -> Path:
    """Write the checkpoint of a finished epoch atomically; prune to the newest `keep` (0: all)."""
    final = checkpoint_dir(run_dir, epoch)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, temporary / "trainable.safetensors")
        torch.save(optimizer_state, temporary / "optimizer.pt")
        torch.save({"epoch": epoch, **extra_state}, temporary / "state.pt")
        export(temporary)
        _fsync_tree(temporary)
        if final.exists():
            stale = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(stale)
            temporary.rename(final)
            shutil.rmtree(stale)
        else:
            temporary.rename(final)
        _fsync_directory(final.parent)  # make the rename itself durable
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {error.strerror or error}; free disk space or fix "
                        f"permissions (earlier checkpoints are intact)") from None
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(folder: Path, module: torch.nn.Module) -> tuple[dict, dict]:
    """Load trainable weights into module; return (optimizer_state, state)."""
    weights = load_file(folder / "trainable.safetensors")
    missing = set(weights) - {name for name, _ in module.named_parameters()}
    if missing:
        raise UserError(f"checkpoint {folder} does not match the model (e.g. {sorted(missing)[0]}); "
                        f"resume with the config the run was started with")
    module.load_state_dict(weights, strict=False)
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    return optimizer_state, state
