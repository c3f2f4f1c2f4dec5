"""Evaluate a fine-tuned checkpoint against its base model and write a Markdown report.

    python -m rlfuse.evaluate <run folder or checkpoint folder> [--rewards jpeg,alignment ...]
        [--set reward.fn.key=value ...] [--num-prompts 8] [--images-per-prompt 4] [--out <folder>]
        [--human-pairs <folder>] [--base-cache <folder>]

Both models sample the same held-out prompts from the same noise (fixed seeds), so every difference
in the images is the fine-tuning's. The report (<out>/REPORT.md, <out>/report.json) holds:
- scores under several rewards, the trained one and others it never saw (reward hacking shows as a
  rise in the trained reward with a fall in the others);
- diversity: the mean pairwise pixel distance between the images of one prompt;
- drift from the base model: the mean pixel and latent distance between base and fine-tuned images
  drawn from the same noise;
- side-by-side grids (base | fine-tuned, same seeds) and PNG plots of the run's metrics.jsonl.

With --human-pairs, it also writes a dataset for people to judge (the annotator's format, one group of
two images per prompt and seed: base and fine-tuned from the same noise, in a seeded random order
recorded in comparison.json); label it with `python -m rlfuse.annotate <folder> --task pair`, then
`python -m rlfuse.annotate winrate <folder>` gives the fine-tuned model's win rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from rlfuse.cli import CONF_DIR, fail
from rlfuse.errors import UserError

# Curves plotted from metrics.jsonl when present: (file name, [(metric, label)]).
CURVES = [
    ("reward.png", [("reward_mean", "training batch"), ("eval_reward_mean", "held-out, fixed seeds")]),
    ("diagnostics.png", [("loss", "loss"), ("approx_kl", "approx_kl"), ("clipfrac", "clipfrac"), ("kl", "kl"),
                         ("preference_accuracy", "preference_accuracy")]),
]


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) from a run folder (its newest checkpoint) or a checkpoint folder."""
    from rlfuse.engine.checkpoint import list_checkpoints

    if not path.is_dir():
        raise UserError(f"{path}: no such folder; give a run folder (outputs/...) or one of its checkpoints/epoch_N")
    if (path / "trainable.safetensors").is_file():
        run_dir = path.parent.parent
    else:
        run_dir, checkpoints = path, list_checkpoints(path)
        if not checkpoints:
            raise UserError(f"{path}: holds no checkpoint (checkpoints/epoch_N); give a finished run folder")
        path = checkpoints[-1]
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml beside the checkpoint; give a run folder made by rlfuse.train")
    return run_dir, path


def load_models(run_cfg, checkpoint: Path):
    """(base family, fine-tuned family) on the CPU; the fine-tuned one from the checkpoint's exported
    LoRA (fused), its exported pipeline, or its trainable weights loaded into the base network."""
    from rlfuse.config import load_family
    from rlfuse.engine.checkpoint import load_checkpoint
    from rlfuse.families.common import LORA_FILE

    base = load_family(run_cfg)
    if (checkpoint / "pipeline" / "model_index.json").is_file():
        return base, load_family(run_cfg, pretrained=str(checkpoint / "pipeline"))
    tuned = load_family(run_cfg)
    if (checkpoint / "lora" / LORA_FILE).is_file():
        tuned.fuse_lora(checkpoint / "lora")
    else:  # a full fine-tune's intermediate checkpoint: the trained weights themselves
        load_checkpoint(checkpoint, tuned.network)
    return base, tuned


def build_reward(name: str, settings: list[str]):
    """A reward from conf/reward/<name>.yaml with `reward.fn.key=value` settings applied."""
    from omegaconf import OmegaConf

    from rlfuse.cli import group_choices
    from rlfuse.config import build_reward as config_build_reward

    if name not in group_choices("reward"):
        raise UserError(f"--rewards {name}: no such reward; valid: {', '.join(group_choices('reward'))}")
    node = OmegaConf.create({"reward": OmegaConf.load(CONF_DIR / "reward" / f"{name}.yaml")})
    mine = [s for s in settings if s.startswith(f"{name}.")]
    try:
        node.merge_with(OmegaConf.from_dotlist([f"reward.{s[len(name) + 1:]}" for s in mine]))
    except Exception as error:  # a bad setting: one line naming it
        raise UserError(f"--set for reward {name}: {str(error).strip().splitlines()[0]}") from None
    return config_build_reward(node.reward.fn, f"--set for reward {name}", f"reward {name}")


