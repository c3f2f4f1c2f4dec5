"""Checkpoints that resume a run exactly, written atomically.

A checkpoint is a folder checkpoints/epoch_NNNNNN/ holding:
    trainable.safetensors   every trainable UNet parameter (LoRA or all), by name
    optimizer.pt            the optimizer state
    state.pt                epoch, algorithm state (e.g. per-prompt statistics) and RNG state of
                            every process (a resume with another process count takes rank 0's
                            algorithm state), fp16 loss scale
    lora/                   LoRA in the diffusers format (pipeline.load_lora_weights(folder)), or
    pipeline/               a full pipeline folder (full fine-tuning, final checkpoint)
checkpoints/best/ (checkpoint.best) holds the same for the best evaluation so far, with best.json
(metric, value, epoch); rotation (checkpoint.keep) prunes only the epoch_ folders, never it.
It is written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoints untouched and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlfuse.errors import UserError

PREFIX = "epoch_"
BEST = "best"


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{epoch:06d}"


def best_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / BEST


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
    folder: Path | None = None,
) -> Path:
    """Write the checkpoint of a finished epoch atomically (to checkpoints/epoch_NNNNNN, or `folder`);
    prune the epoch checkpoints to the newest `keep` (0: all)."""
    final = folder or checkpoint_dir(run_dir, epoch)
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


# ----------------------------------------------------------------------------- the checkpoint stage


def save_epoch(accelerator, run_dir: Path, epoch: int, final: bool, family, network: torch.nn.Module,
               optimizer: torch.optim.Optimizer, algorithm_state: dict, finetune: str, sharded: bool,
               keep: int, run_state: dict | None = None, best: dict | None = None) -> None:
    """Checkpoint a finished epoch (rank 0 writes atomically; every process waits for it).

    run_state: the loop's own state to resume (learning-rate schedule, best metric so far). best
    (metric, value, epoch): write checkpoints/best instead, with best.json.

    network: the trained network as the engine holds it. Exports: LoRA in the diffusers format each
    time; after full fine-tuning, a whole pipeline folder at the final epoch. Under sharded engines
    (DeepSpeed, FSDP) the whole weights are gathered with every process taking part, and the
    optimizer moments, sharded across processes, are not saved.
    """
    from accelerate.utils import gather_object

    from rlfuse.lora import trainable_parameters

    rng_states = gather_object([rng_state()])  # one per process, in rank order
    # Also per process: state that differs between processes (DPOK's replay buffer holds its own chains).
    algorithm_states = gather_object([algorithm_state]) if accelerator.num_processes > 1 else [algorithm_state]
    gathered_weights = accelerator.get_state_dict(network) if sharded else None
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(network)

        def export(folder: Path) -> None:
            if finetune == "lora":
                family.export_lora(inner, folder / "lora")
            elif final and best is None:
                whole = inner
                if sharded:  # a whole network on rank 0, from the gathered weights
                    whole = type(inner).from_config(inner.config)
                    whole.load_state_dict(gathered_weights)
                family.export_pipeline(whole, folder / "pipeline")
            if best is not None:
                (folder / "best.json").write_text(json.dumps(best) + "\n")

        extra = {**(run_state or {}),"algorithm": algorithm_states[0], "algorithm_per_process": algorithm_states,  # one object pickled once
                 "rng_per_process": rng_states,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
        trainable = trainable_parameters(inner)
        if sharded:
            trainable = {name: gathered_weights[name] for name in trainable}
        saved = save_checkpoint(run_dir, epoch, trainable, {} if sharded else optimizer.state_dict(), extra, export,
                                keep, best_dir(run_dir) if best is not None else None)
        logging.getLogger("rlfuse").info("%s: %s", "best checkpoint" if best is not None else "checkpoint", saved)
    accelerator.wait_for_everyone()


def restore(accelerator, optimizer: torch.optim.Optimizer, algorithm, optimizer_state: dict, state: dict) -> int:
    """Resume, after the weights went in (load_checkpoint, before the engine wrapped the network):
    the optimizer (and fp16 loss scale), the algorithm's state, this process's RNG. Returns the first
    epoch to run."""
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    elif accelerator.is_main_process:
        logging.getLogger("rlfuse").warning(
            "resuming a run under DeepSpeed or FSDP: the optimizer moments restart (they are sharded across processes and "
            "not in the checkpoint)")
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rank, world = accelerator.process_index, accelerator.num_processes
    per_process = state.get("algorithm_per_process") or []
    algorithm.load_state_dict(per_process[rank] if len(per_process) == world else state["algorithm"])
    rng_states = state["rng_per_process"]
    set_rng_state(rng_states[rank] if len(rng_states) == world else rng_states[0])
    return state["epoch"] + 1
