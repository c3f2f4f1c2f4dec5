"""How high the shapes score can go by choosing among the model's own samples: the held-out score of the
best of K images per caption, per criterion, for K = 1, 2, 4, 8.

    python benchmarks/best_of_k.py [--k 8] [--dataset DIR] [--model toy]
        -> benchmarks/results/best_of_k_<model>.json

Without --dataset it first writes one with `python -m rlfuse.sample` (every held-out caption, K images
from the caption's shared initial noise, the RL sampler's settings: 10 steps, eta 1, guidance 5) in a
temporary folder. The best of K is what a policy that always drew its best image would score: an upper
bound for reward-driven fine-tuning that only reweights what the model already draws, and a lower one
for what learning something new (a relation the model cannot tell apart) could add.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rlfuse.annotate.dataset import load_dataset
from rlfuse.rewards.shapes import CRITERIA, ShapesReward

RESULTS = Path(__file__).resolve().parent / "results"


def score_dataset(root: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Captions, scores (captions, K) and criteria {name: (captions, K), NaN where one does not apply} of a dataset
    rlfuse.sample wrote (read and checked by the annotator's loader)."""
    reward, captions, scores, criteria = ShapesReward(), [], [], {name: [] for name in CRITERIA}
    for group in load_dataset(root).groups:
        pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in group.files])
        out = reward(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, [group.prompt] * len(pixels))
        captions.append(group.prompt)
        scores.append(out.scores.numpy())
        for name in CRITERIA:
            criteria[name].append(out.details[name].numpy())
    return captions, np.stack(scores), {name: np.stack(rows) for name, rows in criteria.items()}


def best_of(scores: np.ndarray, criteria: dict[str, np.ndarray], k: int) -> dict:
    """The mean score and criteria of each caption's best image among its first k (first on ties)."""
    best = scores[:, :k].argmax(axis=1)
    rows = np.arange(len(scores))
    return {"k": k, "score": float(scores[rows, best].mean()),
            **{name: float(np.nanmean(values[rows, best])) for name, values in criteria.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8, help="images per held-out caption (default 8)")
    parser.add_argument("--model", default="toy", help="model config to sample with (default toy; unused with --dataset)")
    parser.add_argument("--dataset", type=Path, default=None, help="a dataset rlfuse.sample wrote (default: write one)")
    parser.add_argument("--seed", type=int, default=0, help="rlfuse.sample's seed (default 0)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset
        if dataset is None:
            dataset = Path(tmp) / "dataset"
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            subprocess.run([sys.executable, "-m", "rlfuse.sample", f"out={dataset}", f"model={args.model}",
                            "prompts=shapes", "split=eval", "num_prompts=133", f"seed={args.seed}",
                            f"sample.images_per_prompt={args.k}", "progress=false"], check=True, env=env)
        captions, scores, criteria = score_dataset(dataset)
        manifest = json.loads((dataset / "manifest.json").read_text())
        sampler, model = manifest.get("sampler"), manifest.get("model", {}).get("name", args.model)
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k < scores.shape[1]] + [scores.shape[1]]
    rows = [best_of(scores, criteria, k) for k in ks]
    for row in rows:
        print(f"best of {row['k']}: {row['score']:.3f}  " + "  ".join(f"{n} {row[n]:.3f}" for n in CRITERIA))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"best_of_k_{model}.json"  # named after the model that drew the dataset
    out.write_text(json.dumps({"model": model, "captions": len(captions), "images_per_caption": scores.shape[1],
                               "sampler": sampler, "mean_of_all": float(scores.mean()), "best_of": rows,
                               "machine": platform.processor() or platform.machine()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
