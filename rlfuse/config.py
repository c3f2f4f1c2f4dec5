"""From the Hydra config to plain objects: the start-up check (preflight), builders, and resume.

Every mistake a user can make in the config stops here, before any run folder is made or model
loaded, with one line naming the key and what would be valid (rlfuse.errors.UserError; the
command-line edge turns it into exit code 2). Only the top layer (train.py, sample.py, ...) and
this module read the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlfuse.errors import UserError, check

# Keys that may change between a run and its continuation: how long, how chatty, how resumed, where
# it logs, when it stops early.
RESUME_FREE_KEYS = ("resume", "epochs", "progress", "log", "early_stop")


# ----------------------------------------------------------------------------- generic checks


def missing_keys(node: object, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still '???' (OmegaConf's mandatory marker), without resolving anything."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in missing_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "???" else []


def check_complete(cfg: DictConfig) -> None:
    """Every ??? key is set and every interpolation resolves; else one line naming the key."""
    missing = missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise UserError(f"{', '.join(missing)}: required but not set; give it on the command line, e.g. {missing[0]}=...")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", "") or "the config"
        raise UserError(f"{key}: {str(error).splitlines()[0]}") from None


def build(node: DictConfig, key: str):
    """hydra.utils.instantiate with the constructor's complaint as one line naming the key."""
    import hydra.utils
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise UserError(f"{key}: {str(cause).strip().splitlines()[-1]}") from None


def build_reward(node: DictConfig, key: str, label: str, prompts: list[str] | None = None,
                 prompts_name: str = ""):
    """The reward of `node`, checked ready (weights present, server answering) and, when prompts are
    given, able to score them: fail at start-up, never mid-run. label names the reward in errors."""
    reward = build(node, key)
    if hasattr(reward, "check_ready"):
        try:
            reward.check_ready()
        except ValueError as error:
            raise UserError(f"{label}: {str(error).strip().splitlines()[0]}") from None
    if prompts is not None and hasattr(reward, "check_prompts"):  # rewards that only understand some prompts
        try:
            reward.check_prompts(prompts)
        except ValueError as error:
            raise UserError(f"{label} with prompts={prompts_name}: {error}") from None
    return reward


def family_of(cfg: DictConfig) -> type:
    from rlfuse.families import family_class

    return family_class(cfg.model.get("family", "sd"))  # run folders made before model.family existed: sd


def check_resolution(cfg: DictConfig) -> None:
    """model.resolution makes latents of a whole size: a multiple of the VAE's factor."""
    multiple = family_of(cfg).resolution_multiple(cfg.model.pretrained, cfg.model.revision)
    resolution = cfg.model.resolution
    check(resolution >= multiple and resolution % multiple == 0,
          f"model.resolution={resolution}: must be a positive multiple of {multiple} for model={cfg.model.name} "
          f"(its VAE's factor); use {max(multiple, resolution // multiple * multiple)}")


def trainable_steps(stds: torch.Tensor, min_step_std: float) -> torch.Tensor:
    """(T',) indices of the sampler steps whose std (stds: (T,)) is at least min_step_std and above 0:
    the steps trained on.

    A step's log-prob gradient is (x_{t-1} - mean) / std^2 * d mean / d eps: for a nearly deterministic
    step (the last DDIM steps: std 0.04 and 0.02 of 10 on the toy model, against 0.26-0.78) it is
    mostly sampler noise, 8x the others in size, and it dominates an update (docs/algorithms.md).
    """
    return torch.nonzero((stds >= min_step_std) & (stds > 0)).flatten()  # a deterministic step has no gradient


