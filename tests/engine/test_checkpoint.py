"""Checkpoints: written atomically, a failed write names its cause and keeps the previous one."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def test_a_failed_checkpoint_write_names_the_problem_and_keeps_the_previous_one(tmp_path):
    import errno

    from rlfuse.engine import checkpoint
    from rlfuse.errors import UserError

    weights = {"w": torch.ones(3)}
    checkpoint.save_checkpoint(tmp_path, 1, weights, {}, {}, export=lambda folder: None, keep=0)

    def disk_full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match="cannot write checkpoint .*epoch_000002: No space left on device; free disk"):
        checkpoint.save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {}, {}, export=disk_full, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_000001"], "no torn folder left"
    assert torch.equal(load_file(tmp_path / "checkpoints" / "epoch_000001" / "trainable.safetensors")["w"],
                       torch.ones(3))
