"""The pairs source: preference pairs of clean images for Diffusion-DPO (feedback=pairs). No chains.

Where the pairs come from (feedback.path, or none):
- Pick-a-Pic-style parquet files (a file or a folder of them): columns caption, jpg_0, jpg_1 (encoded
  image bytes) and label_0 (1: image 0 preferred, 0: image 1 preferred, 0.5: a tie, dropped). Only
  the label column is read whole, at start-up; images are read per epoch, row group by row group in
  small batches (pyarrow's ParquetFile.iter_batches), so a large dataset never sits in memory. An
  epoch takes the next pairs_per_epoch usable rows in file order, cycling.
- rlfuse.sample datasets labelled in the annotator (the folder of one, or a folder of them): every
  pair preference_pairs gives, with repeats by net votes; only the images are used (the chains are
  not). An epoch takes pairs_per_epoch of them from a seeded permutation, cycling.
- none: reward-ranked pairs. K images per prompt sampled by the current policy and scored by the
  run's reward; the best against the worst (a prompt whose images all score the same gives none).
  resample_every = N samples a new round every N epochs (online DPO), 0 samples once, at the first
  epoch, and trains offline on that round after. With a save folder, each round is also written there
  as a Pick-a-Pic-style parquet file (winner in jpg_0, PNG bytes; label_0 1; the scores in score_0 and
  score_1), which feedback.path reads back: one sampled round serves any number of offline runs.

Images are converted to RGB, resized (shorter side to the model's resolution) and centre-cropped,
then encoded by the family's VAE; the latents are kept in a bounded cache (least recently used out).
Rows 2i and 2i + 1 of a batch are a pair's winner and loser, with rewards 1 and 0 (reward-ranked
pairs: their scores), and x_0 in next_latents (B, 1, C, h, w) (latents holds x_0 too: there is no x_T).
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rlfuse.errors import UserError
from rlfuse.families import ModelFamily
from rlfuse.families.common import encode_images
from rlfuse.rewards.jpeg import to_uint8
from rlfuse.seeding import seed_for
from rlfuse.sources import EpochBatch
from rlfuse.trajectories import Conditioning, Trajectories

log = logging.getLogger("rlfuse")

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
READ_BATCH = 64     # parquet rows decoded at a time
CHECK_ROWS = 16     # usable rows whose images the start-up check decodes


class PairItem(NamedTuple):
    """One pair: its prompt, cache keys of winner and loser, and where their pixels come from
    (encoded bytes, an image file, or latents (C, h, w) already), and the two rewards."""

    prompt: str
    keys: tuple[str, str]
    images: tuple[bytes | Path | torch.Tensor, bytes | Path | torch.Tensor]
    rewards: tuple[float, float] = (1.0, 0.0)


def cycled(size: int, first: int, count: int, seed: int) -> list[int]:
    """Positions first .. first + count - 1 of an endless sequence of seeded permutations of range(size)."""
    out, permutations = [], {}
    for position in range(first, first + count):
        cycle = position // size
        if cycle not in permutations:
            permutations[cycle] = torch.randperm(size, generator=torch.Generator().manual_seed(seed_for(seed, cycle)))
        out.append(int(permutations[cycle][position % size]))
    return out


# ----------------------------------------------------------------------------- images


def load_image(source: bytes | Path, resolution: int, where: str) -> np.ndarray:
    """(resolution, resolution, 3) uint8: decoded, RGB, shorter side resized to resolution (bilinear,
    antialiased), centre-cropped. UserError naming `where` if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as error:
        raise UserError(f"{where}: not a decodable image ({type(error).__name__}: {str(error).splitlines()[0][:80]}); "
                        f"remove the row or fix the file") from None
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


# ----------------------------------------------------------------------------- parquet files


