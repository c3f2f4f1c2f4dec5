"""How close rlfuse's sampling and training come to the bare UNet, what each speed lever is worth,
and how an epoch's time grows with batch size, denoising steps and resolution.

    python benchmarks/floor.py                   # floor on model=tiny and model=toy, levers on tiny
    python benchmarks/floor.py --scaling         # also the scaling sweep on model=tiny -> docs/scaling.png
    python benchmarks/floor.py --models tiny_sd3 --lever-models none --out benchmarks/results/floor_flow.json

Floor: the same UNet forward passes with the same shapes in a bare loop (inference mode, batch 2B
for guidance, T steps), against rlfuse.rollout's chain (sample_chain: DDIM with log-probs), and the
whole rollout (encode, chain, decode) plus the reward against the same bare loop; and bare
forward+backward passes against rlfuse's training step (recomputed log-prob with gradients, DDPO's
PPO loss, backward, AdamW step). Levers: each variant against its baseline in alternation in one
process, one thread (torch.set_num_threads(1)); ratios variant / baseline, median and spread over
repeats, in CPU time (time.process_time). A benchmark, not a test: figures depend on the machine and its load.

model=tiny_sd3 (the flow family, rlfuse.families.sd3): the same comparisons with the SD3 transformer.
The bare sampling loop is the same batched guidance forward of 2B per step, the guided velocity and a
plain Euler update x + v dt, no log-prob; rlfuse's chain is sample_chain with the family's
FlowSampler (the "sde" step with its log-prob). Training is the same as the other models' (DDPO's loss
on Policy.log_prob through the flow step, backward, clipping, AdamW), and forward + backward of
Policy.log_prob alone, against bare transformer forward+backward passes of the same shapes. No levers
(they are UNet settings).
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
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

from rlfuse.algorithms.ddpo import DDPO  # noqa: E402
from rlfuse.families.sd import StableDiffusion  # noqa: E402
from rlfuse.families.sd3 import StableDiffusion3  # noqa: E402
from rlfuse.lora import add_lora, trainable_parameters  # noqa: E402
from rlfuse.policy import Policy  # noqa: E402
from rlfuse.rewards.jpeg import JpegReward  # noqa: E402
from rlfuse.rollout import Rollout, rollout, sample_chain  # noqa: E402
from rlfuse.seeding import generators, initial_noise, seed_for  # noqa: E402
from rlfuse.trajectories import Trajectories  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The side-by-side benchmark's work (one sampling batch, one epoch's training of it).
BATCH, STEPS, TRAIN_BATCH, TRAIN_STEPS, GUIDANCE, ETA = 8, 10, 4, 5, 5.0, 1.0
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# model=tiny_sd3: Flow-GRPO's noise level, and the LoRA of rlfuse/conf/model/tiny_sd3.yaml.
FLOW_ETA, FLOW_LORA_ALPHA, FLOW_TARGETS = 0.7, 8, list(StableDiffusion3.default_lora_targets)
FLOW_MODELS = ("tiny_sd3",)


def load(model: str) -> StableDiffusion | StableDiffusion3:
    """model=tiny (built in code) or model=toy (the shipped folder), DDIM, LoRA on TARGETS, SDPA attention;
    model=tiny_sd3 (built in code, no T5, 16 zero-padding tokens), LoRA as rlfuse/conf/model/tiny_sd3.yaml,
    the transformer's own (SDPA) attention processors."""
    if model == "tiny_sd3":
        family = StableDiffusion3.load(None, tiny_seed=0, max_sequence_length=16)
        add_lora(family.network, 4, FLOW_LORA_ALPHA, FLOW_TARGETS)
        return family
    family = StableDiffusion.load(None if model == "tiny" else str(ROOT / "rlfuse" / "toy" / "pretrained"), tiny_seed=0)
    add_lora(family.network, 4, 4, TARGETS)
    family.network.set_attn_processor(AttnProcessor2_0())
    return family


