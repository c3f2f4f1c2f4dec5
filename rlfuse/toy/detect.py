"""Detect the coloured shapes of the shapes world in an image, by colour segmentation.

Three steps, vectorised over a batch of images:

1. Pixel colours. Each pixel is un-mixed from the white background along every palette colour c:
   pixel ~ white + coverage * (c - white). The pixel takes the colour whose line it lies closest to,
   among the colours it covers by at least half, if that distance is within `colour_tolerance`. This
   is nearest-palette-colour classification that also reads antialiased and blurred edge pixels (a
   50% red-on-white pixel is red, not purple) and cuts each shape at its 50% contour, where a blur
   leaves a straight edge.
2. Connected components (4-neighbourhood) of same-colour pixels; components smaller than
   `min_area_fraction` of the image are specks and are dropped.
3. Shape from the component's fill ratio within its bounding box: a square fills ~1, a circle
   pi / 4 ~ 0.785 and a triangle ~0.5. A bounding box more than 1.5 times longer than wide, or a
   fill below 0.35, is no shape of the world (shape None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlfuse.toy.world import COLOURS, PALETTE

WHITE = np.array([255.0, 255.0, 255.0])
# (K, 3) palette colours as offsets from white, in COLOURS order.
COLOUR_DIRECTIONS = np.array([PALETTE[name] for name in COLOURS], dtype=np.float64) - WHITE

# Fill ratio thresholds, halfway-ish between the ideal values (0.5, 0.785, 1.0) and set from the
# fill ratios measured on rendered and blurred shapes of 7-12 px (see tests/toy/test_world.py).
TRIANGLE_MAX_FILL = 0.64
CIRCLE_MAX_FILL = 0.89
MIN_FILL = 0.35
MAX_ASPECT = 1.5


@dataclass(frozen=True)
class DetectedObject:
    """One connected same-colour region read as a shape.

    shape: "circle", "square", "triangle", or None when the region fits none of them.
    centre: (x, y) centre of the bounding box, in pixels (pixel (i, j) covers [j, j + 1) x [i, i + 1)).
    box_size: (width, height) of the bounding box in pixels.
    area: number of pixels; fill: area / (width * height).
    """

    colour: str
    shape: str | None
    centre: tuple[float, float]
    box_size: tuple[int, int]
    area: int
    fill: float


def detect(image: np.ndarray, colour_tolerance: float = 48.0, min_area_fraction: float = 0.01) -> list[DetectedObject]:
    """The objects in one (H, W, 3) uint8 RGB image, in raster order of their first pixel."""
    return detect_batch(image[None], colour_tolerance, min_area_fraction)[0]


def detect_batch(
    images: np.ndarray, colour_tolerance: float = 48.0, min_area_fraction: float = 0.01
) -> list[list[DetectedObject]]:
    """The objects in each of B images, (B, H, W, 3) uint8 RGB.

    colour_tolerance: largest RGB distance of a pixel from its colour's blend-with-white line.
    min_area_fraction: smallest component kept, as a fraction of H * W (10 px at 32 x 32).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got shape {images.shape}")
    num_images, height, width, _ = images.shape
    colour_map = classify_pixels(images, colour_tolerance)  # (B, H, W), -1 for background
    labels = label_components(colour_map)  # (B, H, W), root pixel index, -1 for background

    # Per-component statistics over the foreground pixels, grouped by component.
    pixel_index = np.flatnonzero(labels >= 0)  # (N,) flat indices into (B, H, W)
    roots, component_of_pixel = np.unique(labels.reshape(-1)[pixel_index], return_inverse=True)  # (C,), (N,)
    areas = np.bincount(component_of_pixel)  # (C,)
    image_of_pixel, within_image = np.divmod(pixel_index, height * width)
    ys, xs = np.divmod(within_image, width)
    grouped = np.argsort(component_of_pixel, kind="stable")
    starts = np.concatenate([[0], np.cumsum(areas)[:-1]])
    x_min, x_max = np.minimum.reduceat(xs[grouped], starts), np.maximum.reduceat(xs[grouped], starts)
    y_min, y_max = np.minimum.reduceat(ys[grouped], starts), np.maximum.reduceat(ys[grouped], starts)
    box_widths, box_heights = x_max - x_min + 1, y_max - y_min + 1
    fills = areas / (box_widths * box_heights)

    detections: list[list[DetectedObject]] = [[] for _ in range(num_images)]
    min_area = min_area_fraction * height * width
    for component in np.flatnonzero(areas >= min_area):
        root = roots[component]
        detections[root // (height * width)].append(
            DetectedObject(
                colour=COLOURS[colour_map.reshape(-1)[root]],
                shape=classify_shape(fills[component], box_widths[component], box_heights[component]),
                centre=((x_min[component] + x_max[component] + 1) / 2, (y_min[component] + y_max[component] + 1) / 2),
                box_size=(int(box_widths[component]), int(box_heights[component])),
                area=int(areas[component]),
                fill=float(fills[component]),
            )
        )
    return detections


