"""Export a run's checkpoint to share it: the LoRA in the diffusers format or, with --merge, a whole
pipeline with the LoRA fused in (safetensors only), a model card, and optionally a Hub upload.

    python -m rlfuse.export <run folder> [--checkpoint best|last|epoch_N] [--merge] [--out folder]
                            [--push-to-hub user/repo]

The folder holds the weights, README.md (the model card: YAML metadata, how to load it, held-out
scores and curves, a before/after grid, the training command and config), images/ and the run's
config.yaml. A full fine-tuning run always exports a pipeline (it has no LoRA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rlfuse.errors import UserError, check, fail

# Licences of the base models rlfuse ships configs for (conf/model/), as their Hub pages declare them.
LICENSES = {
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",
    "stabilityai/stable-diffusion-3.5-medium": "other",
    "stabilityai/stable-diffusion-3.5-large": "other",
    "black-forest-labs/FLUX.1-dev": "other",
    "black-forest-labs/FLUX.1-schnell": "apache-2.0",
}
PIPELINES = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
             "sdxl": "StableDiffusionXLPipeline"}


# ----------------------------------------------------------------------------- what to export


def run_config(run_dir: Path):
    from omegaconf import OmegaConf

    check(run_dir.is_dir(), f"{run_dir}: no such folder; give a run folder made by rlfuse.train (outputs/...)")
    check((run_dir / "config.yaml").is_file(), f"{run_dir}: no config.yaml; give a run folder made by rlfuse.train")
    return OmegaConf.load(run_dir / "config.yaml")


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint folder of --checkpoint best | last | epoch_N."""
    from rlfuse.engine.checkpoint import best_dir, checkpoint_dir, list_checkpoints

    if which == "best":
        folder = best_dir(run_dir)
        check(folder.is_dir(), f"--checkpoint best: {run_dir} has no checkpoints/best; the run was made without "
                               f"checkpoint.best (use --checkpoint last)")
        return folder
    if which == "last":
        checkpoints = list_checkpoints(run_dir)
        check(bool(checkpoints), f"{run_dir}: holds no checkpoint (checkpoints/epoch_N); give a finished run folder")
        return checkpoints[-1]
    epoch = which.removeprefix("epoch_")
    check(epoch.isdigit(), f"--checkpoint {which}: use best, last or epoch_N")
    folder = checkpoint_dir(run_dir, int(epoch))
    kept = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
    check(folder.is_dir(), f"--checkpoint {which}: no such checkpoint in {run_dir} (kept: {kept})")
    return folder


def checkpoint_epoch(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)["epoch"])


def check_push(repo_id: str) -> str:
    """The Hub token for an upload to repo_id; UserError (one line) when offline or without a token."""
    from huggingface_hub import constants, get_token

    check(repo_id.count("/") == 1 and all(repo_id.split("/")),
          f"--push-to-hub {repo_id}: give a repository id as user/name or org/name")
    check(not constants.HF_HUB_OFFLINE,
          f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing was exported or uploaded; unset it on a "
          f"connected machine")
    token = get_token()
    check(token is not None, f"--push-to-hub {repo_id}: no Hugging Face token, so nothing was exported or uploaded; "
                             f"run `hf auth login` or set HF_TOKEN")
    return token


def write_weights(cfg, checkpoint: Path, out: Path, merge: bool) -> str:
    """The LoRA folder (copied from the checkpoint) or a whole pipeline; returns "lora" or "pipeline"."""
    from rlfuse.config import load_family
    from rlfuse.engine.checkpoint import load_checkpoint
    from rlfuse.families.common import LORA_FILE

    lora = checkpoint / "lora" / LORA_FILE
    if lora.is_file() and not merge:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lora, out / LORA_FILE)
        return "lora"
    family = load_family(cfg)          # the base model, with any earlier round's LoRA (model.lora_weights) fused
    if lora.is_file():
        family.fuse_lora(lora.parent)  # the checkpoint's LoRA into the network's weights for good
    else:
        load_checkpoint(checkpoint, family.network)  # a full fine-tune: the trained weights themselves
    family.export_pipeline(family.network, out)
    return "pipeline"


# ----------------------------------------------------------------------------- the model card


def base_model_id(cfg) -> str | None:
    """model.pretrained when it is a Hub id (not a local folder, not the tiny pipeline built in code)."""
    pretrained = cfg.model.pretrained
    if pretrained is None or Path(str(pretrained)).expanduser().exists() or str(pretrained).startswith((".", "/", "~")):
        return None
    return str(pretrained)


def training_command(run_dir: Path) -> str:
    """`python -m rlfuse.train <overrides>` from Hydra's record of the run's command line."""
    from omegaconf import OmegaConf

    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    return " ".join(["python -m rlfuse.train", *(str(o) for o in overrides)])


def held_out_rows(run_dir: Path) -> list[dict]:
    """The evaluation epochs of metrics.jsonl: epoch and every eval_* number."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [{"epoch": r["epoch"], **{k: v for k, v in r.items() if k.startswith("eval_")}} for r in rows
            if any(k.startswith("eval_") for k in r)]


def before_after(cfg, run_dir: Path, epoch: int, out: Path) -> str | None:
    """images/before_after.png: each held-out caption's image before training and at `epoch` (same seeds),
    from the run's evaluation grids; None when the run kept no such grids."""
    from torchvision.io import ImageReadMode, read_image

    from rlfuse.images import captioned_pairs, grid_cells
    from rlfuse.prompts import load_prompts

    first, chosen = run_dir / "eval" / "epoch_0000.png", run_dir / "eval" / f"epoch_{epoch:04d}.png"
    if epoch == 0 or not (first.is_file() and chosen.is_file()):
        return None
    prompts = load_prompts(cfg.prompts.eval)
    captions = [prompts[i % len(prompts)] for i in range(cfg.eval.num_images)]
    side = cfg.model.resolution
    cells = [grid_cells(read_image(str(path), ImageReadMode.RGB).float() / 255, len(captions), side, side)
             for path in (first, chosen)]
    (out / "images").mkdir(exist_ok=True)
    captioned_pairs(cells[0], cells[1], captions).save(out / "images" / "before_after.png")
    return "images/before_after.png"


