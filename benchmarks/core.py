"""Throughput of the core loop on model=tiny: sampling (samples/s) and training (transitions/s).

    python benchmarks/core.py [--repeats 5] [--out benchmarks/results/core.json]

Uses the same functions as rlfuse.train (rollout with log-probs; recomputed log-probs with
gradients, PPO loss, AdamW step on LoRA) at a fixed configuration, after a warm-up, and reports
the median and spread over repeats. A benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rlfuse.algorithms.ddpo import DDPO  # noqa: E402
from rlfuse.families.sd import StableDiffusion  # noqa: E402
from rlfuse.lora import add_lora, trainable_parameters  # noqa: E402
from rlfuse.policy import Policy  # noqa: E402
from rlfuse.rollout import Rollout, sample_chain  # noqa: E402
from rlfuse.seeding import generators, initial_noise, seed_for  # noqa: E402
from rlfuse.trajectories import Conditioning, Trajectories  # noqa: E402

CONFIG = {"batch_size": 8, "num_steps": 10, "guidance_scale": 5.0, "eta": 1.0, "resolution": 32,
          "lora_rank": 4, "train_batch_size": 4}


def sample_batch(family: StableDiffusion, sampler, conditioning: Conditioning, latent_shape: tuple[int, ...],
                 seed: int) -> Trajectories:
    """One batch through rlfuse.rollout's chain (seeded x_T, DDIM with log-probs), as Trajectories.

    The prompts are encoded once outside (they are the same every batch) and the chains are not
    decoded: the figure is the denoising loop's throughput."""
    batch = len(conditioning)
    noise_seeds = [seed_for(seed, 1, i) for i in range(batch)]
    step_seeds = [seed_for(seed, 2, i) for i in range(batch)]
    chains, log_probs, timesteps = sample_chain(
        family.network, family, sampler, conditioning, initial_noise(latent_shape, noise_seeds), CONFIG["num_steps"],
        CONFIG["guidance_scale"], generators(step_seeds))
    sampled = Rollout(chains, log_probs, timesteps, conditioning, images=None)  # not decoded
    return sampled.trajectories(["a cat"] * batch, torch.arange(batch), torch.zeros(batch)).with_advantages(
        torch.randn(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/core.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    family = StableDiffusion.load(None, tiny_seed=0)  # model=tiny
    add_lora(family.network, CONFIG["lora_rank"], CONFIG["lora_rank"], ["to_q", "to_k", "to_v", "to_out.0"])
    objective = DDPO(clip_range=1e-4, advantages="batch")
    optimizer = torch.optim.AdamW(trainable_parameters(family.network).values(), lr=3e-4)
    sampler = family.sampler(CONFIG["eta"])
    latent_shape = family.latent_shape(CONFIG["resolution"])
    conditioning = family.encode_prompts(["a cat"] * CONFIG["batch_size"], torch.device("cpu"))

    policy = Policy(family.network, family, sampler, CONFIG["guidance_scale"])
    samples = sample_batch(family, sampler, conditioning, latent_shape, seed=0)  # warm-up
    sampling, training = [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        samples = sample_batch(family, sampler, conditioning, latent_shape, seed=repeat)
        sampling.append(CONFIG["batch_size"] / (time.perf_counter() - start))

        start = time.perf_counter()
        transitions = 0
        for rows in torch.arange(CONFIG["batch_size"]).split(CONFIG["train_batch_size"]):
            batch = samples[rows]
            for step in range(samples.num_steps):
                step_index = torch.full((len(batch),), step)
                loss, _ = objective.loss(policy, batch, step_index)
                loss.backward()
                transitions += len(batch)
            optimizer.step()
            optimizer.zero_grad()
        training.append(transitions / (time.perf_counter() - start))

    def summary(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}

    result = {
        "benchmark": "core loop on model=tiny",
        "config": CONFIG,
        "sampling_samples_per_s": summary(sampling),
        "training_transitions_per_s": summary(training),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"sampling: {result['sampling_samples_per_s']['median']:.1f} samples/s "
          f"(min {min(sampling):.1f}, max {max(sampling):.1f}) | training: "
          f"{result['training_transitions_per_s']['median']:.1f} transitions/s "
          f"(min {min(training):.1f}, max {max(training):.1f}) -> {out}")


if __name__ == "__main__":
    main()
