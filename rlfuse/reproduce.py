"""Run the papers' experiments (conf/experiment/) and write one report comparing them with the papers.

    python -m rlfuse.reproduce --scale paper   # GPUs and hub weights: the published settings
    python -m rlfuse.reproduce --scale toy     # the same experiments on the CPU, model=toy / tiny / toy_flow
    (make reproduce-paper [SCALE=toy])

Each experiment is `python -m rlfuse.train experiment=<name> ...` (under `accelerate launch` on
several GPUs), then `python -m rlfuse.evaluate <run> --rewards ...`; <out>/REPORT.md collects them.
At paper scale without a GPU or without the weights it stops at once, saying what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlfuse.cli import fail
from rlfuse.errors import UserError

# name -> (paper and where, the paper's published number (shown in REPORT.md), evaluation rewards at paper scale).
# The numbers and their sources are in each experiment file's header (conf/experiment/<name>.yaml). `http` is the
# experiment's own scorer server (GenEval, OCR): evaluate with --set http.fn.url=<its address>.
EXPERIMENTS = {
    "ddpo_sd15_compressibility": ("DDPO (Black et al. 2023), sec. 6.1", "JPEG kB: curve only (fig. 4), no number in the text", "jpeg,aesthetic,alignment,diversity"),
    "ddpo_sd15_incompressibility": ("DDPO (Black et al. 2023), sec. 6.1", "JPEG kB: curve only (fig. 4), no number in the text", "jpeg,aesthetic,alignment,diversity"),
    "ddpo_sd15_aesthetic": ("DDPO (Black et al. 2023), sec. 6.1, App. B", "aesthetic 5.95 -> 6.63 (App. B Tab. 1, prompt 'wolf', SD 1.4; curve: fig. 4)", "aesthetic,imagereward,alignment,jpeg,diversity"),
    "ddpo_sd15_alignment": ("DDPO (Black et al. 2023), sec. 6.2", "LLaVA BERTScore: curve only (fig. 5), no number in the text (here CLIP score)", "alignment,imagereward,aesthetic,diversity"),
    "d3po_sd15_compressibility": ("D3PO (Yang et al. 2024), sec. 5.1", "JPEG kB: curve only (fig. 3)", "jpeg,aesthetic,alignment,diversity"),
    "d3po_sd15_incompressibility": ("D3PO (Yang et al. 2024), sec. 5.1", "JPEG kB: curve only (fig. 3)", "jpeg,aesthetic,alignment,diversity"),
    "d3po_sd15_aesthetic": ("D3PO (Yang et al. 2024), sec. 5.1", "aesthetic: curve only (fig. 3)", "aesthetic,imagereward,alignment,jpeg,diversity"),
    "d3po_sd15_human_distortion": ("D3PO (Yang et al. 2024), sec. 5.2.1", "human judgement: curves only (fig. 4, hand normalcy and anime deformity rates)", "imagereward,aesthetic,alignment,diversity"),
    "d3po_sd15_human_safety": ("D3PO (Yang et al. 2024), sec. 5.2.2", "human judgement: curve only (fig. 5, safety rate)", "imagereward,aesthetic,alignment,diversity"),
    "d3po_sd15_human_alignment": ("D3PO (Yang et al. 2024), sec. 5.2.3", "CLIP 30.7 -> 31.9, BLIP 1.95 -> 2.06, ImageReward 0.04 -> 0.27, human preference 14.7% -> 55.7% (Tab. 1)", "alignment,imagereward,aesthetic,diversity"),
    "dpok_sd15_imagereward": ("DPOK (Fan et al. 2023)", "secondary source, not checked against the paper: ImageReward 0.23 -> 1.10 joint, 1.25 per prompt (v1 four-prompt table)", "imagereward,aesthetic,alignment,diversity"),
    "dpok_sd15_drawbench": ("DPOK (Fan et al. 2023), multi-prompt", "secondary source, not checked against the paper: DrawBench ImageReward 0.13 -> 0.58, aesthetic 5.31 -> 5.35 (v3 Table 1)", "imagereward,aesthetic,alignment,diversity"),
    "largescale_sd15_multi": ("Large-scale RL (Zhang et al. 2024)", "SD 2 -> ours, DiffusionDB: ImageReward 0.170 -> 0.845, aesthetic 5.783 -> 5.918 (Tab. 1); joint ImageReward 0.273 -> 0.701 (Tab. 5)", "imagereward,aesthetic,alignment,diversity"),
    "flowgrpo_sd35m_pickscore": ("Flow-GRPO (Liu et al. 2025), human preference alignment", "secondary source, not checked against the paper: PickScore 21.72 -> 23.31 (main results table as copied in the DGPO README)", "pickscore,aesthetic,imagereward,diversity"),
    "flowgrpo_sd35m_geneval": ("Flow-GRPO (Liu et al. 2025), compositional image generation", "GenEval 0.63 -> 0.95 (abstract; main results table as copied in the DGPO README; curve: fig. 1)", "http,pickscore,aesthetic,imagereward,diversity"),
    "flowgrpo_sd35m_ocr": ("Flow-GRPO (Liu et al. 2025), visual text rendering", "OCR accuracy 0.59 -> 0.92 (abstract; main results table as copied in the DGPO README)", "http,pickscore,aesthetic,imagereward,diversity"),
}

# ---- Toy scale: the same experiments on the CPU in minutes. What changes, and why:
# Scale: 8 samples of 10 sampler steps per epoch (16 where TOY_MODEL or TOY_ALGORITHM says so), one process,
# TOY_EPOCHS[model] epochs (as many as learning took on each model, docs/results.md), a held-out curve of 32 images
# during training.
TOY_EPOCHS = {"tiny": 12, "toy": 20, "toy_flow": 20}
TOY_COMMON = [
    "hardware=cpu", "sample.num_steps=10", "sample.batches_per_epoch=1",
    "hardware.sample_batch_size=8", "hardware.train_batch_size=4", "algorithm.gradient_accumulation_steps=1",
    "algorithm.timestep_fraction=1.0", "eval.num_images=32", "checkpoint.every=1000",
    "log.images_every=0", "progress=false", "model.finetune=full",
]
# The evaluation after training (both scales): every held-out prompt (up to 133: the shapes world's held-out set)
# x 2 images, base and fine-tuned from the same noise, so that a change of a few hundredths shows beyond two
# standard errors of the paired difference. A subset misleads: on the first 32 shapes captions x 4 images
# a DPOK run fell by 0.05 while the same weights rose by 0.04 on all 133 captions.
EVAL_SIZE = ["--num-prompts", "133", "--images-per-prompt", "2"]
# Experiments on one base model with the same evaluation draw the same base images: the first evaluation keeps
# them here (rlfuse.evaluate --base-cache) and the others reuse them. Emptied at the start of every invocation, so
# that entries of earlier code or models do not pile up.
BASE_CACHE = "base_cache"
TINY_CLIP = ["fn.clip_model=rlfuse-tiny-clip", "fn.clip_pretrained=null"]
# Models: JPEG compressibility needs no weights and runs on model=tiny (random, learns JPEG size in a minute);
# incompressibility runs on model=toy: tiny's noise images already sit near the largest JPEG size a 32 px image
# reaches, and training only drifted them (DDPO -0.006 kB, D3PO -0.016), while toy's white backgrounds leave
# room (DDPO and D3PO at lr 1e-4, 20 epochs: 1.03 -> 1.18 and 1.04 -> 1.21 kB on 64 held-out images);
# learned reward models (aesthetic, CLIP, ImageReward) have no weights here, so those experiments run
# on model=toy (the shipped shapes-world model) with reward=shapes, the exact checker standing in for
# the reward model. The multi-reward experiment keeps reward=multi with shapes + diversity terms.
# Flow-model experiments (model.family sd3 or flux: Flow-GRPO's) run on model=toy_flow (the shipped shapes-world
# flow model) with reward=jpeg (compressibility) on the shapes captions, whatever their paper reward: PickScore has
# no weights here, GenEval and OCR need the user's scorer server, and GRPO did not raise toy_flow's shapes score
# (20 epochs of 16: -0.014, 1.2 standard errors; docs/performance.md has 40-epoch runs). model=tiny_sd3's random
# noise images did not move in JPEG size (16 or 48 epochs, +0.001 / -0.003 kB). Groups of 4 instead of 24, 16
# samples per epoch, evaluated at the 10 sampling steps (Flow-GRPO evaluates at 40: four times the minutes).
TOY_MODEL = {
    "jpeg": ["model=tiny"],
    "incompressible": ["model=toy", "prompts=shapes"],
    "learned": ["model=toy", "prompts=shapes", "reward=shapes"],
    "multi": ["model=toy", "prompts=shapes", "~reward.fn.terms.imagereward", "~reward.fn.terms.aesthetic",
              "~reward.fn.terms.alignment", "+reward.fn.terms.shapes.weight=1.0",
              "+reward.fn.terms.shapes.fn._target_=rlfuse.rewards.shapes.ShapesReward",
              "reward.fn.terms.diversity.weight=0.5", *(f"reward.fn.terms.diversity.{o}" for o in TINY_CLIP)],
    "flow": ["model=toy_flow", "prompts=shapes", "reward=jpeg", "sample.images_per_prompt=4",
             "sample.batches_per_epoch=2", "eval.num_steps=10"],
}
# Learning settings measured to move these small models (docs/results.md; toy_flow with sample.eta=0.7 and
# guidance 4.5, Flow-GRPO's, from the experiment files); the papers' (LoRA, clip 1e-4, lr 3e-4, Flow-GRPO's KL)
# barely move them in a few epochs, except Flow-GRPO's LoRA and lr on toy_flow (with clip 0.2 and no KL).
TOY_ALGORITHM = {
    ("ddpo", "tiny"): ["algorithm.learning_rate=1e-2", "algorithm.objective.clip_range=0.2", "algorithm.objective.adv_clip_max=2.0"],
    ("d3po", "tiny"): ["algorithm.learning_rate=3e-3"],  # 1e-2 at 8 samples per epoch: NaN gradients by epoch 4
    ("dpok", "tiny"): ["algorithm.learning_rate=3e-3", "algorithm.objective.clip_range=0.2"],
    ("ddpo", "toy"): ["algorithm.learning_rate=1e-5", "algorithm.objective.clip_range=0.2", "algorithm.objective.adv_clip_max=2.0"],
    # D3PO on the shapes score: 8 pairs per epoch, the 6 noisiest of 10 steps (4 pairs, every step: flat, half the
    # pairs tie; lr 2e-5 falls)
    ("d3po", "toy"): ["algorithm.learning_rate=1e-5", "algorithm.min_step_std=0.4", "sample.batches_per_epoch=2"],
    # DPOK's objective (policy gradient + its KL penalty) on DDPO's schedule: on-policy passes over groups of 4
    # images at guidance 5, the noisiest steps. DPOK's own schedule (a replay buffer of single transitions, a value
    # function learned from scratch) did not move the toy model in 20 epochs, nor did guidance 7.5 with its 0.1 clip
    # of the gradient norm (docs/results.md).
    ("dpok", "toy"): ["algorithm.learning_rate=1e-5", "algorithm.objective.clip_range=0.2", "algorithm.min_step_std=0.4",
                      "algorithm.objective.baseline=per_prompt", "algorithm.objective.buffer_size=4",
                      "algorithm.objective.min_count=4", "algorithm.objective.replay_buffer.capacity=0",
                      "sample.images_per_prompt=4", "sample.guidance_scale=5.0", "algorithm.max_grad_norm=1.0"],
    # Flow-GRPO's own LoRA (model=toy_flow's r16) at its lr 3e-4; full fine-tuning at 1e-4 rose on seed 0 and not
    # on seed 1
    ("grpo", "toy_flow"): ["model.finetune=lora", "algorithm.learning_rate=3e-4", "algorithm.timestep_fraction=0.5",
                           "algorithm.objective.clip_range=0.2", "algorithm.objective.beta=0.0"],
    # by kind, before the model's: JPEG size on model=toy moves at ten times the shapes score's learning rate
    ("ddpo", "incompressible"): ["algorithm.learning_rate=1e-4", "algorithm.objective.clip_range=0.2",
                                 "algorithm.objective.adv_clip_max=2.0"],
    ("d3po", "incompressible"): ["algorithm.learning_rate=1e-4"],
}
# Minutes of one toy-scale experiment (training and evaluation, one thread, 2-core AMD EPYC), by model: the order
# in which they start, longest first.
TOY_MINUTES = {"toy": 3.6, "toy_flow": 2.0, "tiny": 1.1}
# The toy model of each kind (the key of TOY_ALGORITHM and TOY_EVAL).
TOY_MODEL_NAME = {"jpeg": "tiny", "incompressible": "toy", "learned": "toy", "multi": "toy", "flow": "toy_flow"}
# Evaluation rewards at toy scale: the trained one and ones it never saw (random tiny CLIP: a check of
# the machinery, not of taste).
TOY_EVAL = {
    "tiny": ("jpeg,alignment,diversity", [f"{r}.{o}" for r in ("alignment", "diversity") for o in TINY_CLIP]),
    "toy": ("shapes,jpeg,diversity", [f"diversity.{o}" for o in TINY_CLIP]),
    "toy_flow": ("jpeg,shapes,diversity", [f"diversity.{o}" for o in TINY_CLIP]),
}


def experiment_config(name: str, overrides: list[str] = ()):
    from rlfuse.cli import check_overrides

    return check_overrides("train", [f"experiment={name}", *overrides])


def toy_kind(cfg) -> str:
    """jpeg | incompressible | learned | multi (Stable Diffusion experiments, by reward) | flow (flow-model
    experiments)."""
    if cfg.model.get("family", "sd") != "sd":
        return "flow"
    if cfg.reward.name == "jpeg":
        return "incompressible" if cfg.reward.fn.objective == "incompressibility" else "jpeg"
    return "multi" if cfg.reward.name == "multi" else "learned"


def foreign_keys(cfg, overrides: list[str]) -> list[str]:
    """Overrides removing the keys an experiment file added to a group that `overrides` switch to another
    choice, which that choice lacks (Flow-GRPO's reward.url and reward.fn.url when reward=http becomes
    reward=jpeg): Hydra keeps an experiment file's values over a command-line group choice."""
    from omegaconf import DictConfig, OmegaConf

    from rlfuse.cli import CONF_DIR, config_groups

    def extra(node, own, prefix: str) -> list[str]:
        found = []
        for key, value in node.items_ex(resolve=False):
            if not isinstance(own, DictConfig) or key not in own:
                found.append(f"{prefix}{key}")
            elif isinstance(value, DictConfig):
                found += extra(value, own[key], f"{prefix}{key}.")
        return found

    groups, found = set(config_groups()), []
    for override in overrides:
        group, _, choice = override.partition("=")
        if group in groups and (CONF_DIR / group / f"{choice}.yaml").exists():
            found += extra(cfg[group], OmegaConf.load(CONF_DIR / group / f"{choice}.yaml"), f"{group}.")
    def missing(key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        return OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf)

    # Hydra deletes only a key that has a value: a ??? key gets a placeholder first; the deepest keys go first, so
    # that an interpolation (reward.fn.url: ${reward.url}) is gone before the key it reads.
    placeholders = [f"{key}=unused" for key in found if missing(key)]
    return [*placeholders, *(f"~{key}" for key in sorted(found, key=lambda k: -k.count(".")))]


