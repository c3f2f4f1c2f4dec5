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
    assert cfg.epochs > 0 and cfg.model.name in ("sd14", "sd15", "sd21", "sd35m")  # the paper-scale file
    if cfg.feedback.name == "human":  # needs people's labels: listed as not run at toy scale
        assert reproduce.needs_inputs(name) == "feedback.path"
        return
    overrides, rewards, settings = reproduce.toy_overrides(name)
    toy = reproduce.experiment_config(name, overrides)
    assert toy.model.name in ("tiny", "toy", "toy_flow") and toy.hardware.name == "cpu"
    assert toy.hardware.mixed_precision == "no"  # the experiment's GPU settings stay behind
    assert toy.algorithm.name == cfg.algorithm.name
    check_complete(toy)  # nothing left for the user to give (prompt files, server addresses)
    check_numbers(toy)
    hydra.utils.instantiate(toy.algorithm.objective)
    assert callable(hydra.utils.instantiate(toy.reward.fn))
    for reward in rewards.split(","):
        assert callable(build_reward(reward, settings))


def test_toy_settings_of_a_model_or_algorithm_replace_the_common_ones_once():
    overrides, _, _ = reproduce.toy_overrides("d3po_sd15_aesthetic")
    keys = [o.partition("=")[0] for o in overrides]
    assert len(keys) == len(set(keys))  # each key set once
    assert "sample.batches_per_epoch=2" in overrides  # D3PO's 8 pairs, not TOY_COMMON's 1 batch
    toy = reproduce.experiment_config("d3po_sd15_aesthetic", overrides)
    assert toy.sample.batches_per_epoch == 2 and toy.algorithm.min_step_std == 0.4
    assert reproduce.last_wins(["a=1", "b=2", "a=3", "~c", "+d=1"]) == ["a=3", "b=2", "~c", "+d=1"]
    for clash in (["a=1", "~a"], ["a=1", "+a=2"], ["+a=1", "++a=2"], ["~a", "~a"]):
        with pytest.raises(ValueError, match="set it one way"):
            reproduce.last_wins(clash)


def test_flow_grpo_runs_on_the_shipped_flow_model_at_toy_scale_evaluated_at_its_sampling_steps():
    overrides, rewards, settings = reproduce.toy_overrides("flowgrpo_sd35m_geneval")
    toy = reproduce.experiment_config("flowgrpo_sd35m_geneval", overrides)
    assert (toy.model.name, toy.reward.name, toy.prompts.name) == ("toy_flow", "jpeg", "shapes")
    assert toy.model.finetune == "lora" and toy.algorithm.learning_rate == 3e-4  # Flow-GRPO's, not TOY_COMMON's full
    assert toy.eval.num_steps == toy.sample.num_steps == 10 and toy.sample.eta == 0.7  # Flow-GRPO's noise level
    assert rewards.split(",")[0] == "jpeg" and "jpeg.fn.objective=compressibility" in settings


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


# Each paper preset's counts as its reference code sets them, in rlfuse's units (images, not prompts):
# (processes, images per sampling batch, sampling batches per epoch, trajectories per training minibatch,
#  minibatches per optimizer step, samples per epoch over all processes, optimizer steps per epoch).
D3PO_JPEG = (8, 20, 2, 2, 1, 320, 20)  # yk7333/d3po config/base.py at 40d3175: sample.batch_size 10 prompts x 2 images
# (scripts/train_with_rm.py samples each prompt twice), 2 batches, train.batch_size 1 pair, no accumulation; 8 GPUs
# is the presets' launch (the reference gives per-GPU numbers only)
REFERENCE_COUNTS = {
    # kvablack/ddpo-pytorch config/dgx.py at 1958463, compressibility(): "8 * 8 * 4 = 256 samples per epoch",
    # "(8 * 4) / (4 * 2) = 4 gradient updates per epoch"; incompressibility() the same
    "ddpo_sd15_compressibility": (8, 8, 4, 4, 2, 256, 4),
    "ddpo_sd15_incompressibility": (8, 8, 4, 4, 2, 256, 4),
    "ddpo_sd15_aesthetic": (8, 8, 4, 4, 4, 256, 2),      # aesthetic(): gradient_accumulation_steps 4, "2 gradient updates"
    "ddpo_sd15_alignment": (6, 8, 6, 4, 6, 288, 2),      # prompt_image_alignment(): "8 * 6 * 6 = 288", "(8 * 6) / (4 * 6) = 2"
    "d3po_sd15_compressibility": D3PO_JPEG,
    "d3po_sd15_incompressibility": D3PO_JPEG,
    "d3po_sd15_human_alignment": D3PO_JPEG,
    "d3po_sd15_human_distortion": D3PO_JPEG,
    "d3po_sd15_human_safety": D3PO_JPEG,
    "d3po_sd15_aesthetic": (8, 16, 1, 2, 1, 128, 8),     # its aesthetic settings: 1 batch of 8 prompts x 2 images
    # google-research/google-research dpok/README.md at 83282e4, single prompt: --g_batch_size 10 --p_batch_size 4
    # --gradient_accumulation_steps 12 on one GPU, and train_online_pg.py at 1d49f2c: --p_step 5 updates per round
    "dpok_sd15_imagereward": (1, 10, 1, 4, 12, 10, 5),
    # multiple prompts: --g_batch_size 6 --p_batch_size 2 per GPU (the GPU count is the preset's launch line's)
    "dpok_sd15_drawbench": (8, 6, 1, 2, 12, 48, 5),
}


