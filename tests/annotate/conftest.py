"""Fixtures for the annotator: a small dataset folder, a live server."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotate_helpers import Client, write_dataset


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "feedback")


@pytest.fixture
def serve_dataset():
    """serve_dataset(folder, task) -> Client of a server running in this process (stopped after)."""
    from rlfuse.annotate.dataset import load_dataset
    from rlfuse.annotate.server import serve
    from rlfuse.annotate.store import open_store

    running = []

    def start(folder: Path, task: str = "best", **kwargs) -> Client:
        dataset = load_dataset(folder)
        store = open_store(dataset)
        server = serve(dataset, store, task, port=0, **kwargs)
        running.append((server, store))
        return Client(*server.server_address[:2])

    yield start
    for server, store in running:
        server.shutdown()
        server.server_close()
        store.close()
