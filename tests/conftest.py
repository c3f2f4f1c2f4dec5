"""Shared fixtures. Every test runs offline on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, inherited by the training runs the tests launch: `make test` runs one
# pytest worker per core, and a second thread per process slowed the suite (the learning runs
# took 4-6 min each with 2 threads in each of 2 workers on 2 cores; with one, e.g. DPOK's took 76 s alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline():
    from rlfuse.families.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)
