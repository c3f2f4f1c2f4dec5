"""Detect the coloured shapes of the shapes world in an image, by colour segmentation.

Four steps, vectorised over a batch of images:

1. Colour coverage. Each pixel is un-mixed from the white background along every palette colour c:
   pixel ~ white + coverage * (c - white), leaving a distance from that blend line. A pixel takes
   the nearest colour among those covering at least half of it, if within `colour_tolerance`: a
   nearest-palette-colour rule that also reads antialiased and blurred edges (a 50% red-on-white
   pixel is red, not purple) and cuts each shape at its 50% contour.
2. Connected components (4-neighbourhood) of same-colour pixels; components smaller than
   `min_area_fraction` of the image are specks and are dropped.
3. Bounding box: gives the centre, the aspect and the fill ratio (area / box area: square ~1,
   circle ~pi / 4, triangle ~1 / 2). A box more than 1.5 times longer than wide, or a fill below
   0.35, is no shape of the world (shape None).
4. Shape, from coverage-weighted moments of the component and a 2-pixel band around it. The fill
   ratio alone is not enough at 32 px: on clean 7-12 px renders triangles reach 0.71 and circles
   drop to 0.64, and under a slight blur plus noise the box of an 8 px square gains a flickering
   edge row or column (fill down to 0.74). Cumulants of coverage-weighted projections avoid both:
   a Gaussian blur adds variance but leaves the third and fourth cumulants of every projection
   unchanged, and partial coverage replaces the flicker of a hard edge. See `shape_scores`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlfuse.toy.world import COLOURS, PALETTE

# (K, 3) palette colours as offsets from white, in COLOURS order.
COLOUR_DIRECTIONS = np.array([PALETTE[name] for name in COLOURS], dtype=np.float32) - 255.0

# Partial coverage is counted this many pixels around a component: a blur of sigma <= 1 px spreads an
# edge over about 2 px either side of its 50% contour.
EDGE_BAND = 2
# Third cumulant of an upright isosceles triangle (base = height = s) along its axis, over area^1.5:
# skewness -2 sqrt(2) / 5 times (s^2 / 18)^1.5, over (s^2 / 2)^1.5, = -2 sqrt(2) / 135.
TRIANGLE_THIRD_CUMULANT = 2 * math.sqrt(2) / 135
# Diagonal minus axis fourth cumulant of a square, over area^2: a square of side s projects onto its
# axes as a uniform law (fourth cumulant -s^4 / 120) and onto its diagonals as a triangular one
# (-s^4 / 240); a disc projects alike in every direction, so its difference is 0.
SQUARE_FOURTH_CUMULANT_GAP = 1 / 240
# Scores are 1 for the ideal shape and 0 for the others. A blur pushes part of an edge beyond the band
# and shrinks both scores, so the thresholds sit below halfway: on 1000 scenes at 32 px blurred with
# sigma = 0.8 or 1 px plus noise of std 0.03, triangles scored at least 0.43 as triangles and
# squares at least 0.37 as squares; circles and squares at most 0.21 as triangles, circles at most
# 0.16 as squares.
TRIANGLE_MIN_SCORE = 0.3
SQUARE_MIN_SCORE = 0.3
MIN_FILL = 0.35  # a region filling less of its box is no shape of the world
MAX_ASPECT = 1.5  # nor is one whose box is more than 1.5 times longer than wide


@dataclass(frozen=True)
class DetectedObject:
    """One connected same-colour region read as a shape.

    shape: "circle", "square", "triangle", or None when the region fits none of them.
    centre: (x, y) centre of the bounding box, in pixels (pixel (i, j) covers [j, j + 1) x [i, i + 1)).
    box_size: (width, height) of the bounding box in pixels.
    area: number of pixels; fill: area / (width * height).
    triangle_score, square_score: ~1 for an ideal triangle / square, ~0 otherwise (`shape_scores`).
    """

    colour: str
    shape: str | None
    centre: tuple[float, float]
    box_size: tuple[int, int]
    area: int
    fill: float
    triangle_score: float
    square_score: float


def detect(
    image: np.ndarray, colour_tolerance: float = 48.0, min_area_fraction: float = 0.01
) -> list[DetectedObject]:
    """The objects in one (H, W, 3) uint8 RGB image, in raster order of their first pixel."""
    return detect_batch(image[None], colour_tolerance, min_area_fraction)[0]


def detect_batch(
    images: np.ndarray, colour_tolerance: float = 48.0, min_area_fraction: float = 0.01
) -> list[list[DetectedObject]]:
    """The objects in each of B images, (B, H, W, 3) uint8 RGB; B lists, in raster order.

    colour_tolerance: largest RGB distance of a pixel from its colour's blend-with-white line.
    min_area_fraction: smallest component kept, as a fraction of H * W (10 px at 32 x 32).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got shape {images.shape}")
    num_images, height, width, _ = images.shape
    pixels_per_image = height * width
    coverage, distance = colour_coverage(images)  # (B, H, W, K) each
    colour_map = classify_pixels(coverage, distance, colour_tolerance)  # (B, H, W), -1 for background
    labels = label_components(colour_map)  # (B, H, W), root pixel's flat index, -1 for background
    detections: list[list[DetectedObject]] = [[] for _ in range(num_images)]
    if not (labels >= 0).any():
        return detections

    # Hard statistics over each component's pixels: area and bounding box, all (C,).
    pixel_index = np.flatnonzero(labels >= 0)  # (N,) flat indices into (B, H, W)
    roots, component_of_pixel = np.unique(labels.reshape(-1)[pixel_index], return_inverse=True)
    areas = np.bincount(component_of_pixel, minlength=len(roots))
    ys, xs = np.divmod(pixel_index % pixels_per_image, width)
    by_component = np.argsort(component_of_pixel, kind="stable")
    xs_grouped, ys_grouped = xs[by_component], ys[by_component]
    starts = np.concatenate([[0], np.cumsum(areas)[:-1]])  # first pixel of each component in the grouping
    x_min, x_max = np.minimum.reduceat(xs_grouped, starts), np.maximum.reduceat(xs_grouped, starts)
    y_min, y_max = np.minimum.reduceat(ys_grouped, starts), np.maximum.reduceat(ys_grouped, starts)
    box_widths, box_heights = x_max - x_min + 1, y_max - y_min + 1
    centres_x, centres_y = (x_min + x_max + 1) / 2, (y_min + y_max + 1) / 2
    fills = areas / (box_widths * box_heights)

    # Soft statistics over each component and the band around it, weighted by its colour's coverage.
    grown = grow_labels(labels, EDGE_BAND)
    band_index = np.flatnonzero(grown >= 0)  # (M,)
    grown_roots, component_of_band_pixel = np.unique(grown.reshape(-1)[band_index], return_inverse=True)
    assert np.array_equal(grown_roots, roots)  # growing only extends existing components
    band_colours = colour_map.reshape(-1)[grown.reshape(-1)[band_index]]  # (M,) the component's colour
    num_colours = len(COLOURS)
    band_coverage = coverage.reshape(-1, num_colours)[band_index, band_colours]
    band_distance = distance.reshape(-1, num_colours)[band_index, band_colours]
    # A band pixel of another colour (a neighbouring shape) is not partial coverage of this one.
    weights = np.where(band_distance <= colour_tolerance, np.clip(band_coverage, 0.0, 1.0), 0.0)
    band_ys, band_xs = np.divmod(band_index % pixels_per_image, width)
    triangle_scores, square_scores = shape_scores(
        band_xs + 0.5, band_ys + 0.5, weights, component_of_band_pixel, len(roots)
    )

    for component in np.flatnonzero(areas >= min_area_fraction * pixels_per_image):
        box_width, box_height = int(box_widths[component]), int(box_heights[component])
        triangle_score, square_score = triangle_scores[component], square_scores[component]
        detections[roots[component] // pixels_per_image].append(
            DetectedObject(
                colour=COLOURS[colour_map.reshape(-1)[roots[component]]],
                shape=classify_shape(fills[component], box_width, box_height, triangle_score, square_score),
                centre=(float(centres_x[component]), float(centres_y[component])),
                box_size=(box_width, box_height),
                area=int(areas[component]),
                fill=float(fills[component]),
                triangle_score=float(triangle_score),
                square_score=float(square_score),
            )
        )
    return detections


