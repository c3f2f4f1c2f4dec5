"""Image sheets: the cells of a grid read back exactly, and captioned before/after cells in columns."""

import torch
from torchvision.utils import make_grid

from rlfuse.images import HEADER, captioned_pairs, grid_cells, grid_columns


def test_grid_cells_read_back_the_images_of_a_make_grid_grid():
    images = torch.rand(7, 3, 8, 6)
    grid = make_grid(images, nrow=grid_columns(7))
    assert torch.equal(grid_cells(grid, 7, 8, 6), images)


def test_captioned_cells_go_row_by_row_over_the_columns():
    before = torch.zeros(5, 3, 4, 4)
    after = torch.ones(5, 3, 4, 4)
    before[4] = 0.5                                              # cell 4: second row, second column
    sheet = captioned_pairs(before, after, ["a", "b", "c", "d", "e"], scale=2, columns=3)
    cell_width = (sheet.width) // 3
    cell_height = (sheet.height - HEADER) // 2
    left, top = 1 * cell_width, HEADER + 1 * cell_height
    assert sheet.getpixel((left + 5, top + 1)) == (128, 128, 128)    # its before image
    assert sheet.getpixel((left + 4 + 8 + 4 + 1, top + 1)) == (255, 255, 255)  # its after image
    assert sheet.getpixel((5, HEADER + 1)) == (0, 0, 0)              # cell 0's before image
