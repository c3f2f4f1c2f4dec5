"""The JPEG reward equals the size PIL writes, in kB, with the sign of the objective."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rlfuse.rewards.jpeg import JpegReward


def test_jpeg_reward_equals_pil_size_in_kb_and_sign():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[0] = 0.5  # a flat image compresses far better than noise
    sizes = []
    for image in images:
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    incompressibility = JpegReward("incompressibility")(images, ["x"] * 3).scores
    compressibility = JpegReward("compressibility")(images, ["x"] * 3).scores
    torch.testing.assert_close(incompressibility, torch.tensor(sizes))
    torch.testing.assert_close(compressibility, -torch.tensor(sizes))
    assert compressibility[0] > compressibility[1]


def test_unknown_objective_is_rejected():
    with pytest.raises(ValueError, match="compressibility"):
        JpegReward("smallness")
