"""The training loop: source, advantages, optimize, evaluate, log, checkpoint; once per epoch.

    python -m rlfuse.train [group=choice ...] [key=value ...]
    accelerate launch -m rlfuse.train hardware=multi_gpu ...

Only the top layer (this module, rlfuse.config and the other entry points) reads the Hydra config;
every stage below takes plain arguments.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from omegaconf import DictConfig, OmegaConf

from rlfuse import config
from rlfuse.cli import run_hydra_app
from rlfuse.engine import checkpoint
from rlfuse.engine.distributed import assign_advantages, gather_lists, shared_run_dir, weights_spread
from rlfuse.engine.evaluation import evaluation_stage
from rlfuse.engine.logbook import Logbook, drop_epochs_from, epoch_metrics
from rlfuse.engine.optimize import NonFiniteGuard, optimize
from rlfuse.lora import ReferencePolicy, trainable_parameters
from rlfuse.policy import Policy
from rlfuse.seeding import seed_for

log = logging.getLogger("rlfuse")


def train(cfg: DictConfig) -> float:
    """Run one training job; returns the metric sweeps optimise: checkpoint.best's best value when set,
    else the last evaluation reward."""
    from accelerate.utils import gather_object
    from hydra.core.hydra_config import HydraConfig
    from torchvision.utils import make_grid

    # ---- Start-up: checks (again: sweeps change values per job), processes, the run folder.
    checked = config.preflight(cfg)
    algorithm, reward = checked.algorithm, checked.reward
    accelerator = config.make_accelerator(cfg, checked)
    is_main, rank, world, device = (accelerator.is_main_process, accelerator.process_index,
                                    accelerator.num_processes, accelerator.device)
    config.check_processes(cfg, world)
    run_dir = shared_run_dir(accelerator, HydraConfig.get().runtime.output_dir if is_main else None)
    sharded = cfg.hardware.strategy in ("deepspeed", "fsdp")  # optimizer states (and, FSDP, weights) sharded
    torch.manual_seed(seed_for(cfg.seed, rank))
    if is_main:
        log.info("run folder: %s (%d process%s, %s)", run_dir, world, "es" if world > 1 else "", device)

    # ---- Models: the family's parts on the device, the trained network, its reference, the optimizer.
    family = config.load_family(cfg)
    network = config.place_models(cfg, family, device)
    if hasattr(algorithm, "attach"):  # an adapter of its own (DiffusionNFT's old policy), before any checkpoint
        algorithm.attach(network)
    # The base model for algorithms that regularise towards it (D3PO, DPOK): taken before any training
    # or checkpoint loading; with LoRA the same network with adapters off, never a copy.
    reference = ReferencePolicy(network, cfg.model.finetune, device, cfg.algorithm.get("reference_offload", False)) \
        if algorithm.needs_reference else None
    monitoring = config.make_monitoring(cfg, checked, network, family, reference, device)  # None: no monitors
    resumed = checkpoint.list_checkpoints(run_dir)[-1] if cfg.resume is not None and \
        checkpoint.list_checkpoints(run_dir) else None
    if resumed is not None:  # the weights go in before the engine wraps (and, under FSDP, shards) the network
        optimizer_state, state = checkpoint.load_checkpoint(resumed, network)
    optimizer = config.make_optimizer(cfg, network)
    lr_schedule = config.make_lr_schedule(cfg, checked, optimizer)  # before the optimizer state is restored
    trained, optimizer = accelerator.prepare(network, optimizer)
    params = list(trainable_parameters(accelerator.unwrap_model(trained)).values())  # as the engine holds them
    sampler = family.sampler(cfg.sample.eta, cfg.sample.sde_type)
    sampler.set_timesteps(cfg.sample.num_steps, device=device)
    policy = Policy(trained, family, sampler, cfg.sample.guidance_scale, reference)
    show = cfg.progress and is_main
    source = config.make_source(cfg, checked, network, family, sampler, accelerator, show, run_dir)
    latent_shape = family.latent_shape(cfg.model.resolution)
    eval_settings, optimize_settings = config.eval_settings(cfg, checked), config.optimize_settings(cfg, checked)
    evaluation = (network, family, config.eval_sampler(cfg, family), reward, eval_settings, latent_shape, accelerator,
                  run_dir)

    # ---- Resume: optimizer, algorithm state, RNG; the epochs logged after the checkpoint run again.
    first_epoch, best = 1, config.best_tracker(cfg)  # best: None without checkpoint.best
    if resumed is not None:
        first_epoch = checkpoint.restore(accelerator, optimizer, algorithm, optimizer_state, state)
        if state.get("lr_schedule"):
            lr_schedule.load_state_dict(state["lr_schedule"])
        if best is not None and state.get("best"):
            best.load_state_dict(state["best"])
        if is_main:
            log.info("resumed from %s: continuing at epoch %d", resumed, first_epoch)
            drop_epochs_from(run_dir / "metrics.jsonl", first_epoch)
    logbook = Logbook(run_dir, first_epoch, cfg.epochs, show, config.tracker_settings(cfg)) if is_main else None
    if is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    last_eval = evaluation_stage(*evaluation, logbook, 0, final=False, monitoring=monitoring) \
        if (cfg.eval.every > 0 and first_epoch == 1) else {}
    if last_eval and is_main:
        log.info("epoch 0 (before training) | eval reward %.4f", last_eval["eval_reward_mean"])
        logbook.record({"epoch": 0, **last_eval})
    # A checkpoint of the epoch (or, with best=, checkpoints/best) with the loop's own state to resume.
    save = lambda epoch, final, **best_note: checkpoint.save_epoch(  # noqa: E731
        accelerator, run_dir, epoch, final, family, trained, optimizer, algorithm.state_dict(), cfg.model.finetune,
        sharded, cfg.checkpoint.keep, {"lr_schedule": lr_schedule.state_dict(),
                                       "best": best.state_dict() if best else None}, **best_note)
    if last_eval and best is not None and best.observe(last_eval, 0):  # the base model may stay the best
        save(0, False, best=best.note())

    guard = NonFiniteGuard(cfg.max_nonfinite_in_row)
    metrics: dict = {}
    for epoch in range(first_epoch, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        guard.start_epoch()
        # ---- 1. Source: this process's samples (chains, log-probs, rewards) or replayed labelled pairs.
        batch = source.epoch(epoch)
        sample_seconds = time.perf_counter() - epoch_start
        # ---- 2. Advantages over every process's samples, in sample-id order; NaN/Inf rewards skip training.
        details = gather_lists(batch.details)
        scored = assign_advantages(accelerator, batch.samples, algorithm)
        guard.rewards(scored.finite, epoch)
        # ---- 3. Optimize: inner epochs over minibatches, a random subset of each trajectory's steps.
        train_start = time.perf_counter()
        train_stats, micro_steps = optimize(policy, algorithm, scored.samples, checked.trainable_steps,
                                            optimize_settings, accelerator, optimizer, params, guard, epoch,
                                            show) if scored.finite else ({}, 0)
        if hasattr(algorithm, "end_epoch"):  # DiffusionNFT's old policy follows the trained one
            train_stats.update(algorithm.end_epoch(micro_steps // config.micro_steps_per_update(cfg, checked)))
        train_seconds = time.perf_counter() - train_start
        # Every process must hold the same trained weights: a broken synchronisation shows in the logs.
        spread = weights_spread(accelerator, params, cfg.hardware.strategy == "fsdp")
        if spread > 0 and is_main:
            log.warning("epoch %d: the processes' weights differ (checksum spread %.3g): gradients are not "
                        "synchronised", epoch, spread)
        metrics = epoch_metrics(epoch, scored.rewards, details, scored.stats, train_stats, guard.skipped, spread,
                                micro_steps * cfg.hardware.train_batch_size * world, sample_seconds, train_seconds)
        # ---- 4. Evaluate: held-out prompts at fixed seeds.
        new_best = False
        if cfg.eval.every > 0 and (epoch % cfg.eval.every == 0 or epoch == cfg.epochs):
            last_eval = evaluation_stage(*evaluation, logbook, epoch, final=epoch == cfg.epochs, monitoring=monitoring)
            metrics.update(last_eval)
            new_best = best is not None and best.observe(metrics, epoch)
        metrics["lr"] = lr_schedule.get_last_lr()[0]
        metrics["seconds"] = time.perf_counter() - epoch_start
        # ---- 5. Log: metrics.jsonl, TensorBoard, the samples' grid, the summary line.
        grid_now = cfg.log.images_every > 0 and epoch % cfg.log.images_every == 0
        grid_images = gather_object(list(batch.images[:cfg.log.grid_images].cpu())) if grid_now else []
        if is_main:
            logbook.epoch(metrics, make_grid(torch.stack(grid_images[:cfg.log.grid_images]), nrow=4)
                          if grid_images else None)
        # ---- 6. Checkpoint: atomically, everything needed to resume exactly; the best evaluation's beside.
        stop = best is not None and best.should_stop
        if epoch % cfg.checkpoint.every == 0 or epoch == cfg.epochs or stop:
            save(epoch, epoch == cfg.epochs or stop)
        if new_best:
            save(epoch, False, best=best.note())
        if stop:
            if is_main:
                log.info(best.stop_reason())
            break

    if logbook is not None:
        logbook.close()
    accelerator.end_training()
    if best is not None and is_main:
        log.info("best %s %.4f at epoch %d: %s", best.metric, best.best, best.best_epoch, checkpoint.best_dir(run_dir))
    return best.best if best is not None else \
        float(last_eval.get("eval_reward_mean", metrics.get("reward_mean", math.nan)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The task by its module name, not __main__'s: sweep launchers (joblib, submitit) pickle it by reference.
    from rlfuse import train as module

    run_hydra_app(module.train, config_name="train", extra_overrides=config.startup_overrides)


if __name__ == "__main__":
    main()
