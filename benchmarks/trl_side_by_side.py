"""rlfuse DDPO against TRL 0.23.1's DDPOTrainer on identical work, side by side.

    python benchmarks/trl_side_by_side.py            # --quick (the default): model=tiny, 3 pairs of runs
    python benchmarks/trl_side_by_side.py --full     # tiny and toy, 3 pairs of 10 epochs (about 10 minutes)

Both sides load the same pipeline folder (model=tiny saved to a folder, or model=toy's shipped
rlfuse/toy/pretrained), draw prompts from the same list (simple_animals), and run the same work
per epoch: sample_batch_size x batches DDIM samples of num_steps steps with classifier-free
guidance, the JPEG compressibility reward (rlfuse's JpegReward on both sides), per-prompt
advantages (buffer 16, min count 16: TRL's defaults), PPO (clip 1e-4, advantages clipped to 5,
lr 3e-4, AdamW) on LoRA rank 4 on the attention projections (TRL's fixed target modules), a
fraction of the timesteps, one inner epoch, one optimizer step per minibatch.

Each run is its own process with torch pinned to one thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1)), so that other jobs on the machine slow both sides alike; the sides
alternate (rlfuse, TRL, rlfuse, TRL, ...) and the figures are per-pair ratios rlfuse / TRL,
reported as median, min and max over the pairs. Per epoch: sampling time (rollout, decode,
reward), training time, total, in the process's CPU time by default (--clock cpu: with one thread,
the time on a core of its own, so other jobs' load hardly moves it; --clock wall for elapsed
time); per run: peak RSS of the process (getrusage) and the rewards.
The first epoch is a warm-up and is not timed. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
# cpu: the process's CPU time (one thread, so the time the work takes on a core of its own, whatever
# else the machine runs); wall: elapsed time.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
TOY_FOLDER = ROOT / "rlfuse" / "toy" / "pretrained"

# The shared work of one epoch (both sides read these).
WORK = {"sample_batch_size": 8, "batches_per_epoch": 2, "train_batch_size": 4, "num_steps": 10,
        "guidance_scale": 5.0, "eta": 1.0, "timestep_fraction": 0.5, "lora_rank": 4,
        "learning_rate": 3e-4, "clip_range": 1e-4, "adv_clip_max": 5.0, "buffer_size": 16, "min_count": 16,
        "prompts": "simple_animals", "reward": "jpeg compressibility (-kB at quality 95)"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ----------------------------------------------------------------------------- one side, in this process


def run_rlfuse(folder: str, epochs: int, seed: int, run_root: str, clock) -> dict:
    """python -m rlfuse.train with the shared work; per-epoch times from its metrics.jsonl (its
    perf_counter replaced by `clock`)."""
    import types

    from rlfuse import train as rlfuse_train

    rlfuse_train.time = types.SimpleNamespace(perf_counter=clock)

    w = WORK
    overrides = [
        "model=tiny", f"model.pretrained={folder}", "model.finetune=lora", f"model.lora.rank={w['lora_rank']}",
        f"model.lora.alpha={w['lora_rank']}", "model.lora.target_modules=[to_k,to_q,to_v,to_out.0]",
        "reward=jpeg", f"prompts={w['prompts']}", "algorithm=ddpo",
        f"algorithm.learning_rate={w['learning_rate']}", f"algorithm.objective.clip_range={w['clip_range']}",
        f"algorithm.objective.adv_clip_max={w['adv_clip_max']}", "algorithm.objective.advantages=per_prompt",
        f"algorithm.objective.buffer_size={w['buffer_size']}", f"algorithm.objective.min_count={w['min_count']}",
        f"algorithm.timestep_fraction={w['timestep_fraction']}", "algorithm.min_step_std=0", "algorithm.inner_epochs=1",
        f"hardware.sample_batch_size={w['sample_batch_size']}", f"hardware.train_batch_size={w['train_batch_size']}",
        f"sample.batches_per_epoch={w['batches_per_epoch']}", f"sample.num_steps={w['num_steps']}",
        f"sample.guidance_scale={w['guidance_scale']}", f"sample.eta={w['eta']}", "sample.images_per_prompt=1",
        f"epochs={epochs}", f"seed={seed}", "eval.every=0", "log.images_every=0", f"checkpoint.every={epochs + 1}",
        "progress=false", f"run_root={run_root}",
    ]
    sys.argv = ["rlfuse.train", *overrides]
    setup_start = time.perf_counter()
    try:
        rlfuse_train.main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    metrics_file = next(Path(run_root).glob("**/metrics.jsonl"))
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return {"sample_seconds": [r["sample_seconds"] for r in rows], "train_seconds": [r["train_seconds"] for r in rows],
            "epoch_seconds": [r["seconds"] for r in rows], "reward_mean": [r["reward_mean"] for r in rows],
            "wall_seconds": time.perf_counter() - setup_start}


def run_trl(folder: str, epochs: int, seed: int, run_root: str, clock) -> dict:
    """TRL's DDPOTrainer with the same work; sampling and training timed by wrapping its two phases."""
    import numpy as np
    import torch
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from rlfuse.prompts import load_prompts
    from rlfuse.rewards.jpeg import JpegReward

    PartialState(cpu=True)
    w = WORK
    prompts = load_prompts(w["prompts"])
    prompt_rng = np.random.default_rng(seed)
    reward = JpegReward("compressibility")

    def prompt_fn():
        return prompts[int(prompt_rng.integers(len(prompts)))], {}

    def reward_fn(images, batch_prompts, metadata):
        return reward(images.float(), list(batch_prompts)).scores, {}

    config = DDPOConfig(
        num_epochs=epochs, seed=seed, mixed_precision="no", accelerator_kwargs={"cpu": True},
        project_kwargs={"project_dir": run_root, "logging_dir": run_root}, logdir=run_root, log_with=None,
        sample_num_steps=w["num_steps"], sample_eta=w["eta"], sample_guidance_scale=w["guidance_scale"],
        sample_batch_size=w["sample_batch_size"], sample_num_batches_per_epoch=w["batches_per_epoch"],
        train_batch_size=w["train_batch_size"], train_learning_rate=w["learning_rate"],
        train_clip_range=w["clip_range"], train_adv_clip_max=w["adv_clip_max"],
        train_timestep_fraction=w["timestep_fraction"], train_num_inner_epochs=1,
        train_gradient_accumulation_steps=1, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=w["buffer_size"], per_prompt_stat_tracking_min_count=w["min_count"],
        save_freq=10**6, train_use_8bit_adam=False,
    )
    setup_start = time.perf_counter()
    pipeline = DefaultDDPOStableDiffusionPipeline(folder, use_lora=True)
    pipeline.set_progress_bar_config(disable=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    times = {"sample": 0.0, "train": 0.0}
    generate, train_batches, compute_rewards = (trainer._generate_samples, trainer._train_batched_samples,
                                                trainer.compute_rewards)

    def timed(phase, fn):
        def wrapper(*args, **kwargs):
            start = clock()
            out = fn(*args, **kwargs)
            times[phase] += clock() - start
            return out
        return wrapper

    trainer._generate_samples = timed("sample", generate)
    trainer.compute_rewards = timed("sample", compute_rewards)   # rlfuse's sample time includes the reward
    trainer._train_batched_samples = timed("train", train_batches)
    rewards = []
    log = trainer.accelerator.log

    def capture(values, step=None, **kwargs):
        if "reward_mean" in values:
            rewards.append(float(values["reward_mean"]))
        return log(values, step=step, **kwargs)

    trainer.accelerator.log = capture
    result = {"sample_seconds": [], "train_seconds": [], "epoch_seconds": [], "reward_mean": []}
    global_step = 0
    for epoch in range(epochs):
        times.update(sample=0.0, train=0.0)
        start = clock()
        global_step = trainer.step(epoch, global_step)
        result["epoch_seconds"].append(clock() - start)
        result["sample_seconds"].append(times["sample"])
        result["train_seconds"].append(times["train"])
    result["reward_mean"] = rewards
    result["wall_seconds"] = time.perf_counter() - setup_start
    del torch
    return result


def child(args: argparse.Namespace) -> None:
    """One run of one side; prints a JSON line with its per-epoch figures and peak RSS."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_root:
        run = run_rlfuse if args.side == "rlfuse" else run_trl
        result = run(args.folder, args.epochs, args.seed, run_root, CLOCKS[args.clock])
    result.update(side=args.side, peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the driver


def run_child(side: str, folder: str, epochs: int, seed: int, clock: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", side, "--folder", folder, "--epochs", str(epochs),
                          "--seed", str(seed), "--clock", clock], env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{side} run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def compare(model: str, folder: str, pairs: int, epochs: int, clock: str) -> dict:
    runs = {"rlfuse": [], "trl": []}
    for i in range(pairs):
        order = ("rlfuse", "trl") if i % 2 == 0 else ("trl", "rlfuse")   # alternate which side goes first
        for side in order:
            result = run_child(side, folder, epochs, seed=i, clock=clock)
            runs[side].append(result)
            timed = slice(1, None)  # epoch 1 is the warm-up
            print(f"  {model} pair {i + 1}/{pairs} {side:6s}: epoch {statistics.median(result['epoch_seconds'][timed]):.3f} s"
                  f" (sample {statistics.median(result['sample_seconds'][timed]):.3f}, train "
                  f"{statistics.median(result['train_seconds'][timed]):.3f}), peak RSS {result['peak_rss_mb']:.0f} MB, "
                  f"last reward {result['reward_mean'][-1]:.3f}", flush=True)
    summary = {"model": model, "folder": str(folder), "pairs": pairs, "epochs": epochs, "runs": runs}
    for key in ("sample_seconds", "train_seconds", "epoch_seconds"):
        per_run = {side: [statistics.median(r[key][1:]) for r in runs[side]] for side in runs}
        summary[key] = {side: spread(values) for side, values in per_run.items()}
        summary[key]["ratio"] = spread([a / b for a, b in zip(per_run["rlfuse"], per_run["trl"])])
    rss = {side: [r["peak_rss_mb"] for r in runs[side]] for side in runs}
    summary["peak_rss_mb"] = {side: spread(values) for side, values in rss.items()}
    summary["peak_rss_mb"]["ratio"] = spread([a / b for a, b in zip(rss["rlfuse"], rss["trl"])])
    # Reward curves: mean over runs per epoch, and the last epoch's spread over runs.
    for side in runs:
        curves = [r["reward_mean"] for r in runs[side]]
        summary.setdefault("reward_curve", {})[side] = [statistics.mean(c[e] for c in curves) for e in range(epochs)]
        last = [c[-1] for c in curves]
        summary.setdefault("final_reward", {})[side] = {
            "mean": statistics.mean(last), "stdev": statistics.stdev(last) if len(last) > 1 else 0.0, "n": len(last),
            "gain_over_epoch_1": statistics.mean(c[-1] - c[0] for c in curves)}
    return summary


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="model=tiny, 3 pairs of 5 epochs (the default)")
    parser.add_argument("--full", action="store_true", help="tiny and toy, 3 pairs, 10 epochs (default, quick: tiny, 3 pairs, 5 epochs)")
    parser.add_argument("--pairs", type=int, default=None, help="alternating pairs of runs per model")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (the first is a warm-up)")
    parser.add_argument("--models", default=None, help="comma-separated: tiny,toy")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust to other jobs' load; default) | wall: elapsed time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trl_side_by_side.json"))
    parser.add_argument("--child", choices=("rlfuse", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return

    pairs = args.pairs or 3
    epochs = args.epochs or (10 if args.full else 5)
    models = (args.models or ("tiny,toy" if args.full else "tiny")).split(",")
    import torch

    from rlfuse.families.tiny import build_tiny_pipeline

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = load_average()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_folder = Path(tmp) / "tiny"
        build_tiny_pipeline(seed=0).save_pretrained(tiny_folder)
        for model in models:
            folder = tiny_folder if model == "tiny" else TOY_FOLDER
            print(f"{model}: {pairs} alternating pairs x {epochs} epochs ({folder})", flush=True)
            results.append(compare(model, str(folder), pairs, epochs, args.clock))
    import trl

    report = {
        "benchmark": "rlfuse DDPO vs TRL DDPOTrainer, identical work, ratios rlfuse / TRL per alternating pair",
        "work": WORK, "clock": args.clock, "results": results,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads_per_run": 1, "platform": platform.platform(),
                    "torch": torch.__version__, "trl": trl.__version__, "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_average()},
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['model']}: rlfuse / TRL (median [min, max] of {r['pairs']} pairs): "
              f"epoch {r['epoch_seconds']['ratio']['median']:.2f} [{r['epoch_seconds']['ratio']['min']:.2f}, "
              f"{r['epoch_seconds']['ratio']['max']:.2f}], sampling {r['sample_seconds']['ratio']['median']:.2f}, "
              f"training {r['train_seconds']['ratio']['median']:.2f}, peak RSS {r['peak_rss_mb']['ratio']['median']:.2f}; "
              f"final reward rlfuse {r['final_reward']['rlfuse']['mean']:.3f} ± {r['final_reward']['rlfuse']['stdev']:.3f}, "
              f"TRL {r['final_reward']['trl']['mean']:.3f} ± {r['final_reward']['trl']['stdev']:.3f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