class Bench:
    """One model family, its prompts' conditioning and an optimizer, with the timed pieces as methods."""

    eta = ETA

    def __init__(self, family: StableDiffusion, batch: int = BATCH, steps: int = STEPS, resolution: int = 32):
        self.family, self.unet, self.batch, self.steps = family, family.network, batch, steps
        self.sampler = family.sampler(self.eta)
        self.latent_shape = family.latent_shape(resolution)
        self.device = torch.device("cpu")
        self.prompts = ["a cat"] * batch
        self.conditioning = family.encode_prompts(self.prompts, self.device)
        self.embeds, self.negative = self.conditioning["prompt_embeds"], self.conditioning["negative_embeds"]
        self.noise_seeds = [seed_for(0, 1, i) for i in range(batch)]
        self.step_seeds = [seed_for(0, 2, i) for i in range(batch)]
        self.policy = Policy(self.unet, family, self.sampler, GUIDANCE)
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
        x = torch.randn(2 * self.batch, *self.latent_shape)
        states = torch.cat([self.negative, self.embeds])
        with torch.inference_mode(), self.context():
            for t in range(self.steps):
                self.unet(x, torch.full((2 * self.batch,), 999 - 100 * t), encoder_hidden_states=states)

    def trajectories(self, sampled: Rollout, rewards: torch.Tensor) -> Trajectories:
        """The batch as training data, with random advantages (the training work does not depend on them)."""
        return sampled.trajectories(self.prompts, torch.arange(self.batch), rewards).with_advantages(
            torch.randn(self.batch))

    def sample(self, grad_mode=None) -> Trajectories:
        """rlfuse's denoising chain alone (rlfuse.rollout.sample_chain: prompts encoded once in __init__,
        no decoding), in inference mode or, with grad_mode, in that mode instead."""
        chain = sample_chain if grad_mode is None else sample_chain.__wrapped__
        with grad_mode or nullcontext(), self.context():
            chains, log_probs, timesteps = chain(self.unet, self.family, self.sampler, self.conditioning,
                                                 initial_noise(self.latent_shape, self.noise_seeds), self.steps,
                                                 GUIDANCE, generators(self.step_seeds))
        return self.trajectories(Rollout(chains, log_probs, timesteps, self.conditioning, images=None),  # not decoded
                                 torch.zeros(self.batch))

    def sample_no_grad(self) -> Trajectories:
        return self.sample(torch.no_grad())

    def sample_decode_reward(self) -> Trajectories:
        """rlfuse's whole rollout (encode the prompts, chain, decode) and the reward of its images."""
        sampled = rollout(self.unet, self.family, self.sampler, self.prompts, self.noise_seeds, self.step_seeds,
                          self.latent_shape, self.steps, GUIDANCE, self.device, self.context)
        return self.trajectories(sampled, self.reward(sampled.images, self.prompts).scores.float())

    def floor_training(self) -> None:
        """The same forward+backward passes as training: (B / b) x TRAIN_STEPS x (2b, C, h, w)."""
        x = torch.randn(2 * TRAIN_BATCH, *self.latent_shape)
        states = torch.cat([self.negative[:TRAIN_BATCH], self.embeds[:TRAIN_BATCH]])
        for _ in range(self.batch // TRAIN_BATCH):
            for t in range(TRAIN_STEPS):
                with self.context():
                    out = self.unet(x, torch.full((2 * TRAIN_BATCH,), 999 - 100 * t), encoder_hidden_states=states).sample
                out.float().square().mean().backward()

    def train(self) -> None:
        """rlfuse's training of the batch: log-probs with gradients, PPO loss, backward, AdamW step."""
        for rows in torch.arange(self.batch).split(TRAIN_BATCH):
            batch = self.samples[rows]
            for step in range(TRAIN_STEPS):
                with self.context():
                    loss, _ = self.objective.loss(self.policy, batch, torch.full((len(batch),), step))
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.unet).values(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def epoch(self) -> None:
        self.samples = self.sample_decode_reward()
        self.train()


class FlowBench(Bench):
    """The flow family (model=tiny_sd3): bare loops of SD3 transformer forwards; rlfuse's side is Bench's."""

    eta = FLOW_ETA

    def __init__(self, family: StableDiffusion3, **kwargs):
        super().__init__(family, **kwargs)
        self.pooled = self.conditioning["pooled_embeds"]
        self.negative_pooled = self.conditioning["negative_pooled_embeds"]
        # The chain's sigmas, computed once: the bare loop has no scheduler.
        self.sampler.set_timesteps(self.steps)
        self.sigmas = self.sampler.scheduler.sigmas.tolist()

    def floor_sampling(self) -> None:
        """The same transformer forwards as sampling (T x one guidance forward of 2B), the guided velocity
        and a plain Euler update x + v dt; no log-prob, no scheduler."""
        x = torch.randn(self.batch, *self.latent_shape)
        states = torch.cat([self.negative, self.embeds])
        pooled = torch.cat([self.negative_pooled, self.pooled])
        with torch.inference_mode(), self.context():
            for sigma, next_sigma in zip(self.sigmas[:-1], self.sigmas[1:]):
                out = self.unet(hidden_states=torch.cat([x, x]), timestep=torch.full((2 * self.batch,), 1000 * sigma),
                                encoder_hidden_states=states, pooled_projections=pooled).sample
                uncond, cond = out.chunk(2)
                x = x + (uncond + GUIDANCE * (cond - uncond)) * (next_sigma - sigma)

    def floor_training(self) -> None:
        """The same forward+backward passes as training: (B / b) x TRAIN_STEPS x (2b, C, h, w)."""
        x = torch.randn(2 * TRAIN_BATCH, *self.latent_shape)
        states = torch.cat([self.negative[:TRAIN_BATCH], self.embeds[:TRAIN_BATCH]])
        pooled = torch.cat([self.negative_pooled[:TRAIN_BATCH], self.pooled[:TRAIN_BATCH]])
        for _ in range(self.batch // TRAIN_BATCH):
            for t in range(TRAIN_STEPS):
                with self.context():
                    out = self.unet(hidden_states=x, timestep=torch.full((2 * TRAIN_BATCH,), 1000 * self.sigmas[t]),
                                    encoder_hidden_states=states, pooled_projections=pooled).sample
                out.float().square().mean().backward()

    def log_prob_training(self) -> None:
        """Training without DDPO's loss, clipping and optimizer step: forward + backward of
        Policy.log_prob through the flow step, on the same (B / b) x TRAIN_STEPS minibatch steps."""
        for rows in torch.arange(self.batch).split(TRAIN_BATCH):
            batch = self.samples[rows]
            for step in range(TRAIN_STEPS):
                with self.context():
                    log_prob = self.policy.log_prob(batch, torch.full((len(batch),), step))
                log_prob.mean().backward()


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
        x = torch.randn(bench.batch, *bench.latent_shape)
        with torch.inference_mode():
            for t in range(bench.steps):
                ts = torch.full((bench.batch,), 999 - 100 * t)
                bench.unet(x, ts, encoder_hidden_states=bench.negative)
                bench.unet(x, ts, encoder_hidden_states=bench.embeds)

    def encode_each():
        """The text encoder on all B prompts, as without the family's one-encode-per-distinct-prompt."""
        bench.family._encode(bench.prompts, bench.device)

    def encode_once():
        """What rlfuse does: family.encode_prompts encodes the one distinct prompt (the empty one is cached)."""
        bench.family.encode_prompts(bench.prompts, bench.device)

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
    pairs = {
        "sampling / bare forwards": (bench.floor_sampling, bench.sample),
        "sampling + decode + reward / bare forwards": (bench.floor_sampling, bench.sample_decode_reward),
        "training / bare forward+backward": (bench.floor_training, bench.train),
    }
    if isinstance(bench, FlowBench):
        pairs["log_prob forward+backward / bare forward+backward"] = (bench.floor_training, bench.log_prob_training)
    result = alternate(pairs, repeats)
    trajectory = bench.samples
    stored = sum(t.numel() * t.element_size() for t in (trajectory.latents, trajectory.next_latents))
    result["stored_latents_bytes_per_sample"] = {
        "two_copies": stored / bench.batch, "one_chain": stored / bench.batch * (STEPS + 1) / (2 * STEPS)}
    return result


def scaling(repeats: int) -> dict:
    """Epoch time (sample B, decode, reward, train on TRAIN_STEPS steps) on model=tiny as one knob moves."""
    family = load("tiny")
    sweeps = {"batch size": ("batch", [4, 8, 16, 32]), "denoising steps": ("steps", [5, 10, 20, 40]),
              "resolution (px)": ("resolution", [32, 64, 96])}
    out = {}
    for title, (knob, values) in sweeps.items():
        out[title] = {"values": values, "seconds": [], "spread": []}
        for value in values:
            bench = Bench(family, **{knob: value})
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
        flow = model in FLOW_MODELS
        bench = (FlowBench if flow else Bench)(load(model))
        report["models"][model] = {"floor": floor(bench, args.repeats)}
        if flow:
            report["models"][model]["work"] = {"sampler": f"flow ({bench.sampler.sde_type})", "eta": FLOW_ETA,
                                               "lora_rank": 4, "lora_alpha": FLOW_LORA_ALPHA,
                                               "lora_targets": FLOW_TARGETS}
        if model in args.lever_models.split(",") and not flow:   # the levers are UNet settings
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