def parquet_files(path: Path) -> list[Path]:
    """The parquet file, or the *.parquet files of a folder (sorted)."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise UserError(f"feedback.path={path}: the folder holds no .parquet file and no labelled rlfuse.sample "
                        f"dataset (manifest.json); give Pick-a-Pic-style parquet files or labelled datasets")
    return files


class ParquetPairs:
    """The usable rows (label_0 of 0 or 1) of parquet files, read per epoch in file order, cycling.

    The index holds three int32/int8 numbers per usable row (file, row, winner side): about 9 bytes per
    pair, 7.7 MB for Pick-a-Pic v2's 851k pairs. Raises UserError for a file pyarrow cannot open, a
    missing column, or no usable pair.
    """

    def __init__(self, files: list[Path]):
        import pyarrow.parquet as pq

        self.files = files
        index_files, index_rows, index_sides = [], [], []
        self.row_groups: list[list[int]] = []   # per file: the first row of each row group, then the row count
        self.ties = 0
        for number, file in enumerate(files):
            try:
                parquet = pq.ParquetFile(file)
            except Exception as error:  # pyarrow's ArrowInvalid, OSError, ...: one line either way
                raise UserError(f"feedback.path: {file}: not a readable parquet file ({str(error).splitlines()[0][:100]})"
                                ) from None
            missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise UserError(f"feedback.path: {file}: missing column(s) {', '.join(missing)}; a pairs file needs "
                                f"{', '.join(COLUMNS)} (Pick-a-Pic's layout)")
            starts = [0]
            for group in range(parquet.num_row_groups):
                starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
            self.row_groups.append(starts)
            labels = parquet.read(columns=["label_0"]).column("label_0").to_numpy(zero_copy_only=False)
            labels = labels.astype(np.float64)
            usable = np.nonzero((labels == 0) | (labels == 1))[0]
            self.ties += int(len(labels) - len(usable))
            index_files.append(np.full(len(usable), number, dtype=np.int32))
            index_rows.append(usable.astype(np.int32))
            index_sides.append((labels[usable] == 0).astype(np.int8))   # 0: jpg_0 won, 1: jpg_1 won
        self.file_of, self.row_of = np.concatenate(index_files), np.concatenate(index_rows)
        self.winner_side = np.concatenate(index_sides)
        if len(self.row_of) == 0:
            raise UserError(f"feedback.path: no usable pairs in {len(files)} parquet file(s): every row is a tie "
                            f"(label_0 0.5) or unlabelled; label_0 must be 1 (jpg_0 preferred) or 0 (jpg_1)")

    def __len__(self) -> int:
        return len(self.row_of)

    def read(self, positions: list[int]) -> list[PairItem]:
        """The pairs at usable positions, read in batches of READ_BATCH rows of the row groups that hold them."""
        import pyarrow.parquet as pq

        wanted: dict[tuple[int, int], list[int]] = {}   # (file, row group) -> positions
        for position in positions:
            file, row = int(self.file_of[position]), int(self.row_of[position])
            group = int(np.searchsorted(self.row_groups[file], row, side="right") - 1)
            wanted.setdefault((file, group), []).append(position)
        found: dict[int, PairItem] = {}
        for (file, group), chosen in sorted(wanted.items()):
            rows = {int(self.row_of[p]) - self.row_groups[file][group]: p for p in chosen}
            first = 0
            parquet = pq.ParquetFile(self.files[file])
            for batch in parquet.iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=list(COLUMNS[:3])):
                inside = [r for r in rows if first <= r < first + batch.num_rows]
                if inside:
                    columns = {name: batch.column(name) for name in COLUMNS[:3]}
                    for r in inside:
                        found[rows[r]] = self._item(columns, r - first, rows[r])
                first += batch.num_rows
                if first > max(rows):
                    break
        return [found[p] for p in positions]

    def _item(self, columns: dict, offset: int, position: int) -> PairItem:
        file, row = self.files[int(self.file_of[position])], int(self.row_of[position])
        side = int(self.winner_side[position])
        images = [columns["jpg_0"][offset].as_py(), columns["jpg_1"][offset].as_py()]
        for k, image in enumerate(images):
            if not isinstance(image, bytes):
                raise UserError(f"{file}: row {row}: jpg_{k} is not encoded image bytes; remove the row or fix the file")
        keys = (f"{file}:{row}:{side}", f"{file}:{row}:{1 - side}")
        return PairItem(str(columns["caption"][offset].as_py() or ""), keys, (images[side], images[1 - side]))

    def pairs(self, epoch: int, count: int) -> list[PairItem]:
        """The next `count` usable pairs in file order, cycling: epoch e starts at (e - 1) * count."""
        first = (epoch - 1) * count
        return self.read([(first + i) % len(self) for i in range(count)])

    def check_images(self, resolution: int, rows: int = CHECK_ROWS) -> None:
        """Decode the images of the first `rows` usable pairs (UserError naming file and row)."""
        for item in self.read(list(range(min(rows, len(self))))):
            for key, image in zip(item.keys, item.images):
                file, row, side = key.rsplit(":", 2)
                load_image(image, resolution, f"{file}: row {row}: jpg_{side}")


# ----------------------------------------------------------------------------- labelled rlfuse.sample datasets


def dataset_folders(path: Path) -> list[Path]:
    """The dataset folder itself (it holds manifest.json), or its sub-folders that do (sorted)."""
    if (path / "manifest.json").is_file():
        return [path]
    return sorted(folder for folder in path.iterdir() if (folder / "manifest.json").is_file())


class DatasetPairs:
    """Every labelled pair of the datasets (rlfuse.annotate.store.preference_pairs), winner first."""

    def __init__(self, folders: list[Path], seed: int):
        from rlfuse.annotate.dataset import load_dataset
        from rlfuse.annotate.store import FILENAME, preference_pairs

        self.items: list[PairItem] = []
        self.seed = seed
        for folder in folders:
            dataset = load_dataset(folder)
            if not (folder / FILENAME).is_file():
                raise UserError(f"feedback.path: {folder}: no labels yet ({FILENAME}); label it with "
                                f"`python -m rlfuse.annotate {folder}`")
            for group, winner, loser in preference_pairs(folder):
                files = dataset.groups[group].files
                self.items.append(PairItem(dataset.groups[group].prompt, (str(files[winner]), str(files[loser])),
                                           (files[winner], files[loser])))
        if not self.items:
            raise UserError(f"feedback.path: the labels of {len(folders)} dataset(s) state no preference (only "
                            f"skips, ties or opposite votes); label more pairs")

    def __len__(self) -> int:
        return len(self.items)

    def pairs(self, epoch: int, count: int) -> list[PairItem]:
        return [self.items[i] for i in cycled(len(self.items), (epoch - 1) * count, count, self.seed)]


def open_pairs(path: str, seed: int) -> ParquetPairs | DatasetPairs:
    """The pairs at feedback.path: parquet files or labelled datasets (UserError for anything else)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"feedback.path={path}: no such file or folder; give a parquet file, a folder of them, or a "
                        f"folder of labelled rlfuse.sample datasets")
    if root.is_dir() and dataset_folders(root):
        return DatasetPairs(dataset_folders(root), seed)
    if root.is_file() and root.suffix != ".parquet":
        raise UserError(f"feedback.path={path}: not a .parquet file; give Pick-a-Pic-style parquet files or a folder "
                        f"of labelled rlfuse.sample datasets")
    return ParquetPairs(parquet_files(root))