def last_wins(overrides: list[str]) -> list[str]:
    """The overrides with each key set once, to its last value, in the place of its first setting (TOY_MODEL and
    TOY_ALGORITHM refine TOY_COMMON). A key set again with another prefix (a=1 then ~a or +a=2) is a mistake in
    the tables above: ValueError."""
    values: dict[str, str] = {}
    for override in overrides:
        key = override.partition("=")[0]
        bare = key.lstrip("~+")
        if bare in values and (key != bare or values[bare].partition("=")[0] != bare):
            raise ValueError(f"{override}: {bare} is set again with another form ({values[bare]}); set it one way")
        values[bare] = override
    return list(values.values())


def toy_overrides(name: str) -> tuple[list[str], str, list[str]]:
    """(train overrides, evaluation rewards, evaluation settings) of an experiment at toy scale."""
    cfg = experiment_config(name)
    kind = toy_kind(cfg)
    model = TOY_MODEL_NAME[kind]
    epochs = TOY_EPOCHS[model]
    overrides = last_wins([*TOY_COMMON, f"epochs={epochs}", f"eval.every={max(1, epochs // 4)}", *TOY_MODEL[kind],
                           *(TOY_ALGORITHM.get((cfg.algorithm.name, kind)) or TOY_ALGORITHM[(cfg.algorithm.name, model)])])
    overrides += foreign_keys(experiment_config(name, overrides), overrides)
    rewards, settings = TOY_EVAL[model]
    if kind in ("jpeg", "incompressible", "flow"):  # evaluate under the objective the run trained on
        settings = [*settings, f"jpeg.fn.objective={experiment_config(name, overrides).reward.fn.objective}"]
    return overrides, rewards, settings


