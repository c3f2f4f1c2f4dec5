"""The trackers with the real libraries, offline: W&B in offline mode writes its run file with the
scalars and the config; MLflow's own client reads back the metrics and parameters of a local store."""

import json
import time

import pytest
import torch

from rlfuse.engine.logbook import Logbook, TrackerSettings, flatten


def wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB log
    records (checksum 4, length 2, type 1; FULL 1, FIRST 2, MIDDLE 3, LAST 4) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:                      # a block's tail too short for a header: padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def finished_wandb_records(path, timeout: float = 60.0) -> list:
    """The records of a finished W&B run file: W&B's own process writes it after run.finish() returns,
    so wait (at most timeout seconds) for its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def log_three_epochs(run_dir, settings: TrackerSettings) -> None:
    run_dir.mkdir(exist_ok=True)
    logbook = Logbook(run_dir, first_epoch=1, epochs=3, progress=False, trackers=settings)
    logbook.record({"epoch": 0, "eval_reward_mean": 0.5})
    for epoch in (1, 2, 3):
        logbook.epoch({"epoch": epoch, "reward_mean": 0.1 * epoch, "reward_std": 0.0, "seconds": 1.0},
                      torch.rand(3, 8, 8) if epoch == 3 else None)
    logbook.eval_grid(torch.rand(3, 8, 8), 3)
    logbook.close()


def test_wandb_offline_writes_the_run_file_with_every_epochs_scalars_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_three_epochs(tmp_path, TrackerSettings(("wandb",), "rlfuse-test", None, {"algorithm": {"name": "ddpo"}}))
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history, config = {}, {}
    for record in finished_wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/reward_mean" in items:
                history[items["_step"]] = items["train/reward_mean"]
            if "eval_reward_mean" in items:
                history["eval", items["_step"]] = items["eval_reward_mean"]
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert history == {1: pytest.approx(0.1), 2: pytest.approx(0.2), 3: pytest.approx(0.3), ("eval", 0): 0.5}
    assert config["algorithm.name"] == "ddpo" and config["run_dir"] == str(tmp_path.resolve())
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/images/*.png"))  # the grids


@pytest.mark.slow  # most of its 10-20 s is MLflow creating its SQLite tables
def test_mlflow_metrics_and_parameters_read_back_through_mlflows_client(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_three_epochs(tmp_path / "run", TrackerSettings(("mlflow",), "rlfuse-test", uri, {"seed": 7}))
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("rlfuse-test")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/reward_mean")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert client.get_metric_history(run.info.run_id, "eval_reward_mean")[0].value == 0.5
    assert run.data.params["seed"] == "7" and run.data.params["run_dir"] == str((tmp_path / "run").resolve())
    assert run.info.run_name == "run"
    assert list((tmp_path / "mlartifacts").rglob("*.png"))  # the grids, beside the store


def test_tensorboard_is_the_default_and_several_trackers_log_together(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_three_epochs(tmp_path, TrackerSettings(("tensorboard", "wandb")))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [round(e.value, 6) for e in events.Scalars("train/reward_mean")] == [0.1, 0.2, 0.3]
    assert {"samples", "eval/images"} <= set(events.Tags()["images"])
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_the_config_is_flattened_to_dotted_scalar_parameters():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None",
                                                                        "e": True}
