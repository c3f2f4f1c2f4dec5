"""rlfuse.evaluate --base-cache: the base model's images are drawn once and reused by evaluations that
would draw the same ones, with reports equal to evaluations without the cache."""

import json

import pytest

from rlfuse import evaluate as evaluation
from tests.test_train import FAST, train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return train(root, *FAST, "epochs=1", "model.finetune=full", "algorithm.learning_rate=1e-2",
                 "log.images_every=0", "checkpoint.every=1")


def run_evaluate(run, out, *extra):
    evaluation.main([str(run), "--num-prompts", "3", "--images-per-prompt", "2", "--rewards", "jpeg",
                     "--out", str(out), *extra])
    report = json.loads((out / "report.json").read_text())
    return {key: report[key] for key in ("scores", "diversity", "drift")}


def test_the_base_images_are_drawn_once_and_the_report_is_the_same_as_without_the_cache(tmp_path, tiny_run,
                                                                                          monkeypatch):
    plain = run_evaluate(tiny_run, tmp_path / "plain")
    cache = tmp_path / "cache"
    assert run_evaluate(tiny_run, tmp_path / "first", "--base-cache", str(cache)) == plain   # a miss: drawn, kept
    assert len(list(cache.glob("base_*.safetensors"))) == 1 and not list(cache.glob(".base_*"))

    drawn = []
    real = evaluation.sample_images
    monkeypatch.setattr(evaluation, "sample_images", lambda *a, **k: drawn.append(1) or real(*a, **k))
    assert run_evaluate(tiny_run, tmp_path / "second", "--base-cache", str(cache)) == plain  # a hit
    assert len(drawn) == 1  # the fine-tuned model's images only

    drawn.clear()
    run_evaluate(tiny_run, tmp_path / "other", "--base-cache", str(cache), "--seed", "7")    # other noise: a miss
    assert len(drawn) == 2 and len(list(cache.glob("base_*.safetensors"))) == 2


def test_a_damaged_cache_entry_is_drawn_again_and_replaced(tmp_path, tiny_run, capsys):
    cache = tmp_path / "cache"
    plain = run_evaluate(tiny_run, tmp_path / "first", "--base-cache", str(cache))
    (entry,) = cache.glob("base_*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, as by a full disk
    assert run_evaluate(tiny_run, tmp_path / "second", "--base-cache", str(cache)) == plain
    assert "unreadable, drawing the base images again" in capsys.readouterr().err
    assert evaluation.read_base(cache, entry.name[len("base_"):-len(".safetensors")]) is not None  # replaced whole


def test_a_file_given_as_the_cache_folder_is_one_line_and_exit_2(tmp_path, tiny_run, capsys):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit) as stop:
        evaluation.main([str(tiny_run), "--base-cache", str(not_a_folder)])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and "--base-cache" in stderr and "is a file" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_the_key_changes_with_what_changes_the_base_images_and_only_then(tiny_run, monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tiny_run / "config.yaml")
    prompts, seeds, sampler = ["a cat", "a dog"], [1, 2], (6, 5.0, 1.0, 32, None)
    key = evaluation.base_key(cfg, prompts, seeds, sampler)
    assert evaluation.base_key(OmegaConf.load(tiny_run / "config.yaml"), list(prompts), list(seeds), sampler) == key
    other_model = OmegaConf.merge(cfg, {"model": {"tiny_seed": cfg.model.tiny_seed + 1}})
    changed = [evaluation.base_key(other_model, prompts, seeds, sampler),
               evaluation.base_key(cfg, ["a cat", "a fox"], seeds, sampler),
               evaluation.base_key(cfg, prompts, [1, 3], sampler),
               evaluation.base_key(cfg, prompts, seeds, (6, 5.0, 0.5, 32, None)),   # eta
               evaluation.base_key(cfg, prompts, seeds, (10, 5.0, 1.0, 32, None)),  # steps
               evaluation.base_key(cfg, prompts, seeds, (6, 7.5, 1.0, 32, None))]   # guidance
    monkeypatch.setattr(evaluation.torch, "get_num_threads", lambda: 97)
    changed.append(evaluation.base_key(cfg, prompts, seeds, sampler))                # another thread count
    assert len({key, *changed}) == len(changed) + 1
