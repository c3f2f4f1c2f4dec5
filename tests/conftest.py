"""Shared fixtures. Every test runs offline on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline():
    from rlfuse.model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)
