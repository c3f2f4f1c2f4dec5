"""Human feedback without a reward model: `python -m rlfuse.sample` writes a dataset the annotator
accepts, with chains that re-score; training replays its labelled pairs (feedback=human) and moves
the model the labelled way; bad datasets stop the trainer in one line."""

import io
import json
import os
import subprocess
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlfuse.annotate.dataset import load_dataset
from rlfuse.annotate.store import Label, open_store, pair_item

TINY = ["model=tiny", "prompts=simple_animals", "sample.num_steps=4"]
TINY_TRAIN = [*TINY, "reward=jpeg", "algorithm=d3po", "feedback=human", "eval.every=0", "progress=false"]


def sample_in_process(out: Path, *overrides: str) -> Path:
    """What `python -m rlfuse.sample out=<out> <overrides>` does, without a new interpreter."""
    from rlfuse.cli import check_overrides
    from rlfuse.sample import sample

    sample(check_overrides("sample", [f"out={out}", *overrides, "progress=false"]))
    return out


def brightness(dataset: Path) -> np.ndarray:
    """(G, K) mean pixel value in [0, 1] of each image, as saved."""
    return np.array([[np.asarray(Image.open(f).convert("RGB")).mean() / 255 for f in group.files]
                     for group in load_dataset(dataset).groups])


def label_brightest_over_darkest(dataset: Path, annotator: str = "bot") -> None:
    """One `pair` label per group, as a person would give it on the page: the brightest image wins
    over the darkest."""
    values = brightness(dataset)
    store = open_store(load_dataset(dataset))
    try:
        store.add_many([Label(annotator, "pair", g, pair_item(int(row.argmax()), int(row.argmin())),
                              {"winner": int(row.argmax()), "loser": int(row.argmin())})
                        for g, row in enumerate(values)])
    finally:
        store.close()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return sample_in_process(tmp_path_factory.mktemp("feedback") / "tiny", *TINY, "num_prompts=3")


@pytest.fixture
def labelled_copy(tiny_dataset, tmp_path) -> Path:
    """A copy of the tiny dataset with one label per group (tests may break it)."""
    import shutil

    copy = Path(shutil.copytree(tiny_dataset, tmp_path / "dataset"))
    label_brightest_over_darkest(copy)
    return copy


# ----------------------------------------------------------------------------- sampling