def launch_processes(name: str) -> int:
    """The process count of the experiment file's launch line (1 for `python -m rlfuse.train`)."""
    from rlfuse.cli import CONF_DIR

    launch = next(line for line in (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
                  if line.startswith("# Launch:"))
    found = re.search(r"--num_processes (\d+)", launch)
    return int(found.group(1)) if found else 1


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_every_paper_preset_has_its_reference_codes_counts_per_gpu(name):
    processes, images, batches, minibatch, accumulation, samples, updates = REFERENCE_COUNTS[name]
    cfg = reproduce.experiment_config(name, given_inputs(name))
    hw, algorithm = cfg.hardware, cfg.algorithm
    assert launch_processes(name) == processes
    assert (hw.sample_batch_size, cfg.sample.batches_per_epoch) == (images, batches)
    assert (hw.train_batch_size, algorithm.gradient_accumulation_steps) == (minibatch, accumulation)
    assert processes * batches * images == samples
    replay = algorithm.objective.get("replay_buffer", {}).get("capacity", 0) > 0
    if replay:  # DPOK's schedule: a fixed number of updates per round
        assert algorithm.objective.replay_buffer.updates_per_round == updates
    else:
        assert batches * images // (minibatch * accumulation) == updates
    if cfg.algorithm.name == "d3po":  # whole pairs: two images of a prompt from one noise, one pair per minibatch
        assert cfg.sample.images_per_prompt == 2 and cfg.sample.same_noise_per_prompt and minibatch == 2
    if cfg.algorithm.name == "ddpo":
        assert cfg.model.name == "sd14" and cfg.model.pretrained == "CompVis/stable-diffusion-v1-4"


def test_the_paper_experiments_all_have_reference_counts():
    papers = [n for n in reproduce.EXPERIMENTS if n.startswith(("ddpo_", "d3po_", "dpok_"))]
    assert sorted(papers) == sorted(REFERENCE_COUNTS)


@pytest.mark.parametrize("name, reward_weight, kl_weight", [("dpok_sd15_imagereward", 10.0, 0.01),
                                                            ("dpok_sd15_drawbench", 1000.0, 0.1)])
def test_dpok_presets_follow_the_published_commands(name, reward_weight, kl_weight):
    """dpok/README.md at 83282e4 (its two commands) and train_online_pg.py at 1d49f2c (the defaults they keep)."""
    objective = reproduce.experiment_config(name).algorithm.objective
    assert (objective.reward_weight, objective.kl_weight, objective.kl, objective.baseline) == \
        (reward_weight, kl_weight, "noise", "value")
    assert dict(objective.replay_buffer) == {"capacity": 1000, "updates_per_round": 5, "value_minibatches": 5,
                                             "value_batch_size": 256}
    cfg = reproduce.experiment_config(name)
    assert (cfg.algorithm.learning_rate, cfg.algorithm.max_grad_norm, objective.clip_range) == (1e-5, 0.1, 1e-4)
    assert (cfg.sample.num_steps, cfg.sample.guidance_scale, cfg.sample.eta) == (50, 7.5, 1.0)


@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_every_published_entry_cites_the_table_or_figure_it_comes_from(name):
    published = reproduce.EXPERIMENTS[name][1]
    assert re.search(r"\b(tab|fig)\.|\btable\b", published, re.IGNORECASE), published
    assert "|" not in published  # a cell of REPORT.md's table


@pytest.mark.slow
def test_toy_experiments_that_map_to_the_same_run_share_one_key_and_others_do_not():
    keys = {name: reproduce.plan(name, "toy")["key"] for name in
            ("ddpo_sd15_aesthetic", "ddpo_sd15_alignment", "flowgrpo_sd35m_pickscore", "flowgrpo_sd35m_ocr",
             "dpok_sd15_imagereward", "dpok_sd15_drawbench", "d3po_sd15_human_safety")}
    assert keys["ddpo_sd15_aesthetic"] == keys["ddpo_sd15_alignment"]
    assert keys["flowgrpo_sd35m_pickscore"] == keys["flowgrpo_sd35m_ocr"]
    assert keys["dpok_sd15_imagereward"] != keys["dpok_sd15_drawbench"]      # other prompts or guidance
    assert len({keys["ddpo_sd15_aesthetic"], keys["flowgrpo_sd35m_ocr"], keys["dpok_sd15_imagereward"]}) == 3
    assert keys["d3po_sd15_human_safety"] is None                              # not run: nothing to share


def test_the_longest_experiments_start_first_and_the_report_keeps_the_given_order(tmp_path, monkeypatch):
    started = []

    def fake_run(plan, out, gpus, threads):
        started.append(plan["name"])
        paper, published, _ = reproduce.EXPERIMENTS[plan["name"]]
        return {"experiment": plan["name"], "paper": paper, "published": published, "status": "not run: a test"}

    monkeypatch.setattr(reproduce, "run_experiment", fake_run)
    names = ["ddpo_sd15_compressibility", "flowgrpo_sd35m_ocr", "ddpo_sd15_aesthetic", "ddpo_sd15_alignment"]
    text = reproduce.reproduce("toy", tmp_path, names, jobs=1).read_text()
    # toy (3.6 min) before toy_flow (2.0) before tiny (1.1); alignment is aesthetic's run, not started again
    assert started == ["ddpo_sd15_aesthetic", "flowgrpo_sd35m_ocr", "ddpo_sd15_compressibility"]
    rows = [line.split(" |")[0][2:] for line in text.splitlines() if line.startswith("| ddpo") or
            line.startswith("| flow")]
    assert rows == names


def test_two_short_toy_runs_at_a_time_render_the_report_with_scores_grids_and_curves(tmp_path, monkeypatch):
    """A DDIM and a flow experiment (about 18 s each), run side by side as --jobs 2 does; a third experiment
    that maps to the same run as the flow one is reported from it, not run again."""
    short = [o for o in reproduce.TOY_COMMON if not o.startswith(("eval.num_images=", "sample.num_steps="))]
    monkeypatch.setattr(reproduce, "TOY_COMMON", [*short, "eval.num_images=4", "sample.num_steps=4"])
    monkeypatch.setattr(reproduce, "TOY_EPOCHS", dict.fromkeys(reproduce.TOY_EPOCHS, 1))
    monkeypatch.setattr(reproduce, "EVAL_SIZE", ["--num-prompts", "2", "--images-per-prompt", "2"])
    names = ["ddpo_sd15_compressibility", "flowgrpo_sd35m_geneval"]
    report = reproduce.reproduce("toy", tmp_path, [*names, "flowgrpo_sd35m_ocr"], jobs=2)
    text = report.read_text()
    assert "3 of 3 experiments run (2 trainings" in text and "2 at a time" in text
    assert "| [flowgrpo_sd35m_ocr](evaluations/flowgrpo_sd35m_geneval/REPORT.md) (the run of " \
           "flowgrpo_sd35m_geneval) |" in text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)   # two runs, not three
    assert len(list((tmp_path / reproduce.BASE_CACHE).glob("base_*.safetensors"))) == 2  # each base model's images
    for name in names:
        assert f"| [{name}](evaluations/{name}/REPORT.md) |" in text
        assert f"| {reproduce.EXPERIMENTS[name][1]} |" in text  # the published column
        evaluation = tmp_path / "evaluations" / name
        numbers = json.loads((evaluation / "report.json").read_text())
        others = {"alignment"} if name.startswith("ddpo") else {"shapes"}  # tiny's random images | toy_flow's shapes
        assert set(numbers["scores"]) == {"jpeg", "diversity", *others} and numbers["scores"]["jpeg"]["trained_on"]
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


