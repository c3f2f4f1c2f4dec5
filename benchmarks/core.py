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
from rlfuse.model import add_lora, build_tiny_pipeline, trainable_parameters  # noqa: E402
from rlfuse.sampling import Policy, encode_prompts, sample_trajectories  # noqa: E402
from rlfuse.trajectories import Trajectories  # noqa: E402

CONFIG = {"batch_size": 8, "num_steps": 10, "guidance_scale": 5.0, "eta": 1.0, "resolution": 32,
          "lora_rank": 4, "train_batch_size": 4}


def sample_batch(pipeline, prompt_embeds, negative_embeds, seed: int) -> Trajectories:
    batch = prompt_embeds.shape[0]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    initial = torch.stack([torch.randn(4, 16, 16, generator=g) for g in generators])
    latents, log_probs, timesteps = sample_trajectories(
        pipeline.unet, pipeline.scheduler, prompt_embeds, negative_embeds, initial, CONFIG["num_steps"],
        CONFIG["guidance_scale"], CONFIG["eta"], generators)
    return Trajectories(prompt_embeds=prompt_embeds, negative_embeds=negative_embeds, latents=latents[:, :-1],
                        next_latents=latents[:, 1:], timesteps=timesteps.expand(batch, -1),
                        log_probs=log_probs, rewards=torch.zeros(batch), advantages=torch.randn(batch),
                        prompts=["a cat"] * batch, sample_ids=torch.arange(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/core.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipeline = build_tiny_pipeline(seed=0)
    add_lora(pipeline.unet, CONFIG["lora_rank"], CONFIG["lora_rank"], ["to_q", "to_k", "to_v", "to_out.0"])
    objective = DDPO(clip_range=1e-4, advantages="batch")
    optimizer = torch.optim.AdamW(trainable_parameters(pipeline.unet).values(), lr=3e-4)
    prompt_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["a cat"] * CONFIG["batch_size"], "cpu")
    negative_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [""], "cpu").expand_as(prompt_embeds)

    policy = Policy(pipeline.unet, pipeline.scheduler, CONFIG["guidance_scale"], CONFIG["eta"])
    samples = sample_batch(pipeline, prompt_embeds, negative_embeds, seed=0)  # warm-up
    sampling, training = [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        samples = sample_batch(pipeline, prompt_embeds, negative_embeds, seed=repeat)
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