def test_sample_writes_a_dataset_the_annotator_accepts_with_shared_noise_per_group(tiny_dataset):
    from rlfuse.feedback import TRAJECTORIES, load_trajectories, sha256_file

    dataset = load_dataset(tiny_dataset)  # checks every image and its sha256
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert dataset.images_per_prompt == 4 and len(dataset.groups) == 3
    assert manifest["files"] == {TRAJECTORIES: sha256_file(tiny_dataset / TRAJECTORIES)}
    assert manifest["sampler"] == {"scheduler": "DDIM", "sde_type": None, "num_steps": 4, "guidance_scale": 5.0,
                                   "eta": 1.0, "resolution": 32}
    assert manifest["model"]["pretrained"] is None and manifest["model"]["lora_weights"] == [] and manifest["created"]
    assert manifest["model"]["family"] == "sd"
    chains = load_trajectories(tiny_dataset / TRAJECTORIES)
    assert chains["latents"].shape == (12, 5, 4, 16, 16) and chains["log_probs"].shape == (12, 4)
    assert chains["timesteps"].shape == (4,)
    first = chains["latents"][:, 0].reshape(3, 4, -1)       # x_T of group g, image k
    assert torch.equal(first, first[:, :1].expand_as(first)), "the K images of a prompt share their initial noise"
    assert not torch.equal(first[0, 0], first[1, 0]), "groups have their own noise"
    final = chains["latents"][:, -1].reshape(3, 4, -1)
    assert all(not torch.equal(final[g, 0], final[g, k]) for g in range(3) for k in range(1, 4))
    assert not [p for p in tiny_dataset.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_stored_log_probs_rescore_with_the_same_model(tiny_dataset):
    """Recomputing log p(x_{t-1} | x_t) of every stored transition gives the stored value."""
    from rlfuse.families.sd import StableDiffusion
    from rlfuse.families.tiny import build_tiny_pipeline
    from rlfuse.feedback import TRAJECTORIES, load_trajectories
    from rlfuse.policy import Policy
    from rlfuse.trajectories import Trajectories

    family = StableDiffusion(build_tiny_pipeline(seed=0))
    chains = load_trajectories(tiny_dataset / TRAJECTORIES)
    prompts = [group.prompt for group in load_dataset(tiny_dataset).groups for _ in range(4)]
    batch = Trajectories(conditioning=family.encode_prompts(prompts, torch.device("cpu")),
                         latents=chains["latents"][:, :-1], next_latents=chains["latents"][:, 1:],
                         timesteps=chains["timesteps"].expand(12, -1), log_probs=chains["log_probs"],
                         rewards=torch.zeros(12), reward_terms=torch.zeros(12, 0), advantages=torch.zeros(12),
                         prompts=prompts, sample_ids=torch.arange(12))
    sampler = family.sampler(1.0)
    sampler.set_timesteps(4)
    policy = Policy(family.network, family, sampler, guidance_scale=5.0)
    with torch.no_grad():
        rescored = torch.stack([policy.log_prob(batch, torch.full((12,), j)) for j in range(4)], dim=1)
    torch.testing.assert_close(rescored, chains["log_probs"], atol=1e-4, rtol=0)


def test_sample_refuses_an_existing_folder_and_leaves_it_alone(tiny_dataset):
    from rlfuse.cli import check_overrides
    from rlfuse.errors import UserError
    from rlfuse.sample import preflight, write_dataset

    before = (tiny_dataset / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="already exists; a dataset is never overwritten"):
        preflight(check_overrides("sample", [f"out={tiny_dataset}", *TINY]))
    with pytest.raises(UserError, match="appeared while sampling"):  # made by someone else during sampling
        write_dataset(tiny_dataset, {}, ["a"], [0], np.zeros((2, 8, 8, 3), np.uint8), torch.zeros(2, 2, 1),
                      torch.zeros(2, 1), torch.zeros(1))
    assert (tiny_dataset / "manifest.json").read_bytes() == before
    assert not [p for p in tiny_dataset.parent.iterdir() if p.name.startswith(".")]


def test_sampling_from_a_saved_lora_folder_gives_other_images_from_the_same_noise(tiny_dataset, tmp_path):
    """A later round samples from the LoRA a run exported (model.lora_weights), fused into the UNet."""
    from rlfuse.feedback import TRAJECTORIES, load_trajectories
    from rlfuse.families.sd import StableDiffusion
    from rlfuse.families.tiny import build_tiny_pipeline
    from rlfuse.lora import add_lora, trainable_parameters

    family = StableDiffusion(build_tiny_pipeline(seed=0))
    unet = family.network
    add_lora(unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"])
    with torch.no_grad():
        for name, weight in trainable_parameters(unet).items():
            weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    family.export_lora(unet, tmp_path / "lora")
    later = sample_in_process(tmp_path / "round2", *TINY, "num_prompts=3", f"model.lora_weights={tmp_path / 'lora'}")
    manifest = json.loads((later / "manifest.json").read_text())
    assert manifest["model"]["lora_weights"] == [str((tmp_path / "lora").resolve())]
    base, tuned = (load_trajectories(d / TRAJECTORIES)["latents"] for d in (tiny_dataset, later))
    assert torch.equal(base[:, 0], tuned[:, 0]), "same seeds, same initial noise"
    assert (base[:, -1] - tuned[:, -1]).abs().mean() > 0.05
    assert [g.sha256 for g in load_dataset(later).groups] != [g.sha256 for g in load_dataset(tiny_dataset).groups]


# ----------------------------------------------------------------------------- replay


def test_replay_rows_are_winner_then_loser_of_each_labelled_pair_split_evenly_over_processes(labelled_copy):
    from rlfuse.algorithms.d3po import D3PO
    from rlfuse.annotate.store import preference_pairs
    from rlfuse.families.sd import StableDiffusion
    from rlfuse.families.tiny import build_tiny_pipeline
    from rlfuse.sources.replay import load_replay

    pairs = preference_pairs(labelled_copy)
    assert len(pairs) == 3
    family = StableDiffusion(build_tiny_pipeline(seed=0))
    replay = load_replay(str(labelled_copy), family, torch.device("cpu"), seed=0, grid_images=4)
    batch, images, details = replay.epoch(1)
    assert len(batch) == 6 and images.shape == (4, 3, 32, 32) and details == {}
    assert replay.pairs
    preferences, stats = D3PO().advantages(batch.prompts, batch.rewards, batch.reward_terms)
    assert preferences.tolist() == [1.0, -1.0] * 3 and stats["pairs_decided"] == 1.0
    for i in range(3):  # both rows of a pair come from their group's shared noise, the winner first
        group = next(g for g, w, _ in pairs if torch.equal(batch.next_latents[2 * i, -1], replay.latents[4 * g + w, -1]))
        assert torch.equal(batch.latents[2 * i, 0], batch.latents[2 * i + 1, 0])
        assert batch.prompts[2 * i] == batch.prompts[2 * i + 1] == replay.prompts[group]
        # each row is conditioned on its own group's prompt
        torch.testing.assert_close(batch.conditioning["prompt_embeds"][2 * i],
                                   family.encode_prompts([replay.prompts[group]], torch.device("cpu"))["prompt_embeds"][0])
    shares = []
    for rank in range(2):  # 3 pairs over 2 processes: 1 each
        replay.rank, replay.world = rank, 2
        shares.append(replay.epoch(1).samples)
    assert [len(s) for s in shares] == [2, 2] and set(shares[0].sample_ids.tolist()).isdisjoint(shares[1].sample_ids.tolist())


# ----------------------------------------------------------------------------- start-up checks


def run_train_in_process(*args: str) -> tuple[int, str]:
    """`python -m rlfuse.train <args>` up to its start-up checks, in this process: (exit code, stderr)."""
    from rlfuse.train import main

    argv, stderr = sys.argv, io.StringIO()
    sys.argv = ["rlfuse.train", *args]
    try:
        with redirect_stderr(stderr):
            main()
    except SystemExit as stop:
        return stop.code, stderr.getvalue()
    finally:
        sys.argv = argv
    return 0, stderr.getvalue()


def break_trajectories(dataset: Path, how: str) -> None:
    path = dataset / "trajectories.safetensors"
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")


@pytest.mark.parametrize("change, overrides, expected", [
    (lambda d: break_trajectories(d, "missing"), [], "trajectories.safetensors is missing"),
    (lambda d: break_trajectories(d, "changed"), [], "the file changed since sampling"),
    (lambda d: (d / "labels.sqlite").unlink(), [], "annotate first: python -m rlfuse.annotate"),
    (None, ["model.tiny_seed=1"], "sampled with model.tiny_seed=0, this run has model.tiny_seed=1"),
    (None, ["sample.num_steps=6"], "sampled with sample.num_steps=4, this run has sample.num_steps=6"),
    (None, ["algorithm=ddpo"], "algorithm=ddpo cannot learn from preference labels; add algorithm=d3po"),
], ids=["trajectories_missing", "trajectories_changed", "no_labels", "model_mismatch", "steps_mismatch",
        "not_d3po"])
def test_bad_feedback_datasets_stop_training_in_one_line_with_exit_2_and_no_run_folder(
        labelled_copy, tmp_path, change, overrides, expected):
    if change is not None:
        change(labelled_copy)
    code, stderr = run_train_in_process(*TINY_TRAIN, f"feedback.path={labelled_copy}", *overrides,
                                        f"run_root={tmp_path / 'runs'}")
    assert code == 2 and expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()


def test_feedback_human_needs_a_path(tmp_path):
    code, stderr = run_train_in_process(*TINY_TRAIN, f"run_root={tmp_path / 'runs'}")
    assert code == 2 and "feedback.path: required but not set" in stderr, stderr


# ----------------------------------------------------------------------------- a round, and learning


def cli(module: str, *args: str) -> subprocess.Popen:
    """`python -m <module> <args>` started offline on one thread (so that its numbers do not depend on
    the machine's core count); wait for it with finish()."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_round_through_the_clis_makes_images_brighter_when_people_prefer_brighter_ones(tmp_path):
    """sample -> label (the brightest image of each prompt beats the darkest) -> D3PO on the labels
    -> sample again from the new LoRA: at fresh seeds, images are brighter than the base model's at
    the same seeds. model=toy (a trained model: there, brighter means fewer or smaller shapes)."""
    toy, fresh = ["model=toy", "progress=false"], ["num_prompts=16", "seed=100"]
    sampling = cli("rlfuse.sample", f"out={tmp_path / 'round1'}", *toy, "num_prompts=24", "seed=0")
    with one_thread():  # the base model at the fresh seeds, meanwhile
        base = brightness(sample_in_process(tmp_path / "base", *toy, *fresh))
    finish(sampling)
    label_brightest_over_darkest(tmp_path / "round1")
    finish(cli("rlfuse.train", "algorithm=d3po", "feedback=human", f"feedback.path={tmp_path / 'round1'}", *toy,
               "model.finetune=lora", "epochs=3", "algorithm.learning_rate=1e-3", "algorithm.timestep_fraction=0.3",
               "hardware.train_batch_size=4", "eval.every=3", "eval.num_images=4", "log.images_every=0",
               f"run_root={tmp_path / 'runs'}"))
    run_dir = next((tmp_path / "runs").glob("*/*/checkpoints")).parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and "eval_reward_mean" in rows[-1]  # eval still runs
    assert rows[1]["samples"] == 48 and rows[1]["pairs_decided"] == 1.0  # 24 labelled pairs, winner and loser
    lora = sorted(run_dir.glob("checkpoints/epoch_*/lora"))[-1]
    finish(cli("rlfuse.sample", f"out={tmp_path / 'round2'}", *toy, *fresh, f"model.lora_weights={lora}"))
    rise = brightness(tmp_path / "round2") - base   # (16, 4): same prompts, same noise
    standard_error = rise.mean(1).std(ddof=1) / len(rise) ** 0.5
    # Measured by hand at these settings (docs/human-feedback.md): +0.0152 (this dataset, seed 0) and
    # +0.0166 (seed 1), standard error 0.0035-0.0037 over the 16 prompts; the per-image spread of
    # brightness is 0.023. 0.007 is two standard errors above no change and over two below the rises seen.
    assert rise.mean() > 0.007 and rise.mean() > 2 * standard_error, (rise.mean(), standard_error)
