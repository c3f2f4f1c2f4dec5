"""How close rlfuse's sampling and training come to the bare UNet, what each speed lever is worth,
and how an epoch's time grows with batch size, denoising steps and resolution.

    python benchmarks/floor.py                   # floor on model=tiny and model=toy, levers on tiny
    python benchmarks/floor.py --scaling         # also the scaling sweep on model=tiny -> docs/scaling.png

Floor: the same UNet forward passes with the same shapes in a bare loop (inference mode, batch 2B
for guidance, T steps), against rlfuse.sampling.sample_trajectories (DDIM with log-probs); and bare
forward+backward passes against rlfuse's training step (recomputed log-prob with gradients, DDPO's
PPO loss, backward, AdamW step). Levers: each variant against its baseline in alternation in one
process, one thread (torch.set_num_threads(1)); ratios variant / baseline, median and spread over
repeats, in CPU time (time.process_time). A benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

from rlfuse.algorithms.ddpo import DDPO  # noqa: E402
from rlfuse.model import add_lora, build_tiny_pipeline, trainable_parameters  # noqa: E402
from rlfuse.rewards.jpeg import JpegReward  # noqa: E402
from rlfuse.sampling import Policy, encode_prompts, sample_trajectories  # noqa: E402
from rlfuse.train import decode  # noqa: E402
from rlfuse.trajectories import Trajectories  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The side-by-side benchmark's work (one sampling batch, one epoch's training of it).
BATCH, STEPS, TRAIN_BATCH, TRAIN_STEPS, GUIDANCE, ETA = 8, 10, 4, 5, 5.0, 1.0
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def load(model: str) -> StableDiffusionPipeline:
    if model == "tiny":
        pipeline = build_tiny_pipeline(seed=0)
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(ROOT / "rlfuse" / "toy" / "pretrained", safety_checker=None,
                                                           requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    add_lora(pipeline.unet, 4, 4, TARGETS)
    pipeline.unet.set_attn_processor(AttnProcessor2_0())
    return pipeline


class Bench:
    """One pipeline, its embeddings and an optimizer, with the timed pieces as methods."""

    def __init__(self, pipeline: StableDiffusionPipeline, batch: int = BATCH, steps: int = STEPS, latent: int = 16):
        self.pipeline, self.unet, self.batch, self.steps, self.latent = pipeline, pipeline.unet, batch, steps, latent
        self.embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["a cat"] * batch, "cpu")
        self.negative = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [""], "cpu").expand_as(self.embeds)
        self.objective = DDPO(clip_range=1e-4, advantages="batch")
        self.optimizer_kwargs: dict = {}
        self.make_optimizer()
        self.reward = JpegReward()
        self.autocast = False
        self.samples = self.sample()

    def make_optimizer(self, **kwargs) -> None:
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.unet).values(), lr=3e-4, **kwargs)

    def context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def floor_sampling(self) -> None:
        """The same UNet forwards as sampling, nothing else: T x (2B, C, h, w)."""
        x = torch.randn(2 * self.batch, 4, self.latent, self.latent)
        states = torch.cat([self.negative, self.embeds])
        with torch.inference_mode(), self.context():
            for t in range(self.steps):
                self.unet(x, torch.full((2 * self.batch,), 999 - 100 * t), encoder_hidden_states=states)

    def sample(self, grad_mode=None) -> Trajectories:
        generators = [torch.Generator().manual_seed(i) for i in range(self.batch)]
        initial = torch.randn(self.batch, 4, self.latent, self.latent, generator=generators[0])
        rollout = sample_trajectories if grad_mode is None else sample_trajectories.__wrapped__
        with grad_mode or nullcontext(), self.context():
            latents, log_probs, timesteps = rollout(self.unet, self.pipeline.scheduler, self.embeds, self.negative,
                                                    initial, self.steps, GUIDANCE, ETA, generators)
        return Trajectories(prompt_embeds=self.embeds.clone(), negative_embeds=self.negative.clone(),
                            latents=latents[:, :-1].clone(), next_latents=latents[:, 1:].clone(),
                            timesteps=timesteps.expand(self.batch, -1).clone(), log_probs=log_probs.clone(),
                            rewards=torch.zeros(self.batch), advantages=torch.randn(self.batch),
                            prompts=["a cat"] * self.batch, sample_ids=torch.arange(self.batch))

    def sample_no_grad(self) -> Trajectories:
        return self.sample(torch.no_grad())

    def decode_and_reward(self) -> None:
        with torch.inference_mode():
            images = decode(self.pipeline.vae, self.samples.next_latents[:, -1])
        self.reward(images, self.samples.prompts)

    def floor_training(self) -> None:
        """The same forward+backward passes as training: (B / b) x TRAIN_STEPS x (2b, C, h, w)."""
        x = torch.randn(2 * TRAIN_BATCH, 4, self.latent, self.latent)
        states = torch.cat([self.negative[:TRAIN_BATCH], self.embeds[:TRAIN_BATCH]])
        for _ in range(self.batch // TRAIN_BATCH):
            for t in range(TRAIN_STEPS):
                with self.context():
                    out = self.unet(x, torch.full((2 * TRAIN_BATCH,), 999 - 100 * t), encoder_hidden_states=states).sample
                out.float().square().mean().backward()

    def train(self) -> None:
        """rlfuse's training of the batch: log-probs with gradients, PPO loss, backward, AdamW step."""
        policy = Policy(self.unet, self.pipeline.scheduler, GUIDANCE, ETA)
        for rows in torch.arange(self.batch).split(TRAIN_BATCH):
            batch = self.samples[rows]
            for step in range(TRAIN_STEPS):
                with self.context():
                    loss, _ = self.objective.loss(policy, batch, torch.full((len(batch),), step))
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.unet).values(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def epoch(self) -> None:
        self.samples = self.sample()
        self.decode_and_reward()
        self.train()


def timed(fn) -> float:
    """CPU seconds of fn (one thread: its time on a core of its own, little moved by other jobs)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def alternate(pairs: dict[str, tuple], repeats: int) -> dict:
    """{name: (baseline, variant)} -> per name the ratio variant / baseline over alternating repeats."""
    out = {}
    for name, (baseline, variant) in pairs.items():
        baseline(), variant()   # warm-up
        base_t, var_t = [], []
        for r in range(repeats):
            order = [(base_t, baseline), (var_t, variant)] if r % 2 == 0 else [(var_t, variant), (base_t, baseline)]
            for times, fn in order:
                times.append(timed(fn))
        ratios = [v / b for v, b in zip(var_t, base_t)]
        out[name] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "baseline_s": statistics.median(base_t), "variant_s": statistics.median(var_t), "n": repeats}
        print(f"  {name:44s} {out[name]['ratio_median']:.3f} [{min(ratios):.3f}, {max(ratios):.3f}]  "
              f"({out[name]['variant_s']:.3f} s / {out[name]['baseline_s']:.3f} s)", flush=True)
    return out


def with_setting(bench: Bench, fn, setup, teardown):
    def run():
        setup()
        try:
            return fn()
        finally:
            teardown()
    return run


def levers(bench: Bench, repeats: int) -> dict:
    unet = bench.unet
    eager = (lambda: unet.set_attn_processor(AttnProcessor()), lambda: unet.set_attn_processor(AttnProcessor2_0()))
    channels_last = (lambda: unet.to(memory_format=torch.channels_last),
                     lambda: unet.to(memory_format=torch.contiguous_format))

    def bf16_on():
        bench.autocast = True

    def bf16_off():
        bench.autocast = False

    def optimizer(**kwargs):
        return (lambda: bench.make_optimizer(**kwargs), lambda: bench.make_optimizer())

    def two_forwards():
        """Guidance as two UNet calls of B instead of one of 2B (the lever 'one batched forward')."""
        x = torch.randn(bench.batch, 4, bench.latent, bench.latent)
        with torch.inference_mode():
            for t in range(bench.steps):
                ts = torch.full((bench.batch,), 999 - 100 * t)
                bench.unet(x, ts, encoder_hidden_states=bench.negative)
                bench.unet(x, ts, encoder_hidden_states=bench.embeds)

    def encode_each():
        encode_prompts(bench.pipeline.tokenizer, bench.pipeline.text_encoder, ["a cat"] * bench.batch, "cpu")

    def encode_once():
        encode_prompts(bench.pipeline.tokenizer, bench.pipeline.text_encoder, ["a cat"], "cpu")

    return alternate({
        "sampling: no_grad instead of inference_mode": (bench.sample, bench.sample_no_grad),
        "sampling: guidance as 2 forwards of B (vs 1 of 2B)": (bench.floor_sampling, two_forwards),
        "text: encode B prompts (vs 1 distinct prompt)": (encode_once, encode_each),
        "sampling: eager attention (vs SDPA)": (bench.sample, with_setting(bench, bench.sample, *eager)),
        "training: eager attention (vs SDPA)": (bench.train, with_setting(bench, bench.train, *eager)),
        "sampling: channels_last": (bench.sample, with_setting(bench, bench.sample, *channels_last)),
        "training: channels_last": (bench.train, with_setting(bench, bench.train, *channels_last)),
        "sampling: bf16 autocast": (bench.sample, with_setting(bench, bench.sample, bf16_on, bf16_off)),
        "training: bf16 autocast": (bench.train, with_setting(bench, bench.train, bf16_on, bf16_off)),
        "training: AdamW foreach=True": (bench.train, with_setting(bench, bench.train, *optimizer(foreach=True))),
        "training: AdamW fused=True": (bench.train, with_setting(bench, bench.train, *optimizer(fused=True))),
    }, repeats)


def floor(bench: Bench, repeats: int) -> dict:
    result = alternate({
        "sampling / bare forwards": (bench.floor_sampling, bench.sample),
        "sampling + decode + reward / bare forwards": (bench.floor_sampling,
                                                       lambda: (bench.sample(), bench.decode_and_reward())),
        "training / bare forward+backward": (bench.floor_training, bench.train),
    }, repeats)
    trajectory = bench.samples
    stored = sum(t.numel() * t.element_size() for t in (trajectory.latents, trajectory.next_latents))
    result["stored_latents_bytes_per_sample"] = {
        "two_copies": stored / bench.batch, "one_chain": stored / bench.batch * (STEPS + 1) / (2 * STEPS)}
    return result


def scaling(repeats: int) -> dict:
    """Epoch time (sample B, decode, reward, train on TRAIN_STEPS steps) on model=tiny as one knob moves."""
    pipeline = load("tiny")
    sweeps = {"batch size": ("batch", [4, 8, 16, 32]), "denoising steps": ("steps", [5, 10, 20, 40]),
              "resolution (px)": ("latent", [32, 64, 96])}
    out = {}
    for title, (knob, values) in sweeps.items():
        out[title] = {"values": values, "seconds": [], "spread": []}
        for value in values:
            kwargs = {knob: value // 2 if knob == "latent" else value}
            bench = Bench(pipeline, **kwargs)
            bench.epoch()   # warm-up
            times = [timed(bench.epoch) for _ in range(repeats)]
            out[title]["seconds"].append(statistics.median(times))
            out[title]["spread"].append([min(times), max(times)])
            print(f"  scaling {title} = {value}: {statistics.median(times):.3f} s per epoch", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {"batch size": 8, "denoising steps": 10, "resolution (px)": 32}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (title, data) in zip(axes, result.items()):
        values, seconds = data["values"], data["seconds"]
        low = [s - lo for s, (lo, hi) in zip(seconds, data["spread"])]
        high = [hi - s for s, (lo, hi) in zip(seconds, data["spread"])]
        ax.errorbar(values, seconds, yerr=[low, high], marker="o", capsize=3, label="measured")
        reference = seconds[values.index(base[title])]
        power = 2 if title.startswith("resolution") else 1
        ax.plot(values, [reference * (v / base[title]) ** power for v in values], "--", color="grey",
                label="∝ pixels" if power == 2 else "linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(title)
        ax.set_ylabel("seconds per epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("rlfuse DDPO epoch time on model=tiny (1 thread; defaults: 8 samples, 10 steps, 32 px; "
                 "train 4 per minibatch on 5 steps)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="tiny,toy")
    parser.add_argument("--scaling", action="store_true", help="also the scaling sweep and docs/scaling.png")
    parser.add_argument("--lever-models", default="tiny", help="models to measure the levers on")
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "floor.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), [round(x, 2) for x in os.getloadavg()]
    report = {"benchmark": "rlfuse against the bare UNet (floor), speed levers, scaling",
              "work": {"batch": BATCH, "steps": STEPS, "train_batch": TRAIN_BATCH, "train_steps": TRAIN_STEPS,
                       "guidance": GUIDANCE, "lora_rank": 4, "lora_targets": TARGETS}, "models": {}}
    for model in args.models.split(","):
        print(f"{model}:", flush=True)
        bench = Bench(load(model))
        report["models"][model] = {"floor": floor(bench, args.repeats)}
        if model in args.lever_models.split(","):
            report["models"][model]["levers"] = levers(bench, args.repeats)
    if args.scaling:
        report["scaling"] = scaling(args.scaling_repeats)
        plot(report["scaling"], ROOT / "docs" / "scaling.png")
    report["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": 1, "platform": platform.platform(),
                         "torch": torch.__version__, "load_average_before": load_before,
                         "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    report["started"], report["finished"] = started, time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
