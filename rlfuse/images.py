"""Image grids: the cells of a torchvision grid, and held-out images before and after training beside
their captions."""

from __future__ import annotations

import math

import numpy as np
import torch

GRID_PADDING = 2  # torchvision.utils.make_grid's default
HEADER = 18       # pixels above the first row of a captioned sheet


def grid_columns(count: int) -> int:
    """Columns of a square-ish grid of count images."""
    return int(math.ceil(count ** 0.5))


def grid_cells(grid: torch.Tensor, count: int, height: int, width: int) -> torch.Tensor:
    """(count, 3, height, width): the images back out of a make_grid grid (3, H', W') of
    grid_columns(count) columns and the default padding."""
    columns, pad = grid_columns(count), GRID_PADDING
    cells = []
    for i in range(count):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        cells.append(grid[:, top:top + height, left:left + width])
    return torch.stack(cells)


def captioned_pairs(before: torch.Tensor, after: torch.Tensor, captions: list[str], scale: int = 3,
                    columns: int | None = None):
    """A PIL image of n cells, each a caption's image before | after (same seed) and the caption,
    in `columns` columns (default: about a square sheet), row by row.

    before, after: (n, 3, H, W) in [0, 1]; captions: n strings.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    count = len(captions)
    columns = columns or max(1, round((count / 4) ** 0.5))
    height, width = before.shape[-2] * scale, before.shape[-1] * scale
    text_width = max([int(font.getlength(c)) for c in captions] + [60]) + 16
    cell_width, cell_height = 2 * width + 12 + text_width, max(height, 14) + 4
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * cell_width, HEADER + rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for column in range(columns):
        left = column * cell_width
        draw.text((left + 4, 2), "before", fill="black", font=font)
        draw.text((left + width + 8, 2), "after", fill="black", font=font)
        draw.text((left + 2 * width + 16, 2), "held-out caption", fill="black", font=font)
    for i, caption in enumerate(captions):
        left, top = (i % columns) * cell_width, HEADER + (i // columns) * cell_height
        for side, images in enumerate((before, after)):
            pixels = (images[i].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            picture = Image.fromarray(pixels).resize((width, height), Image.NEAREST)
            sheet.paste(picture, (left + 4 + side * (width + 4), top))
        draw.text((left + 2 * width + 16, top + height // 2 - 6), caption, fill="black", font=font)
    return sheet