def test_the_change_is_a_paired_difference_with_the_standard_error_of_its_mean():
    from rlfuse.evaluate import paired_change

    before = torch.tensor([0.2, 0.5, 0.9, 0.4])
    after = torch.tensor([0.3, 0.7, 0.9, 0.6])  # differences 0.1, 0.2, 0.0, 0.2: mean 0.125
    numbers = paired_change(before, after)
    assert numbers["base"] == pytest.approx(0.5) and numbers["finetuned"] == pytest.approx(0.625)
    assert numbers["change"] == pytest.approx(0.125)
    # sample standard deviation of the differences: sqrt(((-.025)^2 + .075^2 + (-.125)^2 + .075^2) / 3) = 0.0957
    assert numbers["stderr"] == pytest.approx(0.095743 / 2, rel=1e-4)
    # the spread of the scores themselves does not enter: a constant shift has no error
    assert paired_change(before, before + 0.1)["stderr"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("change, stderr, expected", [
    (0.05, 0.02, "rose"), (-0.05, 0.02, "fell"), (0.03, 0.02, "no clear change"), (0.1, float("nan"), "no clear change"),
])
def test_the_report_calls_a_change_only_beyond_two_standard_errors(change, stderr, expected):
    assert reproduce.verdict({"change": change, "stderr": stderr}) == expected


def test_reproduce_refuses_zero_jobs_in_one_line(tmp_path, capsys):
    code, stderr = run_main(reproduce.main, ["--scale", "toy", "--jobs", "0", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--jobs 0" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