def classify_pixels(images: np.ndarray, colour_tolerance: float = 48.0) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H, W) int index into COLOURS, or -1 for background and off-palette.

    For a pixel p and palette colour c, with d = p - white and v = c - white, the coverage is
    a = d.v / |v|^2 (0 on white, 1 on c) and the distance from the blend line is
    sqrt(|d|^2 - a^2 |v|^2). The pixel takes the nearest line among colours with a >= 0.5.
    """
    offsets = images.reshape(-1, 3).astype(np.float32) - WHITE.astype(np.float32)  # (N, 3)
    directions = COLOUR_DIRECTIONS.astype(np.float32)  # (K, 3)
    squared_lengths = (directions**2).sum(axis=1)  # (K,)
    coverage = offsets @ directions.T / squared_lengths  # (N, K)
    squared_distances = (offsets**2).sum(axis=1, keepdims=True) - coverage**2 * squared_lengths  # (N, K)
    squared_distances[coverage < 0.5] = np.inf
    nearest = squared_distances.argmin(axis=1)  # (N,)
    nearest_distance = np.take_along_axis(squared_distances, nearest[:, None], axis=1)[:, 0]
    colour_index = np.where(nearest_distance <= colour_tolerance**2, nearest, -1)
    return colour_index.reshape(images.shape[:-1])


def label_components(colour_map: np.ndarray) -> np.ndarray:
    """Connected components (4-neighbourhood) of equal non-negative values in (B, H, W) `colour_map`.

    Returns (B, H, W) int64: for each foreground pixel, the flat index into (B, H, W) of the first
    pixel of its component (so labels never join two images); -1 for background. Every pixel starts
    with its own index and repeatedly takes the smallest label among its same-colour neighbours, with
    pointer jumping (label <- label of label) so that long components converge in few sweeps.
    """
    foreground = colour_map >= 0
    num_pixels = colour_map.size
    no_label = num_pixels  # larger than every index, so it never wins a minimum
    labels = np.where(foreground, np.arange(num_pixels).reshape(colour_map.shape), no_label)
    # joined_x[b, i, j]: pixels (i, j) and (i, j + 1) are the same colour; joined_y likewise downward.
    joined_x = foreground[:, :, 1:] & (colour_map[:, :, 1:] == colour_map[:, :, :-1])
    joined_y = foreground[:, 1:, :] & (colour_map[:, 1:, :] == colour_map[:, :-1, :])
    flat_foreground = np.flatnonzero(foreground)
    while True:
        updated = labels.copy()
        updated[:, :, :-1] = np.minimum(updated[:, :, :-1], np.where(joined_x, labels[:, :, 1:], no_label))
        updated[:, :, 1:] = np.minimum(updated[:, :, 1:], np.where(joined_x, labels[:, :, :-1], no_label))
        updated[:, :-1, :] = np.minimum(updated[:, :-1, :], np.where(joined_y, labels[:, 1:, :], no_label))
        updated[:, 1:, :] = np.minimum(updated[:, 1:, :], np.where(joined_y, labels[:, :-1, :], no_label))
        flat = updated.reshape(-1)
        flat[flat_foreground] = flat[flat[flat_foreground]]  # pointer jumping
        if np.array_equal(updated, labels):
            break
        labels = updated
    return np.where(foreground, labels, -1)


def classify_shape(fill: float, box_width: int, box_height: int) -> str | None:
    """Shape name from the fill ratio of a region in its bounding box, None when nothing fits."""
    if max(box_width, box_height) > MAX_ASPECT * min(box_width, box_height) or fill < MIN_FILL:
        return None
    if fill < TRIANGLE_MAX_FILL:
        return "triangle"
    if fill < CIRCLE_MAX_FILL:
        return "circle"
    return "square"
