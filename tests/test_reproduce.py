"""The paper reproductions: every experiment maps to a CPU run, a short run yields a full report, and
paper scale without a GPU stops at once with what it needs."""

import json
import re
import time

import hydra.utils
import pytest
import torch

from rlfuse import reproduce
from rlfuse.evaluate import build_reward


@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_every_experiment_composes_and_builds_at_toy_scale(name):
    cfg = reproduce.experiment_config(name)
    assert cfg.epochs > 0 and cfg.model.name in ("sd15", "sd21")  # the paper-scale file
    if cfg.feedback.name == "human":  # needs people's labels: listed as not run at toy scale
        assert reproduce.needs_inputs(name) == "feedback.path"
        return
    overrides, rewards, settings = reproduce.toy_overrides(name)
    toy = reproduce.experiment_config(name, overrides)
    assert toy.model.name in ("tiny", "toy") and toy.hardware.name == "cpu" and toy.algorithm.name == cfg.algorithm.name
    hydra.utils.instantiate(toy.algorithm.objective)
    assert callable(hydra.utils.instantiate(toy.reward.fn))
    for reward in rewards.split(","):
        assert callable(build_reward(reward, settings))


@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_every_published_entry_cites_the_table_or_figure_it_comes_from(name):
    published = reproduce.EXPERIMENTS[name][1]
    assert re.search(r"\b(tab|fig)\.|\btable\b", published, re.IGNORECASE), published
    assert "|" not in published  # a cell of REPORT.md's table


@pytest.mark.slow
def test_a_short_toy_run_renders_the_report_with_scores_grids_and_curves(tmp_path, monkeypatch):
    one_epoch = [o for o in reproduce.TOY_COMMON if not o.startswith(("epochs=", "eval.every=", "sample.num_steps="))]
    monkeypatch.setattr(reproduce, "TOY_COMMON", [*one_epoch, "epochs=1", "eval.every=1", "eval.num_images=4",
                                                   "sample.num_steps=4"])
    report = reproduce.reproduce("toy", tmp_path, ["ddpo_sd15_compressibility"])
    text = report.read_text()
    assert "| [ddpo_sd15_compressibility](evaluations/ddpo_sd15_compressibility/REPORT.md) |" in text
    assert f"| {reproduce.EXPERIMENTS['ddpo_sd15_compressibility'][1]} |" in text  # the published column
    evaluation = tmp_path / "evaluations" / "ddpo_sd15_compressibility"
    numbers = json.loads((evaluation / "report.json").read_text())
    assert set(numbers["scores"]) == {"jpeg", "alignment", "diversity"} and numbers["scores"]["jpeg"]["trained_on"]
    assert numbers["drift"]["pixel_rms"] > 0  # one epoch at lr 1e-2 moves the images
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
