"""Prompt sources: lists shipped in the package (rlfuse/assets/prompts/<name>.txt) or text files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlfuse.cli import UserError

SHIPPED = Path(__file__).resolve().parent / "assets" / "prompts"


def shipped_lists() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.txt"))


def load_prompts(source: str) -> list[str]:
    """The prompts of a shipped list name or of a text file (one prompt per line, blanks skipped)."""
    path = SHIPPED / f"{source}.txt" if (SHIPPED / f"{source}.txt").is_file() else Path(source)
    if not path.is_file():
        raise UserError(f"prompts: {source!r} is neither a shipped list ({', '.join(shipped_lists())}) "
                        f"nor an existing text file; give a path with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts: {path} holds no prompts; write one prompt per line")
    return prompts


def draw_prompts(prompts: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """count prompts drawn uniformly with replacement."""
    return [prompts[i] for i in rng.integers(0, len(prompts), size=count)]