def sample_images(family, prompts: list[str], seeds: list[int], num_steps: int, guidance: float, eta: float,
                  resolution: int, sde_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, H, W) in [0, 1], final latents (B, C, h, w)) with the training loop's sampler."""
    from rlfuse.rollout import rollout
    from rlfuse.seeding import seed_for

    network = family.network.eval()
    sampled = rollout(network, family, family.sampler(eta, sde_type), prompts, [seed_for(s, 0) for s in seeds],
                      [seed_for(s, 1) for s in seeds], family.latent_shape(resolution), num_steps, guidance,
                      torch.device("cpu"))
    return sampled.images, sampled.chains[:, -1]


def pairwise_pixel_distance(images: torch.Tensor, groups: int) -> float:
    """Mean RMS pixel distance between two images of the same prompt; images (G*K, 3, H, W), rows of a
    group adjacent."""
    flat = images.reshape(groups, -1, images[0].numel())                       # (G, K, D)
    if flat.shape[1] < 2:
        return math.nan
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[-1])           # (G, K, K)
    k = flat.shape[1]
    return float(distances.sum() / (groups * k * (k - 1)))


def plot_curves(metrics_file: Path, out: Path) -> list[str]:
    """PNG plots of metrics.jsonl; returns the file names written."""
    try:
        import matplotlib
    except ImportError:  # plots are optional: the numbers and grids do not need them
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return []
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    written = []
    for name, series in CURVES:
        present = [(key, label) for key, label in series if any(key in r for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in present:
            points = [(r["epoch"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def paired_change(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Mean scores before and after, their change, and the change's standard error: base and fine-tuned images
    share their noise, so the change is the mean of per-image differences and its error is theirs."""
    differences = after - before
    stderr = float(differences.std() / math.sqrt(len(differences))) if len(differences) > 1 else float("nan")
    return {"base": float(before.mean()), "finetuned": float(after.mean()), "change": float(differences.mean()),
            "stderr": stderr}


def write_human_pairs(out: Path, prompts: list[str], seeds: list[int], base_images: torch.Tensor,
                      tuned_images: torch.Tensor, seed: int, run_dir: Path, checkpoint: Path, model: str) -> dict:
    """A dataset of G = len(prompts) groups of two images, base and fine-tuned from one seed, the
    fine-tuned one at position finetuned[g] (a seeded coin), recorded in comparison.json; returns that record."""
    import numpy as np

    from rlfuse.annotate.winrate import COMPARISON, COMPARISON_FORMAT
    from rlfuse.rewards.jpeg import to_uint8
    from rlfuse.sample import write_dataset

    finetuned = np.random.default_rng(seed).integers(0, 2, len(prompts)).tolist()
    rows = [torch.stack([base_images[g], tuned_images[g]][::(1 if side == 1 else -1)])
            for g, side in enumerate(finetuned)]
    record = {"format": COMPARISON_FORMAT, "version": 1, "finetuned": finetuned, "seed": seed, "model": model,
              "run": str(run_dir), "checkpoint": str(checkpoint)}
    write_dataset(out, {"comparison": "base against fine-tuned: which image is which is in comparison.json"},
                  prompts, seeds, to_uint8(torch.cat(rows)), None, None, None, {COMPARISON: record})
    return record


def base_key(run_cfg, prompts: list[str], seeds: list[int], sampler_args: tuple) -> str:
    """What fixes the base model's evaluation images: its model settings (the pipeline, earlier LoRAs), the
    prompts, seeds and sampler, the torch thread count (float sums round by it), the versions of torch,
    diffusers, transformers and peft, and rlfuse's own source (any edit to it gives a new key). Two evaluations
    with the same key draw the same base images; a model folder's files edited in place are not seen."""
    import hashlib
    from importlib import metadata

    from omegaconf import OmegaConf

    versions = {}
    for package in ("torch", "diffusers", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = ""
    source = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        source.update(path.read_bytes())
    identity = {"model": OmegaConf.to_container(run_cfg.model, resolve=True), "prompts": prompts, "seeds": seeds,
                "sampler": list(sampler_args), "threads": torch.get_num_threads(), "versions": versions,
                "rlfuse_source": source.hexdigest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_base(folder: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, latents) of an earlier evaluation's base model with this key, or None. An unreadable file
    counts as absent (it is drawn again and replaced)."""
    from safetensors.torch import load_file

    path = folder / f"base_{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        return tensors["images"], tensors["latents"]
    except Exception:  # noqa: BLE001 - a damaged cache entry is redrawn, never trusted
        print(f"base cache {path}: unreadable, drawing the base images again", file=sys.stderr)
        return None


def write_base(folder: Path, key: str, images: torch.Tensor, latents: torch.Tensor) -> None:
    """Store the base images and latents under key, whole or not at all (a temporary file renamed into place:
    evaluations running side by side may write the same key)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".base_", suffix=".tmp")
    os.close(handle)
    try:
        save_file({"images": images.contiguous(), "latents": latents.contiguous()}, temporary)
        os.replace(temporary, folder / f"base_{key}.safetensors")
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def evaluate(target: Path, rewards: list[str], settings: list[str], num_prompts: int, images_per_prompt: int,
             out: Path | None, seed: int = 1234, human_pairs: Path | None = None, base_cache: Path | None = None) -> dict:
    """Sample base and fine-tuned images at fixed seeds, score, compare; write the report (and, with
    human_pairs, the dataset for people to judge). Returns its numbers. base_cache: a folder where the base
    model's images are kept and reused by later evaluations that would draw the same ones (base_key)."""
    from omegaconf import OmegaConf
    from torchvision.utils import make_grid, save_image

    from rlfuse.prompts import load_prompts
    from rlfuse.rewards.base import score

    if human_pairs is not None and human_pairs.exists():
        raise UserError(f"--human-pairs {human_pairs}: already exists; a dataset is never overwritten: choose a new folder")
    run_dir, checkpoint = find_checkpoint(target)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    out = out or run_dir / "evaluation"
    reward_names = rewards or [run_cfg.reward.name]
    reward_fns = {name: build_reward(name, settings) for name in reward_names}
    prompts_all = load_prompts(run_cfg.prompts.eval)
    prompt_list = prompts_all[:num_prompts]
    prompts = [p for p in prompt_list for _ in range(images_per_prompt)]          # groups adjacent
    seeds = [seed * 100_003 + i for i in range(len(prompts))]
    base, tuned = load_models(run_cfg, checkpoint)
    s = run_cfg.sample
    e = run_cfg.get("eval", {})  # the run's own evaluation settings, where it set them

    def chosen(key: str, default):
        return default if e.get(key) is None else e.get(key)

    args = (chosen("num_steps", s.num_steps), chosen("guidance_scale", s.guidance_scale), chosen("eta", s.eta),
            run_cfg.model.resolution, s.get("sde_type"))
    key = base_key(run_cfg, prompts, seeds, args) if base_cache is not None else None
    cached = read_base(base_cache, key) if key else None
    base_images, base_latents = cached or sample_images(base, prompts, seeds, *args)
    if key and cached is None:
        write_base(base_cache, key, base_images, base_latents)
    tuned_images, tuned_latents = sample_images(tuned, prompts, seeds, *args)

    scores = {}
    for name, fn in reward_fns.items():
        before = score(fn, base_images, prompts).scores.float()
        after = score(fn, tuned_images, prompts).scores.float()
        scores[name] = {**paired_change(before, after),
                        "trained_on": name == run_cfg.reward.name}
    report = {
        "run": str(run_dir), "checkpoint": str(checkpoint), "algorithm": run_cfg.algorithm.name,
        "reward": run_cfg.reward.name, "model": run_cfg.model.name, "prompts": len(prompt_list),
        "images_per_prompt": images_per_prompt, "seed": seed, "scores": scores,
        "diversity": {"base": pairwise_pixel_distance(base_images, len(prompt_list)),
                      "finetuned": pairwise_pixel_distance(tuned_images, len(prompt_list))},
        "drift": {"pixel_rms": float(((tuned_images - base_images) ** 2).mean().sqrt()),
                  "latent_rms": float(((tuned_latents - base_latents) ** 2).mean().sqrt())},
    }
    if human_pairs is not None:
        report["human_pairs"] = {"folder": str(human_pairs), **write_human_pairs(
            human_pairs, prompts, seeds, base_images, tuned_images, seed, run_dir, checkpoint, run_cfg.model.name)}
    out.mkdir(parents=True, exist_ok=True)
    # Side by side: each row one prompt's images, base on the left, fine-tuned on the right.
    rows = []
    gap = torch.ones(3, base_images.shape[-2], 4)
    for g in range(len(prompt_list)):
        part = slice(g * images_per_prompt, (g + 1) * images_per_prompt)
        rows.append(torch.cat([make_grid(base_images[part], nrow=images_per_prompt, padding=1), gap[:, :1].expand(
            3, base_images.shape[-2] + 2, 4), make_grid(tuned_images[part], nrow=images_per_prompt, padding=1)], dim=2))
    save_image(torch.cat(rows, dim=1), out / "base_vs_finetuned.png")
    report["plots"] = plot_curves(run_dir / "metrics.jsonl", out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "REPORT.md").write_text(render_markdown(report, prompt_list))
    return report


def render_markdown(report: dict, prompt_list: list[str]) -> str:
    lines = [f"# Evaluation: {report['algorithm']} on {report['reward']} ({report['model']})", "",
             f"Run `{report['run']}`, checkpoint `{Path(report['checkpoint']).name}`. {report['prompts']} held-out "
             f"prompts x {report['images_per_prompt']} images, base and fine-tuned from the same noise "
             f"(seed {report['seed']}).", "",
             "| reward | base | fine-tuned | change | std. error of the change (paired) | trained on |", "|---|---|---|---|---|---|"]
    for name, v in report["scores"].items():
        lines.append(f"| {name} | {v['base']:.4f} | {v['finetuned']:.4f} | {v['change']:+.4f} | {v['stderr']:.4f} | "
                     f"{'yes' if v['trained_on'] else 'no'} |")
    d, drift = report["diversity"], report["drift"]
    lines += ["", f"Diversity (mean RMS pixel distance between images of one prompt): base {d['base']:.4f}, "
                  f"fine-tuned {d['finetuned']:.4f}.",
              f"Drift from the base model (same noise): pixel RMS {drift['pixel_rms']:.4f}, "
              f"latent RMS {drift['latent_rms']:.4f}.", "",
              "A rise in the trained reward with falls in the others, or a collapse of diversity, is the mark of "
              "reward hacking.", "", "## Images (base | fine-tuned, same seeds; one row per prompt)", "",
              "![base | fine-tuned](base_vs_finetuned.png)", "",
              "Prompts, top to bottom: " + "; ".join(f"`{p}`" for p in prompt_list), ""]
    if report.get("plots"):
        lines += ["## Training curves (metrics.jsonl)", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlfuse.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--rewards", default="", help="comma-separated reward choices (conf/reward); default: the trained one")
    parser.add_argument("--set", action="append", default=[], metavar="REWARD.fn.KEY=VALUE",
                        help="a reward setting, e.g. alignment.fn.clip_pretrained=null (repeatable)")
    parser.add_argument("--num-prompts", type=int, default=8, help="held-out prompts (the first N of prompts.eval)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (diversity needs >= 2)")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed: the same images every time")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <run>/evaluation)")
    parser.add_argument("--human-pairs", type=Path, default=None, metavar="FOLDER",
                        help="also write base-vs-fine-tuned pairs for people to label (rlfuse.annotate --task pair; "
                             "then rlfuse.annotate winrate FOLDER)")
    parser.add_argument("--base-cache", type=Path, default=None, metavar="FOLDER",
                        help="keep the base model's images here and reuse them when another evaluation would draw "
                             "the same ones (same model settings, prompts, seeds, sampler, threads, library versions, rlfuse source)")
    args = parser.parse_args(argv)
    try:
        if args.num_prompts < 1 or args.images_per_prompt < 1:
            raise UserError("--num-prompts and --images-per-prompt must be >= 1")
        if args.base_cache is not None and args.base_cache.exists() and not args.base_cache.is_dir():
            raise UserError(f"--base-cache {args.base_cache}: is a file; give a folder (it is made if missing)")
        report = evaluate(args.target, [r for r in args.rewards.split(",") if r], args.set, args.num_prompts,
                          args.images_per_prompt, args.out, args.seed, args.human_pairs, args.base_cache)
    except UserError as error:
        fail(str(error))
    out = args.out or Path(report["run"]) / "evaluation"
    print(f"report: {out / 'REPORT.md'}")
    if args.human_pairs is not None:
        print(f"pairs to label: {args.human_pairs} ({len(report['human_pairs']['finetuned'])} pairs): "
              f"python -m rlfuse.annotate {args.human_pairs} --task pair")
    for name, v in report["scores"].items():
        print(f"{name}: base {v['base']:.4f} -> fine-tuned {v['finetuned']:.4f} ({v['change']:+.4f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
