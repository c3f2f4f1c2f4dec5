"""The best checkpoint against the last one on held-out images neither was chosen on: each run's
checkpoints/best and its last epoch checkpoint scored by the run's reward on its held-out prompts at a
fresh noise seed (the run chose `best` on eval.seed's images, so its logged score is optimistic).

    python benchmarks/best_vs_last.py <run folder> [...] [--seed 4321] [--out benchmarks/results/best_vs_last.json]

A measurement script, not a test: about one evaluation's time per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rlfuse.config import build, eval_sampler, load_family  # noqa: E402
from rlfuse.engine.checkpoint import best_dir, list_checkpoints, load_checkpoint  # noqa: E402
from rlfuse.engine.evaluation import EvalSettings, evaluate  # noqa: E402
from rlfuse.prompts import load_prompts  # noqa: E402


def score(run_dir: Path, checkpoint: Path, seed: int) -> float:
    """The mean reward of the checkpoint's held-out images at noise seed `seed` (the run's settings otherwise)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    family = load_family(cfg)
    if (checkpoint / "lora").is_dir():
        family.fuse_lora(checkpoint / "lora")
    else:
        load_checkpoint(checkpoint, family.network)
    steps, guidance = cfg.eval.get("num_steps"), cfg.eval.get("guidance_scale")
    settings = EvalSettings(load_prompts(cfg.prompts.eval), cfg.eval.num_images, seed,
                            cfg.sample.num_steps if steps is None else steps,
                            cfg.sample.guidance_scale if guidance is None else guidance)
    result = evaluate(family.network.eval(), family, eval_sampler(cfg, family), build(cfg.reward.fn, "reward.fn"),
                      settings, family.latent_shape(cfg.model.resolution), 0, 1, torch.device("cpu"), nullcontext)
    return result.metrics["eval_reward_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--out", default="benchmarks/results/best_vs_last.json")
    args = parser.parse_args()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    for run_dir in args.runs:
        best, last = best_dir(run_dir), list_checkpoints(run_dir)[-1]
        note = json.loads((best / "best.json").read_text())
        logged = {json.loads(line)["epoch"]: json.loads(line).get("eval_reward_mean")
                  for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
        last_epoch = int(last.name.removeprefix("epoch_"))
        entry = {"seed": OmegaConf.load(run_dir / "config.yaml").seed, "best_epoch": note["epoch"],
                 "best_logged": note["value"], "last_epoch": last_epoch, "last_logged": logged.get(last_epoch),
                 "fresh_seed": args.seed, "best_fresh": score(run_dir, best, args.seed),
                 "last_fresh": score(run_dir, last, args.seed)}
        record["runs"][str(run_dir)] = entry
        print(json.dumps(entry), flush=True)
    record["date"] = time.strftime("%Y-%m-%d")
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
