"""Throughput of each reward at its real size, on random weights: images per second on this machine.

    python benchmarks/rewards.py [--repeats 3] [--batch 8] [--out benchmarks/results/rewards.json] [--only name,...]

CLIP rewards use the real ViT-L/14 architecture with random weights (no download); the aesthetic
head is the real MLP with random weights; imagereward is the real BLIP ViT-L/16 + BERT model with
random weights and a made-up vocabulary of bert-base-uncased's size; http posts to the reference
server on loopback (serving jpeg), so its figure is the protocol's overhead over jpeg. Images are 512 px (Stable Diffusion's
size) except shapes, which reads the toy world's 32 px. Median and spread over repeats, after a
warm-up. --only measures some rewards and updates their entries in --out, keeping the others.
A benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rlfuse.reward_server import serve  # noqa: E402
from rlfuse.rewards.aesthetic import AestheticMLP, AestheticReward  # noqa: E402
from rlfuse.rewards.alignment import AlignmentReward  # noqa: E402
from rlfuse.rewards.diversity import DiversityReward  # noqa: E402
from rlfuse.rewards.http import HttpReward  # noqa: E402
from rlfuse.rewards.imagereward import ImageReward, write_test_vocabulary  # noqa: E402
from rlfuse.rewards.jpeg import JpegReward  # noqa: E402
from rlfuse.rewards.shapes import ShapesReward  # noqa: E402

RANDOM_CLIP = {"clip_model": "ViT-L-14", "clip_pretrained": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/rewards.json")
    parser.add_argument("--only", default="", help="comma-separated reward names (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    head = folder / "aesthetic.pth"
    torch.save(AestheticMLP(768).state_dict(), head)
    vocabulary = write_test_vocabulary(folder / "vocabulary", 30522)
    server = serve(JpegReward(), "jpeg", port=0)
    rewards = {
        "jpeg": (JpegReward(), 512),
        "shapes": (ShapesReward(), 32),
        "aesthetic": (AestheticReward(weights=str(head), **RANDOM_CLIP), 512),
        "alignment": (AlignmentReward(**RANDOM_CLIP), 512),
        "diversity": (DiversityReward(**RANDOM_CLIP), 512),
        "imagereward": (ImageReward(weights="random", tokenizer=str(vocabulary)), 512),
        "http (jpeg over loopback)": (HttpReward(f"http://127.0.0.1:{server.server_address[1]}"), 512),
    }
    if args.only:
        rewards = {name: rewards[name] for name in args.only.split(",")}
    prompts = ["a red circle to the left of a blue square"] * args.batch
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if args.only and out.is_file() else {}
    for name, (reward, size) in rewards.items():
        images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        reward(images, prompts)  # warm-up (loads models)
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            reward(images, prompts)
            rates.append(args.batch / (time.perf_counter() - start))
        results[name] = {"image_size": size, "images_per_s": statistics.median(rates),
                         "min": min(rates), "max": max(rates)}
        print(f"{name:28s} {size:4d} px  {statistics.median(rates):8.1f} images/s  ({min(rates):.1f}-{max(rates):.1f})")
    server.shutdown()
    record = {"benchmark": "reward throughput, random weights at real size", "batch": args.batch,
              "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_suffix(".json.tmp")
    staged.write_text(json.dumps(record, indent=2) + "\n")
    staged.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
