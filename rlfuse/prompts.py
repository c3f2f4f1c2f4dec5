"""Prompt sources: lists shipped in the package (rlfuse/assets/prompts/<name>.txt), the HPDv2 benchmark
prompts from the Hugging Face hub (hpdv2, hpdv2:<style>), or your own .txt / .json files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlfuse.errors import UserError

SHIPPED = Path(__file__).resolve().parent / "assets" / "prompts"

# HPDv2's benchmark (Wu et al. 2023, HPSv2): 800 prompts per style, one JSON list of strings per style
# in the dataset repo's benchmark/ folder (the files the `hpsv2` package downloads).
HPDV2_REPO = "zhwang/HPDv2"
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2_DOWNLOAD = f'hf download {HPDV2_REPO} --repo-type dataset --include "benchmark/*.json"'


def shipped_lists() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.txt"))


def load_prompts(source: str) -> list[str]:
    """The prompts of a source: a shipped list name, `hpdv2` (all four styles, 3200 prompts) or
    `hpdv2:<style>` (800), a .json file holding a list of strings, or a text file (one prompt per
    line, blanks skipped)."""
    if source == "hpdv2" or source.startswith("hpdv2:"):
        return hpdv2_prompts(source.partition(":")[2])
    path = SHIPPED / f"{source}.txt" if (SHIPPED / f"{source}.txt").is_file() else Path(source)
    if not path.is_file():
        raise UserError(f"prompts: {source!r} is neither a shipped list ({', '.join(shipped_lists())}), "
                        f"hpdv2[:{'|'.join(HPDV2_STYLES)}], nor an existing file; give a .txt path with one "
                        f"prompt per line or a .json path holding a list of strings")
    if path.suffix == ".json":
        prompts = json_prompts(path)
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts: {path} holds no prompts; write one prompt per line (in a .json file, a list "
                        f"of strings)")
    return prompts


def json_prompts(path: Path) -> list[str]:
    """The prompts of a JSON file holding a list of strings (the HPDv2 benchmark's format)."""
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"prompts: {path} is not valid JSON ({error}); it must hold a list of prompt strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"prompts: {path} holds JSON but not a list of strings; write [\"a prompt\", ...]")
    return [p.strip() for p in prompts if p.strip()]


def hpdv2_prompts(style: str) -> list[str]:
    """HPDv2's benchmark prompts of one style, or of all four in HPDV2_STYLES order when style is ''."""
    if style and style not in HPDV2_STYLES:
        raise UserError(f"prompts: hpdv2:{style}: no such HPDv2 style; use hpdv2 (all) or one of "
                        f"{', '.join(f'hpdv2:{s}' for s in HPDV2_STYLES)}")
    from huggingface_hub import hf_hub_download

    prompts = []
    for name in [style] if style else HPDV2_STYLES:
        try:  # from the cache when there; HF_HUB_OFFLINE makes a missing file an error, not a download
            path = hf_hub_download(HPDV2_REPO, f"benchmark/{name}.json", repo_type="dataset")
        except Exception as error:  # offline, network and hub errors alike become one line
            raise UserError(f"prompts: hpdv2: benchmark/{name}.json of the dataset {HPDV2_REPO} is not in the "
                            f"Hugging Face cache and could not be downloaded ({type(error).__name__}); run "
                            f"`{HPDV2_DOWNLOAD}` on a connected machine, or pass the files with prompts=file "
                            f"prompts.train=<path>/{name}.json") from None
        prompts += json_prompts(Path(path))
    return prompts


def draw_prompts(prompts: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """count prompts drawn uniformly with replacement."""
    return [prompts[i] for i in rng.integers(0, len(prompts), size=count)]