# ----------------------------------------------------------------------------- reward-ranked pairs


@dataclass(frozen=True)
class RankedSettings:
    """prompts_per_round: prompts sampled per round (each may give a pair); images_per_prompt: K;
    resample_every: a new round every N epochs (0: one round, at the first epoch); num_steps,
    guidance_scale: the sampler's; seed: the run's."""

    prompts_per_round: int
    images_per_prompt: int
    resample_every: int
    num_steps: int
    guidance_scale: float
    seed: int


class RankedPairs:
    """Best against worst of K images per prompt sampled by the current policy and scored by the reward.
    Every process samples the whole round from the same seeds, so all hold the same pairs."""

    def __init__(self, network: torch.nn.Module, family: ModelFamily, sampler, reward, prompts: list[str],
                 latent_shape: tuple[int, ...], settings: RankedSettings, device: torch.device,
                 autocast: Callable[[], AbstractContextManager] = nullcontext, save_dir: Path | None = None):
        self.network, self.family, self.sampler, self.reward = network, family, sampler, reward
        self.prompts, self.latent_shape, self.settings = prompts, latent_shape, settings
        self.device, self.autocast, self.save_dir = device, autocast, save_dir
        self.items: list[PairItem] = []
        self.round_epoch = 0

    def sample_round(self, epoch: int) -> None:
        from rlfuse.prompts import draw_prompts
        from rlfuse.rewards.base import score
        from rlfuse.rollout import rollout

        s, k = self.settings, self.settings.images_per_prompt
        rng = np.random.default_rng(seed_for(s.seed, epoch, 7))
        chosen = draw_prompts(self.prompts, s.prompts_per_round, rng)
        self.items, self.round_epoch = [], epoch
        pictures: list[np.ndarray] = []   # (2, H, W, 3) uint8 winner and loser, kept only to save
        self.network.eval()
        per_batch = max(1, 32 // k)   # prompts per sampling batch
        for start in range(0, len(chosen), per_batch):
            prompts = [p for p in chosen[start:start + per_batch] for _ in range(k)]
            ids = [(start * k) + i for i in range(len(prompts))]
            sampled = rollout(self.network, self.family, self.sampler, prompts,
                              [seed_for(s.seed, epoch, 8, i) for i in ids], [seed_for(s.seed, epoch, 9, i) for i in ids],
                              self.latent_shape, s.num_steps, s.guidance_scale, self.device, self.autocast)
            scores = score(self.reward, sampled.images, prompts).scores.float().cpu().reshape(-1, k)   # (G, K)
            latents = sampled.chains[:, -1].float().cpu().reshape(len(scores), k, *self.latent_shape)
            for g in range(len(scores)):
                best, worst = int(scores[g].argmax()), int(scores[g].argmin())
                if scores[g, best] > scores[g, worst]:
                    keys = (f"ranked:{epoch}:{ids[g * k + best]}", f"ranked:{epoch}:{ids[g * k + worst]}")
                    self.items.append(PairItem(prompts[g * k], keys, (latents[g, best], latents[g, worst]),
                                               (float(scores[g, best]), float(scores[g, worst]))))
                    if self.save_dir is not None:
                        pictures.append(to_uint8(sampled.images[[g * k + best, g * k + worst]]))
        log.info("reward-ranked pairs, epoch %d: %d pairs from %d prompts (the others' images all scored the same)",
                 epoch, len(self.items), len(chosen))
        if self.save_dir is not None:  # a resumed run samples its round again: the earlier file is kept
            path = free_path(self.save_dir / f"ranked_epoch{epoch:04d}.parquet")
            save_pairs(path, self.items, pictures)
            log.info("reward-ranked pairs saved: %s (train on them with feedback.path=%s)", path, path)

    def pairs(self, epoch: int, count: int) -> list[PairItem]:
        s = self.settings
        due = self.round_epoch == 0 or (s.resample_every > 0 and (epoch - 1) % s.resample_every == 0)
        if due:
            self.sample_round(epoch if s.resample_every > 0 else 1)
        if not self.items:
            return []
        return [self.items[i] for i in cycled(len(self.items), (epoch - self.round_epoch) * count,
                                                 min(count, len(self.items)), seed_for(s.seed, self.round_epoch))]


def png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless: a saved round holds exactly the pixels the reward scored)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def free_path(path: Path) -> Path:
    """path, or path with -2, -3, ... before its suffix if that name is taken."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def save_pairs(path: Path, items: list[PairItem], pictures: list[np.ndarray]) -> None:
    """A round of ranked pairs as a Pick-a-Pic-style parquet file (winner in jpg_0, label_0 1), written under a
    temporary name and renamed into place, so a file at `path` is always whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"caption": [item.prompt for item in items],
                      "jpg_0": [png_bytes(pair[0]) for pair in pictures],
                      "jpg_1": [png_bytes(pair[1]) for pair in pictures],
                      "label_0": pa.array([1.0] * len(items), pa.float64()),
                      "score_0": [item.rewards[0] for item in items], "score_1": [item.rewards[1] for item in items]})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial, row_group_size=256)
    partial.replace(path)


