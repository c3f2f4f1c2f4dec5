"""Reward weights that do not come from the Hugging Face hub: where they are cached and how they
arrive, checked before a run starts (never in the middle of one)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$RLFUSE_CACHE, else $XDG_CACHE_HOME/rlfuse, else ~/.cache/rlfuse."""
    if os.environ.get("RLFUSE_CACHE"):
        return Path(os.environ["RLFUSE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlfuse"


def ensure_weights(path: str | None, url: str, filename: str, key: str) -> Path:
    """The local weights file: `path` if given (it must exist), else the cached copy of `url`,
    downloaded now unless HF_HUB_OFFLINE is set. Raises ValueError (one line naming the file, where
    to get it and the key to set) when the file cannot be had."""
    if path is not None:
        local = Path(path).expanduser()
        if not local.is_file():
            raise ValueError(f"{key}={path!r}: no such file; download {url} and point {key} at it")
        return local
    cached = cache_dir() / filename
    if cached.is_file():
        return cached
    hint = f"download {url} to {cached} (or anywhere, and set {key}=<path>)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{key}: the weights {filename} are not cached and HF_HUB_OFFLINE is set; {hint}")
    from torch.hub import download_url_to_file

    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(cached), progress=False)  # writes a temporary file, then renames
    except OSError as error:
        raise ValueError(f"{key}: could not download {filename} ({error}); {hint}") from None
    return cached
