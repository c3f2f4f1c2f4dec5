"""JPEG file size as a reward: compressibility or incompressibility (DDPO, Black et al. 2023).

The DDPO paper scores an image by the size of its JPEG encoding at quality 95, in kilobytes;
compressibility is the negated size, incompressibility the size itself.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rlfuse.rewards.base import RewardOutput


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of a (H, W, 3) uint8 image saved as JPEG at `quality`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounding as PIL does when saving."""
    images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class JpegReward:
    """reward = -kB (compressibility) or +kB (incompressibility) of each image's JPEG.

    Args:
        objective: "compressibility" or "incompressibility".
        quality: JPEG quality, 95 in the DDPO paper.
    """

    def __init__(self, objective: str = "compressibility", quality: int = 95):
        if objective not in ("compressibility", "incompressibility"):
            raise ValueError(f"objective={objective!r}: use 'compressibility' or 'incompressibility'")
        self.sign = -1.0 if objective == "compressibility" else 1.0
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """scores: (B,) float32 on the CPU, signed kB."""
        sizes = [jpeg_size_kb(image, self.quality) for image in to_uint8(images)]
        return RewardOutput(self.sign * torch.tensor(sizes, dtype=torch.float32))