def colour_coverage(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How much of each pixel each palette colour covers, and how far the pixel is from that blend.

    images: (B, H, W, 3) uint8. Returns coverage and distance, (B, H, W, K) float32 each. With
    d = pixel - white and v = colour - white, coverage a = d.v / |v|^2 (0 on white, 1 on the colour)
    and distance = |d - a v| = sqrt(|d|^2 - a^2 |v|^2), in RGB units.
    """
    offsets = images.astype(np.float32) - 255.0  # (B, H, W, 3)
    squared_lengths = (COLOUR_DIRECTIONS**2).sum(axis=1)  # (K,)
    coverage = offsets @ COLOUR_DIRECTIONS.T / squared_lengths  # (B, H, W, K)
    squared_distances = (offsets**2).sum(axis=-1, keepdims=True) - coverage**2 * squared_lengths
    return coverage, np.sqrt(np.maximum(squared_distances, 0.0))


def classify_pixels(coverage: np.ndarray, distance: np.ndarray, colour_tolerance: float = 48.0) -> np.ndarray:
    """(B, H, W) index into COLOURS of each pixel, or -1 for background and off-palette pixels.

    coverage, distance: (B, H, W, K) from `colour_coverage`. A pixel takes the colour it is nearest
    to among those covering at least half of it, if that distance is at most `colour_tolerance`.
    """
    candidate_distances = np.where(coverage >= 0.5, distance, np.inf)
    nearest = candidate_distances.argmin(axis=-1)  # (B, H, W)
    nearest_distance = np.take_along_axis(candidate_distances, nearest[..., None], axis=-1)[..., 0]
    return np.where(nearest_distance <= colour_tolerance, nearest, -1)


def label_components(colour_map: np.ndarray) -> np.ndarray:
    """Connected components (4-neighbourhood) of equal non-negative values in (B, H, W) `colour_map`.

    Returns (B, H, W) int64: for each foreground pixel, the flat index into (B, H, W) of the first
    pixel of its component (so labels never join two images); -1 for background. Every pixel starts
    with its own index and repeatedly takes the smallest label among its same-colour neighbours, with
    pointer jumping (label <- label of label) so that long components converge in few sweeps.
    """
    foreground = colour_map >= 0
    no_label = colour_map.size  # larger than every index, so it never wins a minimum
    labels = np.where(foreground, np.arange(colour_map.size).reshape(colour_map.shape), no_label)
    # joined_x[b, i, j]: pixels (i, j) and (i, j + 1) have the same colour; joined_y likewise downward.
    joined_x = foreground[:, :, 1:] & (colour_map[:, :, 1:] == colour_map[:, :, :-1])
    joined_y = foreground[:, 1:, :] & (colour_map[:, 1:, :] == colour_map[:, :-1, :])
    foreground_index = np.flatnonzero(foreground)
    while True:
        updated = labels.copy()
        updated[:, :, :-1] = np.minimum(updated[:, :, :-1], np.where(joined_x, labels[:, :, 1:], no_label))
        updated[:, :, 1:] = np.minimum(updated[:, :, 1:], np.where(joined_x, labels[:, :, :-1], no_label))
        updated[:, :-1, :] = np.minimum(updated[:, :-1, :], np.where(joined_y, labels[:, 1:, :], no_label))
        updated[:, 1:, :] = np.minimum(updated[:, 1:, :], np.where(joined_y, labels[:, :-1, :], no_label))
        flat = updated.reshape(-1)
        flat[foreground_index] = flat[flat[foreground_index]]  # pointer jumping
        if np.array_equal(updated, labels):
            return np.where(foreground, labels, -1)
        labels = updated


def grow_labels(labels: np.ndarray, steps: int) -> np.ndarray:
    """Extend (B, H, W) component labels (-1 = none) by `steps` pixels into unlabelled pixels.

    A pixel within reach of two components takes the smaller label; labelled pixels keep theirs.
    """
    no_label = labels.size
    grown = np.where(labels >= 0, labels, no_label)
    for _ in range(steps):
        reached = grown.copy()
        reached[:, :, :-1] = np.minimum(reached[:, :, :-1], grown[:, :, 1:])
        reached[:, :, 1:] = np.minimum(reached[:, :, 1:], grown[:, :, :-1])
        reached[:, :-1, :] = np.minimum(reached[:, :-1, :], grown[:, 1:, :])
        reached[:, 1:, :] = np.minimum(reached[:, 1:, :], grown[:, :-1, :])
        grown = np.where(labels >= 0, labels, reached)
    return np.where(grown < no_label, grown, -1)


def shape_scores(
    xs: np.ndarray, ys: np.ndarray, weights: np.ndarray, component: np.ndarray, num_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Triangle and square scores of weighted point sets; (C,) arrays, ~1 for the ideal shape.

    xs, ys, weights, component: (M,) pixel centres, their coverage and their component in [0, C).

    Each component is treated as a mass distribution (mass = coverage) of total mass A, and its
    cumulants are taken along the x and y axes and the two diagonals. Dividing the third cumulant by
    A^1.5 and the fourth by A^2 makes them independent of size; a Gaussian blur leaves both as they
    are (it only adds to the second cumulant).

    triangle score = max(|third cumulant along x|, |along y|) / A^1.5 / TRIANGLE_THIRD_CUMULANT:
        1 for an upright (or sideways) triangle, 0 for the symmetric circle and square.
    square score = (mean diagonal - mean axis fourth cumulant) / A^2 / SQUARE_FOURTH_CUMULANT_GAP:
        1 for an axis-aligned square, 0 for a disc.
    """
    def weighted_mean(values: np.ndarray) -> np.ndarray:  # (M,) -> (C,)
        return np.bincount(component, weights=weights * values, minlength=num_components) / mass

    mass = np.bincount(component, weights=weights, minlength=num_components)  # (C,)
    mass = np.maximum(mass, 1e-6)  # zero only for components with no coverage, which are never kept
    xs_centred = xs - weighted_mean(xs)[component]
    ys_centred = ys - weighted_mean(ys)[component]

    def third_and_fourth_cumulants(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        second, third, fourth = (weighted_mean(offsets**k) for k in (2, 3, 4))
        return third, fourth - 3 * second**2

    third_x, fourth_x = third_and_fourth_cumulants(xs_centred)
    third_y, fourth_y = third_and_fourth_cumulants(ys_centred)
    _, fourth_diagonal = third_and_fourth_cumulants((xs_centred + ys_centred) / math.sqrt(2))
    _, fourth_antidiagonal = third_and_fourth_cumulants((xs_centred - ys_centred) / math.sqrt(2))
    triangle = np.maximum(np.abs(third_x), np.abs(third_y)) / mass**1.5 / TRIANGLE_THIRD_CUMULANT
    diagonal_minus_axis = (fourth_diagonal + fourth_antidiagonal - fourth_x - fourth_y) / 2
    square = diagonal_minus_axis / mass**2 / SQUARE_FOURTH_CUMULANT_GAP
    return triangle, square


def classify_shape(
    fill: float, box_width: int, box_height: int, triangle_score: float, square_score: float
) -> str | None:
    """Shape name of a region, None when its box is elongated or nearly empty (see module docstring)."""
    if max(box_width, box_height) > MAX_ASPECT * min(box_width, box_height) or fill < MIN_FILL:
        return None
    if triangle_score > TRIANGLE_MIN_SCORE:
        return "triangle"
    if square_score > SQUARE_MIN_SCORE:
        return "square"
    return "circle"