# ----------------------------------------------------------------------------- the source


class LatentCache:
    """Latents (C, h, w) by image key on the CPU; the least recently used goes past `size` entries."""

    def __init__(self, size: int):
        self.size, self.entries = size, OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.entries:
            self.entries.move_to_end(key)
        return self.entries.get(key)

    def put(self, key: str, latents: torch.Tensor) -> None:
        if self.size <= 0:
            return
        self.entries[key] = latents
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class PairsSource:
    """Each epoch, pairs_per_epoch pairs (over all processes) from `pool`, this process's equal share,
    as Trajectories of clean latents (see the module docstring)."""

    pairs = True

    def __init__(self, pool: ParquetPairs | DatasetPairs | RankedPairs, family: ModelFamily, resolution: int,
                 pairs_per_epoch: int, cache_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 grid_images: int = 16):
        self.pool, self.family, self.resolution = pool, family, resolution
        self.pairs_per_epoch, self.cache = pairs_per_epoch, LatentCache(cache_size)
        self.device, self.rank, self.world, self.grid_images = device, rank, world, grid_images

    def latents(self, items: list[PairItem]) -> torch.Tensor:
        """(2P, C, h, w) winner, loser, winner, ... latents; images not in the cache are encoded in batches."""
        keys = [key for item in items for key in item.keys]
        sources = [image for item in items for image in item.images]
        found = {key: self.cache.get(key) for key in keys}
        missing = [(key, source) for key, source in zip(keys, sources) if found[key] is None]
        unique = list(dict(missing).items())
        for start in range(0, len(unique), 16):
            part = unique[start:start + 16]
            encoded = [source if isinstance(source, torch.Tensor) else None for _, source in part]
            pixels = [load_image(source, self.resolution, str(key)) for (key, source), done in zip(part, encoded)
                      if done is None]
            if pixels:
                images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
                new = iter(encode_images(self.family.pipeline.vae, images.to(self.device)).cpu())
                encoded = [done if done is not None else next(new) for done in encoded]
            for (key, _), latents in zip(part, encoded):
                found[key] = latents
                self.cache.put(key, latents)
        return torch.stack([found[key] for key in keys])

    def epoch(self, epoch: int) -> EpochBatch:
        items = self.pool.pairs(epoch, self.pairs_per_epoch)
        share = len(items) // self.world
        if share == 0:
            raise UserError(f"epoch {epoch}: {len(items)} preference pairs cannot be shared by {self.world} processes; "
                            f"raise feedback.pairs_per_epoch (reward-ranked pairs: feedback.ranked.prompts_per_round)")
        mine = items[self.rank * share:(self.rank + 1) * share]
        x0 = self.latents(mine).to(self.device)                                   # (2P, C, h, w)
        prompts = [item.prompt for item in mine for _ in range(2)]
        count = len(prompts)
        rewards = torch.tensor([r for item in mine for r in item.rewards], device=self.device)
        ids = torch.arange(2 * self.rank * share, 2 * (self.rank + 1) * share, device=self.device)
        conditioning = Conditioning.cat([self.family.encode_prompts(prompts[i:i + 64], self.device)
                                         for i in range(0, count, 64)])
        batch = Trajectories(
            conditioning=conditioning, latents=x0[:, None], next_latents=x0[:, None],
            timesteps=torch.zeros(count, 1, dtype=torch.long, device=self.device),
            log_probs=torch.zeros(count, 1, device=self.device), rewards=rewards,
            reward_terms=rewards.new_zeros(count, 0), advantages=torch.zeros_like(rewards), prompts=prompts,
            sample_ids=ids)
        with torch.no_grad():
            grid = self.family.decode(x0[:self.grid_images]).cpu() if self.grid_images > 0 else torch.zeros(0, 3, 1, 1)
        return EpochBatch(batch, grid, {})