def check_hardware_config(hw: DictConfig, finetune: str) -> None:
    """The hardware choices can run here, and accelerate's launch flags do not contradict them."""
    from rlfuse.engine.hardware import check_hardware

    try:
        check_hardware(hw.strategy, hw.mixed_precision, hw.attention, hw.compile, hw.cpu, finetune,
                       hw.get("deepspeed", {}).get("zero_stage", 2), hw.get("fsdp", {}).get("version", 2))
    except ValueError as error:
        raise UserError(str(error)) from None
    for flag, strategy in (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp")):
        check(os.environ.get(flag, "false").lower() != "true" or hw.strategy == strategy,
              f"accelerate was launched for {strategy} but hardware.strategy={hw.strategy}: drop accelerate's "
              f"--use_{strategy} flag and choose hardware={'deepspeed_zero2' if strategy == 'deepspeed' else 'fsdp'}")


# ----------------------------------------------------------------------------- the training run


@dataclass
class Checked:
    """What the preflight built, so that the run does not build it again."""

    algorithm: object
    reward: object
    train_prompts: list[str]
    eval_prompts: list[str]
    trainable_steps: torch.Tensor   # (T',) the sampler steps that may be trained on
    replay: bool                    # feedback=human: the replay source instead of online sampling
    panel: dict = field(default_factory=dict)  # eval.rewards: {name: reward}, scored on held-out images only
    pairs: bool = False             # feedback=pairs: clean preference pairs (rlfuse/sources/pairs.py)


def check_numbers(cfg: DictConfig, likelihood_free: bool = False) -> None:
    """Counts, ranges and divisibility of the loop's settings (likelihood_free: the algorithm samples
    deterministically, so the sampler's noise does not matter)."""
    sample_cfg, algo, hw = cfg.sample, cfg.algorithm, cfg.hardware
    check(cfg.eval.get("eta") is None or cfg.eval.eta >= 0, f"eval.eta={cfg.eval.get('eta')}: must be >= 0")
    check(cfg.eval.get("num_steps") is None or cfg.eval.num_steps >= 1,
          f"eval.num_steps={cfg.eval.get('num_steps')}: must be >= 1, or null for sample.num_steps")
    for key in ("sample.num_steps", "sample.batches_per_epoch", "sample.images_per_prompt", "epochs",
                "hardware.sample_batch_size", "hardware.train_batch_size", "algorithm.inner_epochs",
                "algorithm.gradient_accumulation_steps", "checkpoint.every", "max_nonfinite_in_row"):
        check(OmegaConf.select(cfg, key) >= 1, f"{key}={OmegaConf.select(cfg, key)}: must be >= 1")
    check(sample_cfg.eta > 0 or likelihood_free,
          f"sample.eta={sample_cfg.eta}: must be > 0, or the sampler has no log-probabilities")
    check(0 < algo.timestep_fraction <= 1, f"algorithm.timestep_fraction={algo.timestep_fraction}: must be in (0, 1]")
    ddim = family_of(cfg).name in ("sd", "sdxl")  # a DDIM step's std is at most eta; a flow step's may exceed it
    check(0 <= algo.min_step_std and (algo.min_step_std < sample_cfg.eta or not ddim or likelihood_free),
          f"algorithm.min_step_std={algo.min_step_std}: must be in [0, sample.eta={sample_cfg.eta}) (a step's std is "
          f"at most eta)")
    check(not (sample_cfg.get("sde_type") == "cps" and sample_cfg.eta > 1),
          f"sample.eta={sample_cfg.eta}: the cps step's std is sigma' sin(eta pi / 2); use a noise level in (0, 1]")
    check(cfg.model.finetune in ("lora", "full"), f"model.finetune={cfg.model.finetune!r}: use 'lora' or 'full'")
    check(hw.sample_batch_size % sample_cfg.images_per_prompt == 0,
          f"hardware.sample_batch_size={hw.sample_batch_size} must be a multiple of sample.images_per_prompt="
          f"{sample_cfg.images_per_prompt}")
    if (OmegaConf.select(cfg, "algorithm.objective.replay_buffer.capacity", default=0) or 0) > 0:
        return  # minibatches of single transitions drawn from a replay buffer: any sizes fit
    if OmegaConf.select(cfg, "feedback.name") == "pairs":
        return  # the pairs source's sizes are its own (check_pairs_feedback)
    samples_per_process = sample_cfg.batches_per_epoch * hw.sample_batch_size
    check(samples_per_process % hw.train_batch_size == 0,
          f"hardware.train_batch_size={hw.train_batch_size} must divide the samples per process per epoch "
          f"({samples_per_process} = sample.batches_per_epoch x hardware.sample_batch_size)")
    minibatches = samples_per_process // hw.train_batch_size
    check(minibatches % algo.gradient_accumulation_steps == 0,
          f"algorithm.gradient_accumulation_steps={algo.gradient_accumulation_steps} must divide the training "
          f"minibatches per epoch ({minibatches})")


def window_settings(cfg: DictConfig) -> tuple[int, int, int, int]:
    """(size, first step, last step + 1, shift_every) of sample.sde_window; size 0: no window. Configs
    made before the window existed have none."""
    window, steps = cfg.sample.get("sde_window"), cfg.sample.num_steps
    if not window or not window.size:
        return 0, 0, steps, 0
    end = window.range[1]
    return int(window.size), int(window.range[0]), steps if end is None else int(end), int(window.shift_every)


def check_window(cfg: DictConfig) -> int:
    """sample.sde_window fits the chain; returns its size (0: every step stochastic)."""
    size, first, end, shift_every = window_settings(cfg)
    if not size:
        return 0
    steps = cfg.sample.num_steps
    check(1 <= size <= steps, f"sample.sde_window.size={size}: must be in [0, sample.num_steps={steps}]")
    check(0 <= first and first + size <= end <= steps,
          f"sample.sde_window.range=[{first}, {cfg.sample.sde_window.range[1]}]: must hold a window of {size} steps within "
          f"the {steps} sampler steps (0 <= first, first + size <= last + 1 <= sample.num_steps)")
    check(shift_every >= 0, f"sample.sde_window.shift_every={shift_every}: must be >= 0")
    check(OmegaConf.select(cfg, "feedback.name") != "human",
          "sample.sde_window: feedback=human replays stored chains; set sample.sde_window.size=0")
    return size


def check_capabilities(cfg: DictConfig, algorithm, replay: bool, pairs: bool = False) -> None:
    """What the algorithm needs against what the source and the settings give, refused once, here."""
    name = cfg.algorithm.name
    clean_pairs = getattr(algorithm, "clean_pairs", False)
    check(clean_pairs == pairs, f"algorithm={name} trains on clean preference pairs: add feedback=pairs "
                                f"(feedback.path=<parquet files or labelled datasets>, or reward-ranked pairs)"
          if clean_pairs else f"feedback=pairs: algorithm={name} cannot learn from clean preference pairs; use "
                              f"algorithm=diffusion_dpo")
    check(getattr(algorithm, "reference_every", 0) == 0 or cfg.model.finetune == "lora",
          f"algorithm.objective.reference_every={getattr(algorithm, 'reference_every', 0)}: the moving reference is a "
          f"second LoRA adapter; set model.finetune=lora, or reference_every=0 (the base model)")
    source_pairs = True if replay or pairs else online_settings(cfg).pairs
    if algorithm.pairs:  # rows 2i, 2i+1: two images of one prompt from the same noise
        check(source_pairs,
              f"algorithm={name} trains on pairs of images of one prompt from the same initial noise: "
              f"set sample.images_per_prompt to an even number and sample.same_noise_per_prompt=true")
    if algorithm.pairs:
        check(cfg.hardware.train_batch_size % 2 == 0,
              f"hardware.train_batch_size={cfg.hardware.train_batch_size}: algorithm={name} needs an even "
              f"minibatch (whole pairs)")
    if replay:
        check(algorithm.pairs, f"feedback=human: algorithm={name} cannot learn from preference labels; "
                               f"add algorithm=d3po")
    check(cfg.sample.images_per_prompt >= algorithm.min_group_size,
          f"sample.images_per_prompt={cfg.sample.images_per_prompt}: algorithm={name} compares the images of a "
          f"prompt with each other; sample at least {algorithm.min_group_size} per prompt")
    if algorithm.likelihood_free:
        family = family_of(cfg).name
        check(family in ("sd3", "flux"),
              f"algorithm={name} trains flow models on the velocity target: model={cfg.model.name} is a {family} "
              f"(DDIM) model; use a flow model (model=toy_flow, tiny_sd3, sd35m, flux_dev, ...)")
        check(cfg.model.finetune == "lora",
              f"algorithm={name} keeps its old policy as a second LoRA adapter: set model.finetune=lora")
        check(window_settings(cfg)[0] == 0,
              f"sample.sde_window: algorithm={name} samples with the deterministic ODE and stores no chain; set "
              f"sample.sde_window.size=0")
    if getattr(algorithm, "replay_buffer", None) is not None:
        check(cfg.algorithm.inner_epochs == 1,
              f"algorithm.inner_epochs={cfg.algorithm.inner_epochs}: with a replay buffer the updates per epoch are "
              f"algorithm.objective.replay_buffer.updates_per_round; set algorithm.inner_epochs=1")
    if algorithm.single_update:
        check(cfg.algorithm.inner_epochs == 1, f"algorithm.inner_epochs={cfg.algorithm.inner_epochs}: the "
                                               f"score-function estimator takes one step per sampling round; set "
                                               f"algorithm.inner_epochs=1")


def preflight(cfg: DictConfig) -> Checked:
    """Check values, prompt files and weights before any folder is made or model loaded."""
    from rlfuse.prompts import load_prompts

    check_complete(cfg)
    algorithm = build(cfg.algorithm.objective, "algorithm.objective")
    check_numbers(cfg, algorithm.likelihood_free)
    check_hardware_config(cfg.hardware, cfg.model.finetune)
    train_prompts, eval_prompts = load_prompts(cfg.prompts.train), load_prompts(cfg.prompts.eval)
    family = family_of(cfg)
    family.check_source(cfg.model.pretrained, cfg.model.revision, cfg.model.get("lora_weights"))
    try:  # a folder whose parts lack their config files
        check_resolution(cfg)
    except (OSError, ValueError) as error:
        raise UserError(f"model.pretrained={cfg.model.pretrained}: not a complete {family.name} pipeline folder "
                        f"({str(error).strip().splitlines()[0][:160]}); point it at a folder save_pretrained wrote") \
            from None
    check(cfg.hardware.attention != "eager" or family.name in ("sd", "sdxl"),
          f"hardware.attention=eager: plain-matmul attention is for UNet models; model={cfg.model.name} "
          f"(family {family.name}) uses its own attention processors: use hardware.attention=sdpa")
    sde_type = cfg.sample.sde_type
    check(sde_type in family.sde_types,
          f"sample.sde_type={sde_type}: model={cfg.model.name} takes "
          f"{', '.join('null' if t is None else t for t in family.sde_types)}"
          + (" (its DDIM sampler has no SDE type; the flow models' sde and cps steps are for the sd3 and flux families)"
             if family.sde_types == (None,) else ""))
    sampler = family.sampler_for_checks(cfg.model.pretrained, cfg.model.revision, cfg.sample.eta, sde_type,
                                        cfg.model.resolution)
    stds = sampler.step_stds(cfg.sample.num_steps)                       # (T,) the std of each sampler step
    steps = trainable_steps(stds, cfg.algorithm.min_step_std) if not algorithm.likelihood_free \
        else torch.arange(cfg.sample.num_steps)             # clean samples: every noise level of the schedule
    if getattr(algorithm, "clean_pairs", False):            # clean pairs: each "step" one draw of (t, noise)
        steps = torch.arange(algorithm.timesteps_per_pair)
    window = check_window(cfg)
    if window and not algorithm.likelihood_free:  # only the window's steps are stored: the trainable ones, if noisy
        _, first, end, _ = window_settings(cfg)
        check(bool((stds[first:end] > 0).all()),
              f"sample.sde_window.range={list(cfg.sample.sde_window.range)}: it reaches a deterministic step (std 0, e.g. "
              f"the cps step to sigma' = 0); end the range before it")
        steps = torch.arange(window)
    check(len(steps) > 0,
          f"algorithm.min_step_std={cfg.algorithm.min_step_std}: no sampler step has that much noise at "
          f"sample.num_steps={cfg.sample.num_steps}, eta={cfg.sample.eta}; lower it")
    replay = OmegaConf.select(cfg, "feedback.name") == "human"
    pairs = OmegaConf.select(cfg, "feedback.name") == "pairs"
    check_capabilities(cfg, algorithm, replay, pairs)
    if pairs:
        check_pairs_feedback(cfg)
    if replay:  # labelled pairs replace sampling (rlfuse/sources/replay.py)
        from rlfuse import feedback

        feedback.check_dataset(cfg.feedback.path, feedback.sampling_settings(
            cfg.model.name, cfg.model.pretrained, cfg.model.revision, cfg.model.variant, cfg.model.tiny_seed,
            cfg.model.get("lora_weights"), cfg.model.resolution, cfg.sample.num_steps, cfg.sample.guidance_scale,
            cfg.sample.eta, family.name, cfg.sample.sde_type))
    reward = build_reward(cfg.reward.fn, "reward.fn", f"reward={cfg.reward.name}", train_prompts + eval_prompts,
                          cfg.prompts.name)
    check_watch(cfg)
    panel = check_monitors(cfg)
    return Checked(algorithm, reward, train_prompts, eval_prompts, steps, replay, panel=panel, pairs=pairs)


# ----------------------------------------------------------------------------- schedules, best checkpoint, trackers

LR_SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module to import


def check_watch(cfg: DictConfig) -> None:
    """lr_schedule, checkpoint.best, early_stop and log.trackers: valid values, installed trackers.
    Configs made before these keys existed have none."""
    import importlib.util

    schedule = cfg.get("lr_schedule") or {}
    name = schedule.get("name", "constant")
    check(name in LR_SCHEDULES, f"lr_schedule.name={name}: use one of {', '.join(LR_SCHEDULES)}")
    check(schedule.get("warmup_steps", 0) >= 0, f"lr_schedule.warmup_steps={schedule.get('warmup_steps')}: must be >= 0")
    best, mode = cfg.checkpoint.get("best"), cfg.checkpoint.get("best_mode", "max")
    check(best is None or (isinstance(best, str) and best != ""),
          f"checkpoint.best={best!r}: give a logged metric such as eval_reward_mean, or null")
    check(mode in ("max", "min"), f"checkpoint.best_mode={mode}: use max or min")
    check(best is None or cfg.eval.every > 0,
          f"checkpoint.best={best}: the best checkpoint is chosen at evaluations; set eval.every > 0")
    stop = cfg.get("early_stop") or {}
    check(stop.get("patience", 0) >= 0, f"early_stop.patience={stop.get('patience')}: must be >= 0 (0: never stop)")
    check(stop.get("min_delta", 0.0) >= 0, f"early_stop.min_delta={stop.get('min_delta')}: must be >= 0")
    check(stop.get("patience", 0) == 0 or best is not None,
          f"early_stop.patience={stop.get('patience')}: early stopping watches checkpoint.best's metric; set "
          f"checkpoint.best=eval_reward_mean (or another logged metric)")
    trackers = list(cfg.log.get("trackers", ["tensorboard"]) or [])
    for tracker in trackers:
        check(tracker in TRACKERS, f"log.trackers: no tracker {tracker!r}; use any of {', '.join(TRACKERS)}")
        check(importlib.util.find_spec(TRACKERS[tracker]) is not None,
              f"log.trackers: {tracker} is not installed; pip install 'rlfuse[{tracker}]' (or drop it from log.trackers)")
    if "wandb" in trackers:
        check(wandb_can_log(), "log.trackers: wandb has no API key; run `wandb login`, set WANDB_API_KEY, or set "
                               "WANDB_MODE=offline (then `wandb sync` the run's wandb folder)")


def wandb_can_log() -> bool:
    """W&B can start a run without asking for a key: offline or disabled, or a key in the environment
    or in ~/.netrc (where `wandb login` writes it)."""
    import netrc

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def updates_per_epoch(cfg: DictConfig, checked: Checked) -> int:
    """Optimizer updates per epoch (the learning-rate schedule counts them)."""
    replay_buffer = getattr(checked.algorithm, "replay_buffer", None)
    if replay_buffer is not None:
        return replay_buffer.updates_per_round
    minibatches = cfg.sample.batches_per_epoch * cfg.hardware.sample_batch_size // cfg.hardware.train_batch_size
    micro_steps = cfg.algorithm.inner_epochs * minibatches * steps_per_trajectory(cfg, checked)
    return max(1, micro_steps // micro_steps_per_update(cfg, checked))


def make_lr_schedule(cfg: DictConfig, checked: Checked, optimizer: torch.optim.Optimizer):
    """lr_schedule as diffusers' get_scheduler over the run's optimizer updates, stepped after each
    update the optimizer takes (a post-step hook: a skipped update does not advance it). Make it before
    the optimizer's state is restored: building it sets the learning rate, restoring the state sets it back."""
    from diffusers.optimization import get_scheduler

    schedule = cfg.get("lr_schedule") or {}
    name, warmup = schedule.get("name", "constant"), schedule.get("warmup_steps", 0)
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=cfg.epochs * updates_per_epoch(cfg, checked))
    optimizer.register_step_post_hook(lambda *_: scheduler.step())
    return scheduler


def tracker_settings(cfg: DictConfig):
    """log.trackers and their settings, with the resolved config as the run's parameters. MLflow logs to
    log.mlflow_uri, else $MLFLOW_TRACKING_URI, else an SQLite store <run_root>/mlflow.db."""
    from rlfuse.engine.logbook import TrackerSettings

    uri = cfg.log.get("mlflow_uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(Path(cfg.run_root) / 'mlflow.db').resolve()}"
    return TrackerSettings(tuple(cfg.log.get("trackers", ["tensorboard"]) or []), cfg.log.get("project", "rlfuse"), uri,
                           OmegaConf.to_container(cfg, resolve=True))


def check_monitors(cfg: DictConfig) -> dict:
    """eval.rewards, eval.diversity and eval.drift: valid, their weights present; returns the panel
    {name: reward}, built once. Configs made before these keys existed have none."""
    from rlfuse.cli import CONF_DIR, group_choices

    panel = {}
    for name in list(cfg.eval.get("rewards") or []):
        check(name in group_choices("reward"),
              f"eval.rewards: no reward {name!r}; choose among {', '.join(group_choices('reward'))}")
        check(name != cfg.reward.name, f"eval.rewards: {name} is the trained reward (reward={name}); the panel holds "
                                       f"rewards the run is not trained on")
        node = OmegaConf.load(CONF_DIR / "reward" / f"{name}.yaml")
        panel[name] = build_reward(node.fn, f"eval.rewards[{name}]", f"eval.rewards: {name}")
    diversity = cfg.eval.get("diversity") or {}
    space = diversity.get("space")
    check(space in (None, "pixel", "clip"), f"eval.diversity.space={space}: use null (off), pixel or clip")
    if space is not None:
        for key in ("prompts", "images_per_prompt"):
            check(diversity.get(key, 0) >= (2 if key == "images_per_prompt" else 1),
                  f"eval.diversity.{key}={diversity.get(key)}: must be >= {2 if key == 'images_per_prompt' else 1}")
        check(0 < diversity.get("collapse_ratio", 0.5) < 1,
              f"eval.diversity.collapse_ratio={diversity.get('collapse_ratio')}: must be in (0, 1)")
        check(cfg.eval.every > 0, "eval.diversity: measured at evaluations; set eval.every > 0")
    if space == "clip":
        from rlfuse.rewards.clip import check_clip_weights

        try:
            check_clip_weights(diversity.clip_model, diversity.clip_pretrained, "eval.diversity")
        except ValueError as error:
            raise UserError(str(error)) from None
    return panel


def make_monitoring(cfg: DictConfig, checked: Checked, network: torch.nn.Module, family, reference, device):
    """The evaluation's monitors (rlfuse.engine.monitors), or None when none is asked for. The drift KL
    uses the algorithm's reference policy when it has one, else a reference of its own (LoRA: the
    adapters switched off; full fine-tuning: a frozen copy)."""
    from rlfuse.engine.evaluation import Monitoring
    from rlfuse.engine.monitors import MonitorSettings, Watch
    from rlfuse.lora import ReferencePolicy

    diversity = cfg.eval.get("diversity") or {}
    drift = bool(cfg.eval.get("drift", False))
    clip = None
    if diversity.get("space") == "clip":
        from rlfuse.rewards.clip import ClipEmbedder

        clip = ClipEmbedder(diversity.clip_model, diversity.clip_pretrained)
    kl_sampler = None
    if drift:
        import copy

        kl_sampler = copy.deepcopy(family.sampler(cfg.sample.eta, cfg.sample.sde_type))
    settings = MonitorSettings(checked.panel, diversity.get("space"), diversity.get("prompts", 8),
                               diversity.get("images_per_prompt", 4), clip, diversity.get("collapse_ratio", 0.5),
                               drift, kl_sampler)
    if not settings.active:
        return None
    if drift and reference is None:
        reference = ReferencePolicy(network, cfg.model.finetune, device)
    return Monitoring(settings, reference if drift else None, Watch(settings.collapse_ratio))


def best_tracker(cfg: DictConfig):
    """The tracker of checkpoint.best's metric (with early_stop), or None when checkpoint.best is null."""
    from rlfuse.engine.best import BestTracker

    if cfg.checkpoint.get("best") is None:
        return None
    stop = cfg.get("early_stop") or {}
    return BestTracker(cfg.checkpoint.best, cfg.checkpoint.get("best_mode", "max"), stop.get("patience", 0),
                       stop.get("min_delta", 0.0))




def check_pairs_feedback(cfg: DictConfig) -> None:
    """feedback=pairs: sizes that make whole minibatches, and the pairs' files readable (parquet: columns,
    usable rows, the first rows' images; datasets: labelled) or the reward-ranked settings."""
    from rlfuse.sources.pairs import ParquetPairs, open_pairs

    fb, hw = cfg.feedback, cfg.hardware
    check(fb.pairs_per_epoch >= 1, f"feedback.pairs_per_epoch={fb.pairs_per_epoch}: must be >= 1")
    check(fb.cache_size >= 0, f"feedback.cache_size={fb.cache_size}: must be >= 0 (0: no cache)")
    check(2 * fb.pairs_per_epoch % hw.train_batch_size == 0,
          f"hardware.train_batch_size={hw.train_batch_size} must divide the images per epoch "
          f"(2 x feedback.pairs_per_epoch = {2 * fb.pairs_per_epoch})")
    minibatches = 2 * fb.pairs_per_epoch // hw.train_batch_size
    check(minibatches % cfg.algorithm.gradient_accumulation_steps == 0,
          f"algorithm.gradient_accumulation_steps={cfg.algorithm.gradient_accumulation_steps} must divide the training "
          f"minibatches per epoch ({minibatches} = 2 x feedback.pairs_per_epoch / hardware.train_batch_size)")
    if fb.path is None:
        ranked = fb.ranked
        check(ranked.images_per_prompt >= 2, f"feedback.ranked.images_per_prompt={ranked.images_per_prompt}: must be "
                                             f">= 2 (the best against the worst)")
        check(ranked.prompts_per_round >= 1, f"feedback.ranked.prompts_per_round={ranked.prompts_per_round}: must be >= 1")
        check(ranked.resample_every >= 0, f"feedback.ranked.resample_every={ranked.resample_every}: must be >= 0 "
                                          f"(0: sample once, then train offline)")
        return
    pool = open_pairs(str(fb.path), cfg.seed)
    if isinstance(pool, ParquetPairs):
        pool.check_images(cfg.model.resolution)


# ----------------------------------------------------------------------------- resume and the run folder


def _comparable(config: DictConfig) -> dict:
    values = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k not in RESUME_FREE_KEYS}
    if isinstance(values.get("model"), dict):  # runs made before model.family existed were all sd
        values["model"].setdefault("family", "sd")
    return values


def find_resume_folder(cfg: DictConfig) -> Path | None:
    """The run folder that resume=<folder> or resume=auto points at (auto: None when none matches).

    auto picks the newest run under run_root whose config equals this one (but for epochs,
    progress and resume) and that has a checkpoint; <folder> must hold a checkpoint and the same config.
    """
    from rlfuse.engine.checkpoint import list_checkpoints

    if cfg.resume is None:
        return None
    wanted = _comparable(cfg)
    if cfg.resume == "auto":
        candidates = sorted(Path(cfg.run_root).glob("**/.hydra/config.yaml"), key=lambda p: p.stat().st_mtime)
        for saved in reversed(candidates):
            if _comparable(OmegaConf.load(saved)) == wanted and list_checkpoints(saved.parent.parent):
                return saved.parent.parent
        return None
    folder = Path(cfg.resume).expanduser()
    saved = folder / ".hydra" / "config.yaml"
    check(saved.is_file(), f"resume={cfg.resume!r}: not a run folder (no .hydra/config.yaml); give a folder under "
                           f"{cfg.run_root}/ or resume=auto")
    check(bool(list_checkpoints(folder)), f"resume={cfg.resume!r}: the folder holds no checkpoint to resume from")
    previous = _comparable(OmegaConf.load(saved))
    changed = sorted(k for k in set(previous) | set(wanted) if previous.get(k) != wanted.get(k))
    check(not changed, f"resume={cfg.resume!r}: the run was made with a different config ({', '.join(changed)} "
                       f"differ); resume with the same overrides, or start a new run")
    return folder


def startup_overrides(cfg: DictConfig) -> list[str]:
    """Run before Hydra makes the run folder: fail fast on bad values, and reuse a resumed run's folder."""
    preflight(cfg)
    folder = find_resume_folder(cfg)
    return [f"hydra.run.dir={folder.resolve()}"] if folder is not None else []


# ----------------------------------------------------------------------------- plain settings for the stages


def steps_per_trajectory(cfg: DictConfig, checked: Checked) -> int:
    """Steps trained per trajectory: timestep_fraction of those with enough sampler noise; with a window
    of stochastic steps, every window step (Flow-GRPO-Fast trains its whole window)."""
    if window_settings(cfg)[0]:
        return len(checked.trainable_steps)
    return max(1, int(len(checked.trainable_steps) * cfg.algorithm.timestep_fraction))


def micro_steps_per_update(cfg: DictConfig, checked: Checked) -> int:
    """Backward passes per optimizer step: accumulation minibatches x steps per trajectory. The
    score-function estimator (DDPO_SF) is exact only for the policy that sampled: one step per round. A
    replay buffer's minibatches hold single transitions: one backward pass each."""
    if getattr(checked.algorithm, "replay_buffer", None) is not None:
        return cfg.algorithm.gradient_accumulation_steps
    minibatches = cfg.sample.batches_per_epoch * cfg.hardware.sample_batch_size // cfg.hardware.train_batch_size
    accumulation = minibatches if checked.algorithm.single_update else cfg.algorithm.gradient_accumulation_steps
    return accumulation * steps_per_trajectory(cfg, checked)


def make_accelerator(cfg: DictConfig, checked: Checked):
    from rlfuse.engine.hardware import make_accelerator as make

    hw, deepspeed, fsdp = cfg.hardware, cfg.hardware.get("deepspeed", {}), cfg.hardware.get("fsdp", {})
    return make(hw.cpu, hw.mixed_precision, micro_steps_per_update(cfg, checked), hw.strategy,
                deepspeed.get("zero_stage", 2), deepspeed.get("offload_optimizer", False),
                cfg.algorithm.max_grad_norm, fsdp.get("version", 2), fsdp.get("reshard_after_forward", True),
                fsdp.get("cpu_offload", False), hw.allow_tf32)


def load_family(cfg: DictConfig, pretrained: str | None = None, lora_weights: bool = True):
    """The run's model family, loaded; pretrained replaces model.pretrained (an exported pipeline folder),
    lora_weights=False leaves out model.lora_weights."""
    m = cfg.model
    family = family_of(cfg)
    options = {key: m[key] for key in family.options if key in m}
    return family.load(pretrained or m.pretrained, m.revision, m.variant, m.tiny_seed,
                       m.get("lora_weights") if lora_weights and pretrained is None else None, **options)


def place_models(cfg: DictConfig, family, device: torch.device) -> torch.nn.Module:
    from rlfuse.engine.hardware import place_models as place

    m, hw = cfg.model, cfg.hardware
    return place(family, m.finetune, m.lora.rank, m.lora.alpha, list(m.lora.target_modules), hw.mixed_precision,
                 device, hw.attention, hw.gradient_checkpointing, hw.compile, hw.channels_last)


def make_optimizer(cfg: DictConfig, network: torch.nn.Module) -> torch.optim.Optimizer:
    from rlfuse.lora import trainable_parameters

    algo = cfg.algorithm
    return torch.optim.AdamW(trainable_parameters(network).values(), lr=algo.learning_rate,
                             betas=(algo.adam_beta1, algo.adam_beta2), weight_decay=algo.adam_weight_decay,
                             eps=algo.adam_epsilon)


def make_source(cfg: DictConfig, checked: Checked, network: torch.nn.Module, family, sampler, accelerator,
                progress: bool, run_dir: Path | None = None):
    """feedback=human: the replay source over the labelled dataset; otherwise online sampling."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if checked.replay:
        from rlfuse.sources.replay import load_replay

        return load_replay(cfg.feedback.path, family, device, cfg.seed, rank, world, cfg.log.grid_images)
    if checked.pairs:
        return make_pairs_source(cfg, checked, network, family, sampler, accelerator, run_dir)
    from rlfuse.sources.online import OnlineSource

    algorithm = checked.algorithm
    return OnlineSource(network, family, sampler, checked.reward, checked.train_prompts,
                        family.latent_shape(cfg.model.resolution), online_settings(cfg, algorithm.likelihood_free),
                        rank, world, device, accelerator.autocast, progress,
                        algorithm.sampling if algorithm.likelihood_free else None)


def make_pairs_source(cfg: DictConfig, checked: Checked, network: torch.nn.Module, family, sampler, accelerator,
                      run_dir: Path | None = None):
    """feedback=pairs: parquet or labelled-dataset pairs at feedback.path, or reward-ranked pairs of the policy
    (with feedback.ranked.save, each round also written to <run_dir>/pairs by the main process)."""
    from rlfuse.sources.pairs import PairsSource, RankedPairs, RankedSettings, open_pairs

    fb, device = cfg.feedback, accelerator.device
    if fb.path is not None:
        pool = open_pairs(str(fb.path), cfg.seed)
    else:
        ranked = RankedSettings(fb.ranked.prompts_per_round, fb.ranked.images_per_prompt, fb.ranked.resample_every,
                                cfg.sample.num_steps, cfg.sample.guidance_scale, cfg.seed)
        save_dir = Path(run_dir) / "pairs" if fb.ranked.get("save", False) and run_dir is not None \
            and accelerator.is_main_process else None
        pool = RankedPairs(network, family, sampler, checked.reward, checked.train_prompts,
                           family.latent_shape(cfg.model.resolution), ranked, device, accelerator.autocast, save_dir)
    return PairsSource(pool, family, cfg.model.resolution, fb.pairs_per_epoch, fb.cache_size, device,
                       accelerator.process_index, accelerator.num_processes, cfg.log.grid_images)


def online_settings(cfg: DictConfig, clean: bool = False):
    """The online source's settings; clean: deterministic sampling of clean samples (likelihood-free)."""
    from rlfuse.sources.online import OnlineSettings

    s = cfg.sample
    size, first, end, shift_every = window_settings(cfg)
    return OnlineSettings(cfg.seed, s.batches_per_epoch, cfg.hardware.sample_batch_size, s.images_per_prompt,
                          s.same_noise_per_prompt, s.num_steps, s.guidance_scale, cfg.log.grid_images,
                          size, (first, end), shift_every, clean)


def check_processes(cfg: DictConfig, world: int) -> None:
    """What depends on the process count: every process evaluates at least one held-out image."""
    check(cfg.eval.every == 0 or cfg.eval.num_images >= world,
          f"eval.num_images={cfg.eval.num_images}: fewer than the {world} processes; evaluate at least one image "
          f"per process, or set eval.every=0")


def optimize_settings(cfg: DictConfig, checked: Checked):
    from rlfuse.engine.optimize import OptimizeSettings

    return OptimizeSettings(cfg.seed, cfg.algorithm.inner_epochs, cfg.hardware.train_batch_size,
                            steps_per_trajectory(cfg, checked), cfg.algorithm.max_grad_norm,
                            cfg.algorithm.gradient_accumulation_steps)


def eval_sampler(cfg: DictConfig, family):
    """The sampler of evaluation images, with its own scheduler (it may take another number of steps)."""
    import copy

    eta = cfg.eval.get("eta")
    return copy.deepcopy(family.sampler(cfg.sample.eta if eta is None else eta, cfg.sample.sde_type))


def eval_settings(cfg: DictConfig, checked: Checked):
    from rlfuse.engine.evaluation import EvalSettings

    steps, guidance = cfg.eval.get("num_steps"), cfg.eval.get("guidance_scale")
    return EvalSettings(checked.eval_prompts, cfg.eval.num_images, cfg.eval.seed,
                        cfg.sample.num_steps if steps is None else steps,
                        cfg.sample.guidance_scale if guidance is None else guidance)