def needs_inputs(name: str) -> str | None:
    """What an experiment needs from the user before it can run, or None: its ??? keys (labels, a prompt file,
    a reward server's address), e.g. "reward.url, prompts.train"."""
    from omegaconf import OmegaConf

    from rlfuse.config import missing_keys

    missing = missing_keys(OmegaConf.to_container(experiment_config(name), resolve=False))
    return ", ".join(missing) or None


def check_paper_scale(names: list[str]) -> int:
    """The number of GPUs; raises UserError at once when paper scale cannot run here (no GPU, or the base
    weights of an experiment that needs nothing from the user are not to be had)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("reproduce-paper at paper scale needs CUDA GPUs (8 for the published batch sizes; found none) "
                        "and the hub weights (stable-diffusion-v1-5, stable-diffusion-3.5-medium, CLIP ViT-L/14, the "
                        "LAION aesthetic predictor, ImageReward, PickScore); on this machine run "
                        "`make reproduce-paper SCALE=toy`")
    from rlfuse.config import family_of

    checked = set()
    for cfg in (experiment_config(name) for name in names if not needs_inputs(name)):
        if (cfg.model.pretrained, cfg.model.revision) not in checked:
            family_of(cfg).check_source(cfg.model.pretrained, cfg.model.revision)
            checked.add((cfg.model.pretrained, cfg.model.revision))
    return torch.cuda.device_count()


def run(command: list[str], log_file: Path, env: dict[str, str]) -> float:
    """Run a command, its output to log_file; returns seconds. Raises UserError when it fails."""
    start = time.perf_counter()
    with log_file.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log_file.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"`{' '.join(command[:6])} ...` failed (exit {result.returncode}): {tail[0]} (log: {log_file})")
    return time.perf_counter() - start


def reproduce(scale: str, out: Path, only: list[str], jobs: int = 1) -> Path:
    """Run the experiments (all, or `only`), `jobs` at a time, and write <out>/REPORT.md; returns its path."""
    names = only or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise UserError(f"--only {unknown[0]}: no such experiment; valid: {', '.join(EXPERIMENTS)}")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give 1 or more experiments to run at a time")
    gpus = check_paper_scale(names) if scale == "paper" else 0
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / BASE_CACHE, ignore_errors=True)  # no entries of earlier invocations pile up
    start = time.perf_counter()
    # Experiments at a time share the CPU cores: each process gets its share of threads.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plans = [plan(name, scale) for name in names]  # composes configs: Hydra's global state, one thread
    # Experiments whose runs would be identical (at toy scale several papers' tasks map to one run) run once.
    first: dict[str, dict] = {}
    for p in plans:
        p["same_as"] = first.setdefault(p["key"], p)["name"] if p["key"] else p["name"]
    # The longest first, so that the last ones to start are short and the jobs end together.
    unique = sorted((p for p in plans if p["same_as"] == p["name"]), key=lambda p: -p["minutes"])
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each experiment is subprocesses: threads only wait
        done = dict(zip([p["name"] for p in unique], pool.map(lambda p: run_experiment(p, out, gpus, threads), unique)))
    results = [done[p["name"]] if p["same_as"] == p["name"] else shared_row(p["name"], done[p["same_as"]])
               for p in plans]
    total = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"scale": scale, "seconds": total, "jobs": jobs,
                                                  "results": results}, indent=2))
    (out / "REPORT.md").write_text(render(scale, results, total, jobs))
    return out / "REPORT.md"


def plan(name: str, scale: str) -> dict:
    """What run_experiment needs of an experiment: its training overrides, evaluation rewards and settings, and
    what it still needs from the user (None: it can run)."""
    rewards = EXPERIMENTS[name][2]
    missing = needs_inputs(name) if scale == "paper" else None
    overrides, settings, minutes = [], [], 0.0
    if scale == "toy":
        if experiment_config(name).feedback.name == "human":
            missing = "feedback.path (a labelled dataset: people's choices)"
        else:
            overrides, rewards, settings = toy_overrides(name)
    key = None  # what makes two runs the same: the composed config and the evaluation (None: nothing is run)
    if not missing:
        from omegaconf import OmegaConf

        cfg = experiment_config(name, overrides)
        key = json.dumps([OmegaConf.to_container(cfg, resolve=False), rewards, settings], sort_keys=True)
        minutes = TOY_MINUTES.get(cfg.model.name, 1.0) if scale == "toy" else 0.0
    return {"name": name, "scale": scale, "missing": missing, "overrides": overrides, "rewards": rewards,
            "settings": settings, "key": key, "minutes": minutes}


def shared_row(name: str, row: dict) -> dict:
    """The report row of an experiment whose run is the same as `row`'s: its results, under its own name."""
    paper, published, _ = EXPERIMENTS[name]
    shared = {**row, "experiment": name, "paper": paper, "published": published, "same_as": row["experiment"]}
    if row["status"] == "done":
        print(f"{name}: the same run as {row['experiment']}", flush=True)
    return shared


