"""The pairs source: Pick-a-Pic-style parquet files (streamed, ties dropped, every malformed input in one
line), labelled rlfuse.sample datasets, reward-ranked pairs, and the batches of clean latents it makes."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rlfuse.errors import UserError
from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.sources.pairs import (DatasetPairs, LatentCache, PairsSource, ParquetPairs, RankedPairs, RankedSettings,
                                  load_image, open_pairs)
from tests.annotate.annotate_helpers import write_dataset
from tests.brightness_reward import BrightnessReward


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, labels: list[float], row_group_size: int = 3, drop: str | None = None,
                  broken_row: int | None = None) -> Path:
    """Row i: caption "caption i", jpg_0 a grey of value i, jpg_1 of value 100 + i, label_0 labels[i]."""
    columns = {"caption": [f"caption {i}" for i in range(len(labels))],
               "jpg_0": [png((i, i, i)) for i in range(len(labels))],
               "jpg_1": [png((100 + i,) * 3) for i in range(len(labels))], "label_0": labels}
    if broken_row is not None:
        columns["jpg_1"][broken_row] = b"not an image"
    columns.pop(drop, None)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def grey(item_image: bytes) -> int:
    return int(np.asarray(Image.open(io.BytesIO(item_image)))[0, 0, 0])


def test_parquet_pairs_put_the_winner_first_drop_ties_and_cycle_in_file_order(tmp_path):
    labels = [1, 0, 0.5, 1, 0, 1, 0.5]                    # rows 2 and 6 are ties
    pool = open_pairs(str(write_parquet(tmp_path / "a.parquet", labels)), seed=0)
    assert isinstance(pool, ParquetPairs) and len(pool) == 5 and pool.ties == 2
    first = pool.pairs(epoch=1, count=3)
    assert [item.prompt for item in first] == ["caption 0", "caption 1", "caption 3"]
    # label_0 = 1: jpg_0 (grey i) won; label_0 = 0: jpg_1 (grey 100 + i) won.
    assert [(grey(item.images[0]), grey(item.images[1])) for item in first] == [(0, 100), (101, 1), (3, 103)]
    second = pool.pairs(epoch=2, count=3)                  # the next pairs, wrapping to the start
    assert [item.prompt for item in second] == ["caption 4", "caption 5", "caption 0"]
    assert first[0].keys == second[2].keys and first[0].keys[0] != first[0].keys[1]


def test_a_folder_of_parquet_files_is_read_as_one_sequence(tmp_path):
    write_parquet(tmp_path / "part-0.parquet", [1, 0.5])
    write_parquet(tmp_path / "part-1.parquet", [0, 1])
    pool = open_pairs(str(tmp_path), seed=0)
    assert len(pool) == 3
    assert [grey(item.images[0]) for item in pool.pairs(1, 3)] == [0, 100, 1]


def written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.parquet", "no such file or folder"),
    (lambda d: write_parquet(d / "a.parquet", [1, 0], drop="label_0"), "missing column(s) label_0"),
    (lambda d: write_parquet(d / "a.parquet", [0.5, 0.5, 0.5]), "no usable pairs in 1 parquet file(s): every row is a tie"),
    (lambda d: written(d / "a.parquet", "PAR1 but not really"), "not a readable parquet file"),
    (lambda d: written(d / "notes.txt", "x"), "not a .parquet file"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no .parquet file"),
], ids=["missing_file", "missing_column", "all_ties", "not_parquet", "other_file", "empty_folder"])
def test_malformed_pair_files_raise_one_line(tmp_path, make, expected):
    with pytest.raises(UserError) as error:
        open_pairs(str(make(tmp_path)), seed=0)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_an_undecodable_image_names_its_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", [1, 0, 0.5, 1], broken_row=3)
    pool = open_pairs(str(path), seed=0)
    with pytest.raises(UserError, match=rf"{path}: row 3: jpg_1: not a decodable image"):
        pool.check_images(resolution=16)


def test_images_are_resized_on_the_shorter_side_and_centre_cropped():
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 12, 30))               # a red fifth on the left
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = load_image(buffer.getvalue(), 16, "test")
    assert pixels.shape == (16, 16, 3)
    assert pixels[:, 0, 0].max() < 10                       # the red fifth is cropped away


def test_parquet_reading_does_not_hold_the_images_of_unread_rows(tmp_path, monkeypatch):
    """Only the row groups of the requested pairs are read, in batches."""
    path = write_parquet(tmp_path / "a.parquet", [1.0] * 30, row_group_size=10)
    pool = open_pairs(str(path), seed=0)
    asked = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("row_groups"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    items = pool.read([21, 25])
    assert asked == [[2]] and [item.prompt for item in items] == ["caption 21", "caption 25"]


def label(dataset: Path, pairs: list[tuple[int, int, int]], annotator: str = "ann") -> None:
    from rlfuse.annotate.dataset import load_dataset
    from rlfuse.annotate.store import Label, open_store, pair_item

    store = open_store(load_dataset(dataset))
    store.add_many([Label(annotator, "pair", g, pair_item(w, l_), {"winner": w, "loser": l_}) for g, w, l_ in pairs])
    store.close()


def test_labelled_datasets_give_their_preference_pairs_winner_first(tmp_path):
    first = write_dataset(tmp_path / "sets" / "round1", k_images=2)
    second = write_dataset(tmp_path / "sets" / "round2", k_images=2)
    label(first, [(0, 1, 0), (2, 0, 1)])
    label(second, [(1, 0, 1)])
    pool = open_pairs(str(tmp_path / "sets"), seed=0)
    assert isinstance(pool, DatasetPairs) and len(pool) == 3
    items = sorted(pool.pairs(1, 3), key=lambda item: item.keys)
    assert [(Path(item.images[0]).name, Path(item.images[1]).name) for item in items] == [
        ("0000-1.png", "0000-0.png"), ("0002-0.png", "0002-1.png"), ("0001-0.png", "0001-1.png")]
    assert items[0].prompt == "a red circle"
    assert open_pairs(str(first), seed=0).pairs(1, 2)[0].prompt in ("a red circle", "a green triangle above a yellow circle")


def test_datasets_without_preferences_are_refused(tmp_path):
    dataset = write_dataset(tmp_path / "d", k_images=2)
    with pytest.raises(UserError, match="no labels yet"):
        open_pairs(str(dataset), seed=0)
    label(dataset, [(0, 1, 0)], "a")
    label(dataset, [(0, 0, 1)], "b")                         # opposite votes cancel
    with pytest.raises(UserError, match="state no preference"):
        open_pairs(str(dataset), seed=0)


def test_the_latent_cache_keeps_the_most_recent_entries():
    cache = LatentCache(2)
    for key in "abc":
        cache.put(key, torch.zeros(1))
        cache.get("a")
    assert list(cache.entries) == ["c", "a"]


@pytest.fixture(scope="module")
def family():
    return StableDiffusion(build_tiny_pipeline(seed=0))


def test_a_pairs_batch_holds_winner_and_loser_latents_each_image_encoded_once(tmp_path, family, monkeypatch):
    from rlfuse.families import common

    pool = open_pairs(str(write_parquet(tmp_path / "a.parquet", [1, 0, 1, 0])), seed=0)
    encoded = []
    original = common.encode_images

    def counting(vae, images):
        encoded.append(len(images))
        return original(vae, images)

    monkeypatch.setattr("rlfuse.sources.pairs.encode_images", counting)
    source = PairsSource(pool, family, resolution=32, pairs_per_epoch=4, cache_size=100, device=torch.device("cpu"),
                         rank=1, world=2, grid_images=2)
    batch = source.epoch(1)
    samples = batch.samples
    assert len(samples) == 4 and samples.prompts == ["caption 2", "caption 2", "caption 3", "caption 3"]
    assert samples.next_latents.shape == (4, 1, 4, 16, 16) and samples.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert samples.sample_ids.tolist() == [4, 5, 6, 7] and batch.images.shape == (2, 3, 32, 32)
    # The winner of caption 2 is grey 2 (label 1), of caption 3 grey 103: their latents differ from the losers'.
    assert not torch.equal(samples.next_latents[0], samples.next_latents[1])
    assert sum(encoded) == 4
    source.epoch(3)                                          # epoch 3 reads the same pairs again: cached
    assert sum(encoded) == 4


def test_reward_ranked_pairs_put_the_best_image_first_and_sample_once_when_offline(family):
    settings = RankedSettings(prompts_per_round=3, images_per_prompt=3, resample_every=0, num_steps=2,
                              guidance_scale=2.0, seed=0)
    sampler = family.sampler(1.0)
    pool = RankedPairs(family.network, family, sampler, BrightnessReward(), ["a cat", "a dog", "a fox"],
                       family.latent_shape(32), settings, torch.device("cpu"))
    items = pool.pairs(1, 3)
    assert 0 < len(items) <= 3 and all(item.rewards[0] > item.rewards[1] for item in items)
    for item in items:                                       # the stored latents decode to the scored brightness
        assert family.decode(item.images[0][None]).mean().item() == pytest.approx(item.rewards[0], abs=1e-4)
    keys = {item.keys for item in items}
    assert {item.keys for item in pool.pairs(5, 3)} == keys  # offline: the same round at a later epoch
    online = RankedPairs(family.network, family, sampler, BrightnessReward(), ["a cat", "a dog", "a fox"],
                         family.latent_shape(32), RankedSettings(3, 3, 1, 2, 2.0, 0), torch.device("cpu"))
    assert {item.keys for item in online.pairs(1, 3)} != {item.keys for item in online.pairs(2, 3)}


def test_a_saved_round_of_ranked_pairs_reads_back_as_a_parquet_file_of_the_same_pairs(family, tmp_path):
    """feedback.ranked.save: the round as Pick-a-Pic's layout, winner in jpg_0; read back through feedback.path,
    it gives the same captions in the same order, and its images are the round's decoded latents to 8 bits."""
    settings = RankedSettings(prompts_per_round=4, images_per_prompt=3, resample_every=0, num_steps=2,
                              guidance_scale=2.0, seed=0)
    pool = RankedPairs(family.network, family, family.sampler(1.0), BrightnessReward(),
                       ["a cat", "a dog", "a fox", "an owl"], family.latent_shape(32), settings, torch.device("cpu"),
                       save_dir=tmp_path / "pairs")
    pool.pairs(1, 4)
    items = pool.items                                   # the round in the order it was sampled, as saved
    saved = tmp_path / "pairs" / "ranked_epoch0001.parquet"
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == [saved.name]    # no partial file left
    table = pq.read_table(saved)
    assert table.column("label_0").to_pylist() == [1.0] * len(items)
    assert table.column("score_0").to_pylist() == pytest.approx([item.rewards[0] for item in items])
    assert table.column("score_1").to_pylist() == pytest.approx([item.rewards[1] for item in items])
    back = open_pairs(str(saved), seed=0)
    read = back.pairs(1, len(items))
    assert [item.prompt for item in read] == [item.prompt for item in items]
    # Each saved image is the round's latent decoded, to 8 bits (PNG is lossless).
    decoded = family.decode(torch.stack([latent for item in items for latent in item.images])).detach()
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(image)))).permute(2, 0, 1)
                          for item in read for image in item.images]).float() / 255
    assert (pixels - decoded).abs().max().item() <= 0.5 / 255 + 1e-6
    assert (decoded[0::2] - decoded[1::2]).abs().max().item() > 0.05        # winner and loser differ
    # training reads it like any pairs file: PairsSource encodes the saved images
    source = PairsSource(back, family, 32, len(items), 0, torch.device("cpu"))
    assert source.epoch(1).samples.next_latents.shape == (2 * len(items), 1, *family.latent_shape(32))
    # a round sampled again for the same epoch (a resumed run) keeps the earlier file and writes beside it
    again = RankedPairs(family.network, family, family.sampler(1.0), BrightnessReward(),
                        ["a cat", "a dog", "a fox", "an owl"], family.latent_shape(32), settings, torch.device("cpu"),
                        save_dir=tmp_path / "pairs")
    again.pairs(1, 4)
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == sorted([saved.name, "ranked_epoch0001-2.parquet"])
    assert pq.read_table(saved).equals(table)
