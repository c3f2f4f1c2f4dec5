"""The paper reproductions: every experiment maps to a CPU run, a short run yields a full report, and
paper scale without a GPU stops at once with what it needs."""

import json
import re
import time

import hydra.utils
import pytest
import torch

from rlfuse import reproduce
from rlfuse.config import check_complete, check_numbers
from rlfuse.evaluate import build_reward


@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_every_experiment_composes_and_builds_at_toy_scale(name):
    cfg = reproduce.experiment_config(name)
    assert cfg.epochs > 0 and cfg.model.name in ("sd15", "sd21", "sd35m")  # the paper-scale file
    if cfg.feedback.name == "human":  # needs people's labels: listed as not run at toy scale
        assert reproduce.needs_inputs(name) == "feedback.path"
        return
    overrides, rewards, settings = reproduce.toy_overrides(name)
    toy = reproduce.experiment_config(name, overrides)
    assert toy.model.name in ("tiny", "toy", "tiny_sd3") and toy.hardware.name == "cpu"
    assert toy.algorithm.name == cfg.algorithm.name
    check_complete(toy)  # nothing left for the user to give (prompt files, server addresses)
    check_numbers(toy)
    hydra.utils.instantiate(toy.algorithm.objective)
    assert callable(hydra.utils.instantiate(toy.reward.fn))
    for reward in rewards.split(","):
        assert callable(build_reward(reward, settings))


# What each experiment asks of the user at paper scale (its ??? keys), and a value standing in for it.
USER_INPUTS = {"prompts.train": "/data/train.txt", "reward.url": "http://10.0.0.5:18085", "feedback.path": "/data/labels"}


def given_inputs(name: str) -> list[str]:
    needs = reproduce.needs_inputs(name)
    return [f"{key}={USER_INPUTS[key]}" for key in (needs.split(", ") if needs else [])]


@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_every_experiment_composes_at_paper_scale_once_given_what_it_needs(name):
    cfg = reproduce.experiment_config(name, given_inputs(name))
    check_complete(cfg)
    check_numbers(cfg)
    hydra.utils.instantiate(cfg.algorithm.objective)


@pytest.mark.parametrize("name, needs", [
    ("flowgrpo_sd35m_pickscore", "prompts.train"),
    ("flowgrpo_sd35m_geneval", "reward.url, prompts.train"),
    ("flowgrpo_sd35m_ocr", "reward.url, prompts.train"),
])
def test_flow_grpo_experiments_say_what_the_user_must_give(name, needs):
    assert reproduce.needs_inputs(name) == needs


@pytest.mark.parametrize("name, beta", [("flowgrpo_sd35m_pickscore", 0.01), ("flowgrpo_sd35m_geneval", 0.04),
                                        ("flowgrpo_sd35m_ocr", 0.04)])
def test_flow_grpo_experiments_carry_its_published_settings(name, beta):
    cfg = reproduce.experiment_config(name, given_inputs(name))
    assert (cfg.model.name, cfg.algorithm.name, cfg.hardware.name) == ("sd35m", "grpo", "multi_gpu")
    assert (cfg.sample.num_steps, cfg.eval.num_steps, cfg.sample.guidance_scale, cfg.sample.eta) == (10, 40, 4.5, 0.7)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.resolution) == (32, 64, 512)
    assert cfg.algorithm.learning_rate == 3e-4 and cfg.algorithm.objective.clip_range == 1e-4
    # 24 images x 48 groups per epoch on 8 GPUs, 2 optimizer steps per epoch
    per_gpu = cfg.sample.batches_per_epoch * cfg.hardware.sample_batch_size
    assert cfg.sample.images_per_prompt == 24 and 8 * per_gpu == 24 * 48
    assert per_gpu // cfg.hardware.train_batch_size // cfg.algorithm.gradient_accumulation_steps == 2
    # beta on rlfuse's exact KL: Flow-GRPO's times the mean |dt| of its trained steps 0-8 (10 steps, shift 3)
    assert cfg.algorithm.objective.beta == pytest.approx(beta * (1 - 0.0089) / 9, rel=0.01)
    if cfg.reward.name == "http":
        assert cfg.reward.fn.url == USER_INPUTS["reward.url"]


@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_every_published_entry_cites_the_table_or_figure_it_comes_from(name):
    published = reproduce.EXPERIMENTS[name][1]
    assert re.search(r"\b(tab|fig)\.|\btable\b", published, re.IGNORECASE), published
    assert "|" not in published  # a cell of REPORT.md's table


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddpo_sd15_compressibility", "flowgrpo_sd35m_geneval"])  # DDIM; flow (about 18 s)
def test_a_short_toy_run_renders_the_report_with_scores_grids_and_curves(tmp_path, monkeypatch, name):
    one_epoch = [o for o in reproduce.TOY_COMMON if not o.startswith(("epochs=", "eval.every=", "sample.num_steps="))]
    monkeypatch.setattr(reproduce, "TOY_COMMON", [*one_epoch, "epochs=1", "eval.every=1", "eval.num_images=4",
                                                   "sample.num_steps=4"])
    report = reproduce.reproduce("toy", tmp_path, [name])
    text = report.read_text()
    assert f"| [{name}](evaluations/{name}/REPORT.md) |" in text
    assert f"| {reproduce.EXPERIMENTS[name][1]} |" in text  # the published column
    evaluation = tmp_path / "evaluations" / name
    numbers = json.loads((evaluation / "report.json").read_text())
    assert set(numbers["scores"]) == {"jpeg", "alignment", "diversity"} and numbers["scores"]["jpeg"]["trained_on"]
    assert numbers["drift"]["pixel_rms"] > 0  # one epoch of full fine-tuning moves the images
    for png in ("base_vs_finetuned.png", "reward.png"):
        assert (evaluation / png).stat().st_size > 0 and f"]({png})" in (evaluation / "REPORT.md").read_text()


def run_main(main, args, capsys):
    """Run a command-line main in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code, capsys.readouterr().err


def test_paper_scale_without_a_gpu_stops_at_once_saying_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    start = time.perf_counter()
    code, stderr = run_main(reproduce.main, ["--scale", "paper", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and time.perf_counter() - start < 5  # before any model, run or folder
    assert "needs CUDA GPUs" in stderr and "SCALE=toy" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, expected", [
    (["/no/such/run"], "no such folder"),
    (["{tmp}"], "holds no checkpoint"),
    (["{tmp}", "--num-prompts", "0"], "must be >= 1"),
    (["{tmp}", "--rewards", "nope"], "holds no checkpoint"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, expected):
    from rlfuse.evaluate import main

    code, stderr = run_main(main, [a.format(tmp=tmp_path) for a in args], capsys)
    assert code == 2 and expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
