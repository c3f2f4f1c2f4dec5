"""What the evaluation monitors cost: seconds per evaluation of the default run (model=toy, reward=shapes,
133 held-out images, 10 DDIM steps) without monitors and with each of them.

    python benchmarks/monitors.py [--repeats 1] [--out benchmarks/results/monitors.json] [--only none,diversity,...]

Panels: jpeg (cheap, on the CPU) and aesthetic (CLIP ViT-L/14 with random weights and the real MLP head:
the cost of a CLIP-sized panel reward; no download). Diversity samples 8 prompts x 4 images of its own;
drift runs the reference network along every evaluation chain. Median and spread over repeats, after
a warm-up. Both wall-clock seconds and the process's CPU seconds are recorded: on one thread the CPU
seconds are the compute an evaluation costs, and they hold up when other work shares the machine
(the wall-clock figures then do not). A benchmark, not a test: figures depend on the machine.
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

from rlfuse.cli import check_overrides  # noqa: E402
from rlfuse.config import eval_sampler, eval_settings, load_family, preflight  # noqa: E402
from rlfuse.engine.evaluation import Monitoring, evaluation_stage  # noqa: E402
from rlfuse.engine.monitors import MonitorSettings, Watch  # noqa: E402
from rlfuse.lora import ReferencePolicy  # noqa: E402
from rlfuse.rewards.aesthetic import AestheticMLP, AestheticReward  # noqa: E402
from rlfuse.rewards.jpeg import JpegReward  # noqa: E402


class NoLogbook:
    def eval_grid(self, grid, epoch) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/monitors.json")
    parser.add_argument("--only", default="", help="comma-separated variant names' first words (default: all)")
    args = parser.parse_args()
    from accelerate import Accelerator

    torch.manual_seed(0)
    cfg = check_overrides("train", [])
    checked = preflight(cfg)
    family = load_family(cfg)
    network = family.network.eval()
    accelerator = Accelerator(cpu=True)
    head = Path(tempfile.mkdtemp()) / "aesthetic.pth"
    torch.save(AestheticMLP(768).state_dict(), head)
    aesthetic = AestheticReward(weights=str(head), clip_model="ViT-L-14", clip_pretrained=None)
    kl_sampler = family.sampler(cfg.sample.eta)
    reference = ReferencePolicy(network, "full", torch.device("cpu"))
    variants = {
        "none": None,
        "panel jpeg": MonitorSettings({"jpeg": JpegReward()}),
        "panel jpeg + aesthetic (ViT-L/14)": MonitorSettings({"jpeg": JpegReward(), "aesthetic": aesthetic}),
        "diversity pixel (8 x 4 images)": MonitorSettings(diversity_space="pixel"),
        "drift (pixel + chain KL)": MonitorSettings(drift=True, kl_sampler=kl_sampler),
    }
    settings = eval_settings(cfg, checked)
    results = {}
    run_dir = Path(tempfile.mkdtemp())
    chosen = [word for word in args.only.split(",") if word]
    for name, monitors in variants.items():
        if chosen and name.split()[0] not in chosen:
            continue
        times, cpu_times = [], []
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            monitoring = Monitoring(monitors, reference if monitors and monitors.drift else None,
                                    Watch(0.5)) if monitors else None
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = evaluation_stage(network, family, eval_sampler(cfg, family), checked.reward, settings,
                                       family.latent_shape(cfg.model.resolution), accelerator, run_dir, NoLogbook(),
                                       0, False, monitoring)
            if repeat:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        results[name] = {"cpu_seconds_median": statistics.median(cpu_times), "seconds_median": statistics.median(times),
                         "seconds_min": min(times), "seconds_max": max(times),
                         "metrics": sorted(k for k in metrics if k.startswith("eval_"))}
        print(f"{name}: {results[name]['cpu_seconds_median']:.1f} CPU s, {results[name]['seconds_median']:.1f} s "
              f"wall per evaluation", flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "images": settings.num_images,
              "steps": settings.num_steps, "repeats": args.repeats, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
