"""Read and check a feedback dataset folder (written by `python -m rlfuse.sample`).

    <dataset>/manifest.json   {"format": "rlfuse-feedback", "version": 1, "images_per_prompt": K,
                               "groups": [{"index": 0, "prompt": "...", "seed": 123,
                                           "images": [{"id": "0000-0", "file": "images/0000-0.png",
                                                       "sha256": "..."}, ... K]}, ...], ...}
    <dataset>/images/...      the K images of each prompt
    <dataset>/labels.sqlite   the annotations (rlfuse/annotate/store.py)

Every problem is a UserError: one line naming what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rlfuse.errors import UserError

FORMAT = "rlfuse-feedback"
VERSION = 1
RESAMPLE = "re-run `python -m rlfuse.sample` to write the dataset again"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Group:
    """One prompt and its K images; image k has id f"{index:04d}-{k}"."""

    index: int
    prompt: str
    image_ids: tuple[str, ...]
    files: tuple[Path, ...]  # absolute paths inside the dataset folder
    sha256: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    root: Path
    images_per_prompt: int  # K
    groups: tuple[Group, ...]  # groups[i].index == i

    @property
    def images(self) -> dict[str, tuple[int, int]]:
        """Image id -> (group index, k)."""
        return {image_id: (g.index, k) for g in self.groups for k, image_id in enumerate(g.image_ids)}

    @property
    def fingerprint(self) -> str:
        """A hash of every image's id and content: labels belong to exactly these images."""
        lines = "".join(f"{i}:{s}\n" for g in self.groups for i, s in zip(g.image_ids, g.sha256))
        return hashlib.sha256(lines.encode()).hexdigest()


def image_id(group: int, k: int) -> str:
    return f"{group:04d}-{k}"


def _fail(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}")


def load_dataset(folder: Path | str, check_images: bool = True) -> Dataset:
    """Parse <folder>/manifest.json; with check_images, also check that every image file exists
    and has the sha256 the manifest lists (the annotator must show exactly what was sampled)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; give the dataset folder written by `python -m rlfuse.sample`")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: missing; is {root} a folder written by `python -m rlfuse.sample`?")
    where = str(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(where, f"not valid JSON ({error}); {RESAMPLE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(where, f"not an rlfuse feedback manifest (expected \"format\": \"{FORMAT}\"); {RESAMPLE}")
    if manifest.get("version") != VERSION:
        raise _fail(where, f"version {manifest.get('version')!r}; this rlfuse reads version {VERSION}: "
                           f"upgrade rlfuse or {RESAMPLE}")
    k_images = manifest.get("images_per_prompt")
    if not isinstance(k_images, int) or isinstance(k_images, bool) or k_images < 2:
        raise _fail(where, f"images_per_prompt must be an integer >= 2, got {k_images!r}; {RESAMPLE}")
    raw_groups = manifest.get("groups")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise _fail(where, f"\"groups\" must be a non-empty list; {RESAMPLE}")
    groups = [_parse_group(root, where, position, raw, k_images) for position, raw in enumerate(raw_groups)]
    dataset = Dataset(root=root, images_per_prompt=k_images, groups=tuple(groups))
    if check_images:
        _check_files(dataset)
    return dataset


def _parse_group(root: Path, where: str, position: int, raw: object, k_images: int) -> Group:
    here = f"{where}: groups[{position}]"
    if not isinstance(raw, dict):
        raise UserError(f"{here} is not an object; {RESAMPLE}")
    index, prompt, images = raw.get("index"), raw.get("prompt"), raw.get("images")
    if index != position or isinstance(index, bool):
        raise UserError(f"{here} has index {index!r}; groups must be numbered 0, 1, 2, ... in order; {RESAMPLE}")
    if not isinstance(prompt, str):
        raise UserError(f"{here}: \"prompt\" must be a string; {RESAMPLE}")
    if not isinstance(images, list) or len(images) != k_images:
        count = len(images) if isinstance(images, list) else "no"
        raise UserError(f"{here} has {count} images, images_per_prompt is {k_images}; {RESAMPLE}")
    ids, files, hashes = [], [], []
    for k, image in enumerate(images):
        there = f"{here}.images[{k}]"
        expected = image_id(position, k)
        if not isinstance(image, dict) or image.get("id") != expected:
            got = image.get("id") if isinstance(image, dict) else image
            raise UserError(f"{there} has id {got!r}, expected {expected!r}; {RESAMPLE}")
        name, sha = image.get("file"), image.get("sha256")
        if not isinstance(name, str) or not name:
            raise UserError(f"{there}: \"file\" must be a path relative to the dataset folder; {RESAMPLE}")
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or "\\" in name or ":" in name:
            raise UserError(f"{there}: file {name!r} must be a plain relative path inside the dataset folder "
                            f"(no '..', no absolute path); {RESAMPLE}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise UserError(f"{there}: \"sha256\" must be 64 lowercase hex digits; {RESAMPLE}")
        ids.append(expected)
        files.append(root.joinpath(*relative.parts))
        hashes.append(sha)
    return Group(index=position, prompt=prompt, image_ids=tuple(ids), files=tuple(files), sha256=tuple(hashes))


def _check_files(dataset: Dataset) -> None:
    root = dataset.root.resolve()
    for group in dataset.groups:
        for image, path, expected in zip(group.image_ids, group.files, group.sha256):
            if not path.is_file():
                raise UserError(f"{path}: image {image} is missing; restore the file or {RESAMPLE}")
            if not path.resolve().is_relative_to(root):  # a symlink out of the folder
                raise UserError(f"{path}: image {image} points outside {dataset.root}; copy the file in or {RESAMPLE}")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != expected:
                raise UserError(f"{path}: image {image} has sha256 {digest[:12]}..., the manifest lists "
                                f"{expected[:12]}...; the file changed since sampling: restore it or {RESAMPLE}")