def model_card(cfg, run_dir: Path, checkpoint: Path, kind: str, images: list[str]) -> str:
    """README.md: YAML metadata (base model, library, pipeline tag, tags, licence) and the card's text."""
    from huggingface_hub import ModelCardData
    from omegaconf import OmegaConf

    base = base_model_id(cfg)
    algorithm, reward, family = cfg.algorithm.name, cfg.reward.name, cfg.model.get("family", "sd")
    tags = ["rlfuse", "diffusers", "text-to-image", "reinforcement-learning", algorithm, f"reward-{reward}",
            "lora" if kind == "lora" else "full-pipeline"]
    data = ModelCardData(base_model=base, library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         license=LICENSES.get(base) if base else None)
    epoch = checkpoint_epoch(checkpoint)
    best_note = checkpoint / "best.json"
    chosen = f"`{checkpoint.name}` (epoch {epoch})"
    if best_note.is_file():
        best = json.loads(best_note.read_text())
        chosen += f", the best evaluation by {best['metric']} ({best['mode']}): {best['value']:.4f}"
    base_text = f"`{base}`" if base else f"`model={cfg.model.name}` ({cfg.model.pretrained or 'built in code'})"
    pipeline = PIPELINES.get(family, "DiffusionPipeline")
    load = (f"pipeline = {pipeline}.from_pretrained(\"{base or '<base model folder>'}\")\n"
            f"pipeline.load_lora_weights(\"<this repository or folder>\")" if kind == "lora"
            else f"pipeline = {pipeline}.from_pretrained(\"<this repository or folder>\")")
    rows = held_out_rows(run_dir)
    columns = [c for c in ("eval_reward_mean", "eval_reward_std") if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r if k.startswith("eval_") and k not in columns})[:6]
    lines = [f"---\n{data.to_yaml()}\n---", "",
             f"# {run_dir.name}: {algorithm} on the {reward} reward", "",
             f"Fine-tuned from {base_text} with **{algorithm}** on the **{reward}** reward with "
             f"rlfuse. Checkpoint {chosen}. "
             + ("LoRA weights in the diffusers format." if kind == "lora"
                else "A whole pipeline folder (safetensors)."), "",
             "## Use", "", "```python", f"from diffusers import {pipeline}", "", load,
             "image = pipeline(\"<prompt>\").images[0]", "```", ""]
    if rows:
        lines += ["## Held-out scores (fixed seeds, every evaluation of the run)", "",
                  "| epoch | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += ["| " + " | ".join([str(r["epoch"])] + [f"{r[c]:.4f}" if isinstance(r.get(c), (int, float))
                                                        else "" for c in columns]) + " |" for r in rows]
        lines.append("")
    lines += [f"![{Path(image).stem}]({image})\n" for image in images]
    lines += ["## Training", "", "```bash", training_command(run_dir), "```", "",
              "<details><summary>The resolved config (config.yaml)</summary>", "", "```yaml",
              OmegaConf.to_yaml(cfg).strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export and upload


def export(run_dir: Path, which: str = "best", merge: bool = False, out: Path | None = None) -> Path:
    """Write the export folder (atomically: a temporary folder renamed into place); returns it."""
    from rlfuse.evaluate import plot_curves

    cfg = run_config(run_dir)
    checkpoint = find_checkpoint(run_dir, which)
    out = out or run_dir / "export" / (checkpoint.name + ("_merged" if merge else ""))
    check(not out.exists() or not any(out.iterdir()), f"--out {out}: the folder exists and is not empty; remove it "
                                                      f"or give another --out")
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        kind = write_weights(cfg, checkpoint, staging, merge)
        images = [p for p in [before_after(cfg, run_dir, checkpoint_epoch(checkpoint), staging)] if p]
        (staging / "images").mkdir(exist_ok=True)
        images += [f"images/{name}" for name in plot_curves(run_dir / "metrics.jsonl", staging / "images")]
        shutil.copy2(run_dir / "config.yaml", staging / "config.yaml")
        (staging / "README.md").write_text(model_card(cfg, run_dir, checkpoint, kind, images))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def push(folder: Path, repo_id: str, token: str, run_name: str) -> str:
    """Create repo_id (if new) and upload the folder in one commit; returns the commit's URL. (Needs the
    network: not run by the tests.)"""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=f"rlfuse run {run_name}")
    return commit.commit_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlfuse.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder made by rlfuse.train")
    parser.add_argument("--checkpoint", default=None,
                        help="best | last | epoch_N (default: best when the run kept one, else last)")
    parser.add_argument("--merge", action="store_true", help="a whole pipeline with the LoRA fused in")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: <run>/export/<checkpoint>)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the folder to this Hub repository")
    args = parser.parse_args(argv)
    try:
        token = check_push(args.push_to_hub) if args.push_to_hub else None
        which = args.checkpoint or ("best" if (args.run / "checkpoints" / "best").is_dir() else "last")
        out = export(args.run, which, args.merge, args.out)
    except UserError as error:
        fail(str(error))
    print(f"exported: {out}")
    if args.push_to_hub:
        print(f"uploaded: {push(out, args.push_to_hub, token, args.run.name)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