def run_experiment(plan: dict, out: Path, gpus: int, threads: int) -> dict:
    """Train and evaluate one planned experiment; its row of the report (status "done", "not run: ..." or
    "failed: ..."). Runs only subprocesses: safe in a thread."""
    python, name, scale = sys.executable, plan["name"], plan["scale"]
    paper, published, _ = EXPERIMENTS[name]
    row = {"experiment": name, "paper": paper, "published": published}
    missing, overrides, rewards, settings = plan["missing"], plan["overrides"], plan["rewards"], plan["settings"]
    if missing:
        row["status"] = f"not run: needs {missing}"
        print(f"{name}: {row['status']}", flush=True)
        return row
    run_root = out / "runs" / name
    shutil.rmtree(run_root, ignore_errors=True)  # a fresh run each time (this driver's own folder)
    accelerate = str(Path(python).parent / "accelerate")
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", str(gpus)] if gpus > 1 else [python]
    evaluation = out / "evaluations" / name
    env = {**os.environ} if scale == "paper" else {**os.environ, "OMP_NUM_THREADS": str(threads),
                                                   "MKL_NUM_THREADS": str(threads)}
    try:  # one failed experiment is reported, and the others still run
        train_seconds = run([*launcher, "-m", "rlfuse.train", f"experiment={name}", *overrides,
                             f"run_root={run_root}", "hydra.run.dir=" + str(run_root / "run")],
                            out / f"{name}.train.log", env)
        eval_seconds = run([python, "-m", "rlfuse.evaluate", str(run_root / "run"), "--rewards", rewards,
                            *(f"--set={s}" for s in settings), *EVAL_SIZE, "--out", str(evaluation),
                            "--base-cache", str(out / BASE_CACHE)],
                           out / f"{name}.evaluate.log", env)
    except UserError as error:
        row["status"] = f"failed: {str(error).replace('|', '/')}"
        print(f"{name}: {row['status']}", flush=True)
        return row
    report = json.loads((evaluation / "report.json").read_text())
    row.update(status="done", train_seconds=train_seconds, eval_seconds=eval_seconds, overrides=overrides,
               evaluation=str(evaluation.relative_to(out)), **{k: report[k] for k in ("reward", "model", "scores",
                                                                                        "diversity", "drift")},
               images=report["prompts"] * report["images_per_prompt"])
    row["curve"] = eval_curve(run_root / "run" / "metrics.jsonl")
    trained = report["scores"].get(report["reward"]) or next(iter(report["scores"].values()))
    print(f"{name}: {report['reward']} {trained['base']:.4f} -> {trained['finetuned']:.4f} "
          f"({trained['change'] / trained['stderr'] if trained['stderr'] else 0:+.1f} standard errors; "
          f"{train_seconds + eval_seconds:.0f} s)", flush=True)
    return row


