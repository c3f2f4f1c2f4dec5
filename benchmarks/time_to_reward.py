"""Time to reward on the shapes world: how many seconds of training each method needs to raise its
model's held-out score by +0.05 and +0.10 over that model's own starting score.

    python benchmarks/time_to_reward.py [--seeds 0 1 2] [--methods ddpo_toy nft_toy_flow ...] [--epochs N]
        -> benchmarks/results/time_to_reward.json, docs/time_to_reward.png

Each run is `python -m rlfuse.train` in its own process with one torch thread, evaluated on the 133
held-out captions every `eval_every` epochs. The runs alternate between the methods (method 1 seed 0,
method 2 seed 0, ..., method 1 seed 1, ...), so that a change in the machine's speed falls on all of
them alike. Time counts sampling and training (the epochs' sample_seconds + train_seconds), not the
evaluations, whose number is a choice of the measurement. A benchmark, not a test: the seconds depend
on the machine; the ratios between methods measured in one run are what carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (label, overrides of `python -m rlfuse.train`, epochs, evaluate every N epochs)
COMMON = ["progress=false", "log.images_every=0", "checkpoint.every=1000", "eval.num_images=133"]
METHODS = {
    "ddpo_toy": ("DDPO on model=toy (the earlier default)", ["algorithm=ddpo", "model=toy"], 40, 5),
    "grpo_toy_flow": ("GRPO on model=toy_flow", ["algorithm=grpo", "model=toy_flow", "sample.eta=0.7",
                                                 "eval.eta=0", "sample.guidance_scale=4.5"], 40, 5),
    "grpo_fast_toy_flow": ("GRPO-Fast (window of 2 of 10 steps) on model=toy_flow",
                           ["algorithm=grpo", "model=toy_flow", "sample.eta=0.7", "eval.eta=0",
                            "sample.guidance_scale=4.5", "sample.sde_window.size=2", "sample.sde_window.range=[0,5]"],
                           40, 5),
    "grpo_mix_toy_flow": ("GRPO with MixGRPO's progressive window (4 of 10) on model=toy_flow",
                          ["algorithm=grpo", "model=toy_flow", "sample.eta=0.7", "eval.eta=0",
                           "sample.guidance_scale=4.5", "sample.sde_window.size=4", "sample.sde_window.shift_every=5"],
                          40, 5),
    "nft_toy_flow": ("DiffusionNFT on model=toy_flow", ["algorithm=nft", "model=toy_flow"], 40, 5),
}
THRESHOLDS = (0.05, 0.10)


def run(method: str, seed: int, epochs: int | None, root: Path) -> dict:
    """One training run; returns its held-out curve against cumulative sampling + training seconds."""
    label, overrides, default_epochs, eval_every = METHODS[method]
    epochs = epochs or default_epochs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rlfuse.train", *overrides, *COMMON, f"seed={seed}", f"epochs={epochs}",
               f"eval.every={eval_every}", f"run_root={root}"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{result.stderr[-2000:]}")
    wall = time.perf_counter() - started
    metrics_file = max(root.glob("**/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    seconds, curve = 0.0, []
    for row in rows:
        seconds += row.get("sample_seconds", 0.0) + row.get("train_seconds", 0.0)
        if "eval_reward_mean" in row:
            curve.append((row["epoch"], seconds, row["eval_reward_mean"]))
    start = curve[0][2]
    reached = {f"+{t:.2f}": next((s for _, s, r in curve if r >= start + t), None) for t in THRESHOLDS}
    return {"method": method, "seed": seed, "epochs": epochs, "command": " ".join(command[1:-1]),
            "curve": [{"epoch": e, "seconds": s, "eval_reward": r} for e, s, r in curve], "start": start,
            "end": curve[-1][2], "gain": curve[-1][2] - start, "seconds_to": reached, "wall_seconds": wall}


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        entry = {"label": METHODS[method][0], "start": statistics.mean(r["start"] for r in mine),
                 "end": statistics.mean(r["end"] for r in mine), "gain": statistics.mean(r["gain"] for r in mine)}
        for key in mine[0]["seconds_to"]:
            times = [r["seconds_to"][key] for r in mine]
            entry[f"seconds_to_{key}"] = statistics.median(times) if all(t is not None for t in times) else None
            entry[f"seeds_reaching_{key}"] = sum(t is not None for t in times)
        summary[method] = entry
    return summary


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method in dict.fromkeys(r["method"] for r in runs):
        for i, r in enumerate(x for x in runs if x["method"] == method):
            axis.plot([p["seconds"] for p in r["curve"]], [p["eval_reward"] for p in r["curve"]], "-o", markersize=3,
                      color=colours[method], alpha=0.8, label=METHODS[method][0] if i == 0 else None)
    axis.set_xlabel("seconds of sampling and training (one CPU thread)")
    axis.set_ylabel("held-out shapes score (133 captions)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: each method's)")
    parser.add_argument("--out", default="benchmarks/results/time_to_reward.json")
    parser.add_argument("--figure", default="docs/time_to_reward.png")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rlfuse-ttr-") as folder:
        for seed in args.seeds:               # alternate the methods within each seed
            for method in args.methods:
                root = Path(folder) / f"{method}_{seed}"
                runs.append(run(method, seed, args.epochs, root))
                r = runs[-1]
                print(f"{method} seed {seed}: {r['start']:.3f} -> {r['end']:.3f} | "
                      + " | ".join(f"{k} at {v:.0f} s" if v is not None else f"{k} not reached"
                                   for k, v in r["seconds_to"].items()), flush=True)
    summary = summarise(runs)
    for method, entry in summary.items():
        print(f"{method}: gain {entry['gain']:+.3f} | " + " | ".join(
            f"{k[len('seconds_to_'):]} {v:.0f} s" if v is not None else f"{k[len('seconds_to_'):]} not reached by all"
            for k, v in entry.items() if k.startswith("seconds_to_")))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpu": platform.processor() or platform.machine(),
                                                            "cores": os.cpu_count()},
              "thresholds": THRESHOLDS, "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, Path(args.figure))
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