def eval_curve(metrics_file: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [(r["epoch"], r["eval_reward_mean"]) for r in rows if "eval_reward_mean" in r]


def verdict(score: dict) -> str:
    """Whether a paired change (same seeds) shows beyond two standard errors: "rose", "fell" or "no clear change"."""
    if score["stderr"] > 0 and abs(score["change"]) > 2 * score["stderr"]:
        return "rose" if score["change"] > 0 else "fell"
    return "no clear change"


def render(scale: str, results: list[dict], seconds: float, jobs: int = 1) -> str:
    lines = [f"# Reproducing the papers ({scale} scale)", "",
             f"{sum(r['status'] == 'done' for r in results)} of {len(results)} experiments run "
             f"({sum(r['status'] == 'done' and not r.get('same_as') for r in results)} trainings: experiments that map "
             f"to the same run share it) in {seconds / 60:.1f} minutes, {jobs} at a time. Made by "
             f"`python -m rlfuse.reproduce --scale {scale} --jobs {jobs}`.", ""]
    if scale == "toy":
        epochs = ", ".join(f"{n} on `model={m}`" for m, n in TOY_EPOCHS.items())
        lines += ["Toy scale runs the papers' algorithms on models and rewards that fit a CPU; it shows that each "
                  "algorithm learns and that the whole path works (configs, training, evaluation, report), not the "
                  "papers' numbers: JPEG compressibility on `model=tiny` (random weights), incompressibility on `model=toy`, "
                  "learned-reward experiments on "
                  "`model=toy` with `reward=shapes` standing in for the reward model, flow-model (Flow-GRPO) "
                  "experiments on `model=toy_flow` with `reward=jpeg` (compressibility of the shapes captions' images) in "
                  f"place of theirs; epochs of 8 samples, 16 for D3PO on `model=toy` and for `model=toy_flow` ({epochs}), "
                  "full fine-tuning (LoRA on `model=toy_flow`) at the learning rates measured for these models. The "
                  f"verdict compares base and fine-tuned images from the same noise (up to {EVAL_SIZE[1]} held-out prompts "
                  f"x {EVAL_SIZE[3]} images). Unseen rewards on a random tiny CLIP check the machinery only.", ""]
    lines += ["| experiment | paper | published | trained reward: held-out during training | base -> fine-tuned "
              "(evaluation, same seeds; change ± its standard error) | verdict (beyond 2 standard errors) | "
              "other rewards (change) | diversity base -> tuned | drift (pixel RMS) | minutes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "done":
            lines.append(f"| {r['experiment']} | {r['paper']} | {r['published']} | {r['status']} | | | | | | |")
            continue
        trained = r["scores"].get(r["reward"]) or next(iter(r["scores"].values()))
        curve = " -> ".join(f"{v:.3f}" for _, v in r["curve"])
        others = ", ".join(f"{n} {v['change']:+.3f}" for n, v in r["scores"].items() if n != r["reward"])
        same = f" (the run of {r['same_as']})" if r.get("same_as") else ""
        lines.append(f"| [{r['experiment']}]({r['evaluation']}/REPORT.md){same} | {r['paper']} | {r['published']} | "
                     f"{r['reward']} ({r['model']}): {curve} | {trained['base']:.4f} -> {trained['finetuned']:.4f} "
                     f"({trained['change']:+.4f} ± {trained['stderr']:.4f}, {r['images']} images) | "
                     f"{verdict(trained)} | {others} | {r['diversity']['base']:.3f} -> "
                     f"{r['diversity']['finetuned']:.3f} | {r['drift']['pixel_rms']:.3f} | "
                     f"{0 if same else (r['train_seconds'] + r['eval_seconds']) / 60:.1f} |")
    lines += ["", "Published: the paper's own number where its text gives one, else the figure to read (most results "
              "are curves); each experiment file's header (`conf/experiment/<name>.yaml`) cites the source.",
              "", "Per experiment: `evaluations/<name>/REPORT.md` (scores, base | fine-tuned grids, training curves); "
              "logs in `<name>.train.log`, `<name>.evaluate.log`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlfuse.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("paper", "toy"), default="paper", help="paper: GPUs, hub weights | toy: CPU")
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"), help="report folder")
    parser.add_argument("--only", default="", help="comma-separated experiment names (default: all)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="experiments run at a time (default: one per CPU core at toy scale, 1 at paper scale)")
    args = parser.parse_args(argv)
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1) if args.scale == "toy" else 1
    try:
        report = reproduce(args.scale, args.out, [n for n in args.only.split(",") if n], jobs)
    except UserError as error:
        fail(str(error))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
