"""The shapes world: seeded scenes of coloured shapes on a near-white background, and their captions.

A scene holds one to three filled shapes (circle, square, triangle) in five colours that are far apart
in RGB, so that a detector can read the image back exactly (see `rlfuse.toy.detect`). Captions come
from a small grammar:

    single    "a red circle"
    count     "two blue squares", "three green triangles"
    relation  "a red circle to the left of a blue square"   (also "to the right of", "above", "below")

The grammar has 15 single, 30 count and 840 relation captions (885 in all). A caption describes its
whole scene: there are no distractor objects, so an image matches its caption exactly when the
detected objects are the requested ones and nothing else.

Coordinates are in pixels of a `Scene.image_size` image: x to the right, y downward, and pixel (row i,
column j) covers [j, j + 1) x [i, i + 1). An object's centre is the centre of its bounding box.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# RGB values chosen far apart, and far from white along every blend with white, so that the detector
# can classify each pixel exactly even at antialiased edges (the closest pair, blue and purple, is
# still 58 RGB units apart at 50% coverage).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (150, 40, 170),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three"}
# Relation words in captions -> the relation's name, read "first object <relation> second object".
RELATION_PHRASES: dict[str, str] = {
    "to the left of": "left of",
    "to the right of": "right of",
    "above": "above",
    "below": "below",
}
RELATIONS: tuple[str, ...] = tuple(RELATION_PHRASES.values())
CAPTION_KINDS: tuple[str, ...] = ("single", "count", "relation")

# Geometry at the reference size of 32 px; everything scales linearly with the image size.
REFERENCE_SIZE = 32
MIN_OBJECT_SIZE = 7.0  # bounding-box side in pixels; smaller shapes are hard to classify at 32 px
MAX_OBJECT_SIZE = 12.0
MIN_GAP = 2.0  # pixels between the bounding boxes of two shapes, and between a shape and the border
# A relation scene puts the second object this many pixels further along the named axis than the
# cross-axis offset, so "left of" stays true and unambiguous despite a pixel of detection jitter.
RELATION_MARGIN = 2.0
SUPERSAMPLING = 4  # antialiasing: each pixel averages SUPERSAMPLING**2 sub-pixel samples

EXAMPLE_PROMPTS = "'a red circle', 'two blue squares' or 'a red circle to the left of a blue square'"


@dataclass(frozen=True)
class SceneObject:
    """One filled shape: `centre` (x, y) and bounding-box side `size`, both in pixels."""

    shape: str
    colour: str
    centre: tuple[float, float]
    size: float


@dataclass(frozen=True)
class Scene:
    """The objects of one image of side `image_size` pixels, on a grey `background` level (240-255)."""

    objects: list[SceneObject]
    image_size: int = REFERENCE_SIZE
    background: int = 255


@dataclass(frozen=True)
class RequiredObject:
    """`count` identical objects of one colour and shape, as asked by a caption."""

    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class ParsedPrompt:
    """A caption read back: its kind, the required objects and, for relation captions, the relation.

    `relation` (one of RELATIONS, or None) reads "objects[0] <relation> objects[1]".
    """

    kind: str  # one of CAPTION_KINDS
    objects: tuple[RequiredObject, ...]
    relation: str | None = None


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------


def plural(shape: str) -> str:
    return shape + "s"


def single_caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def count_caption(colour: str, shape: str, count: int) -> str:
    return f"{NUMBER_WORDS[count]} {colour} {plural(shape)}"


def relation_caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """first, second: (colour, shape); relation: one of RELATIONS."""
    phrase = next(words for words, name in RELATION_PHRASES.items() if name == relation)
    return f"{single_caption(*first)} {phrase} {single_caption(*second)}"


def caption_for(parsed: ParsedPrompt) -> str:
    """The canonical caption of a parsed prompt (inverse of `parse_prompt`)."""
    first = parsed.objects[0]
    if parsed.relation is not None:
        second = parsed.objects[1]
        return relation_caption((first.colour, first.shape), parsed.relation, (second.colour, second.shape))
    if first.count == 1:
        return single_caption(first.colour, first.shape)
    return count_caption(first.colour, first.shape, first.count)


def all_prompts(kind: str | None = None) -> list[str]:
    """Every caption of the grammar (885), or only those of one kind ("single", "count", "relation").

    The order is fixed: kinds in CAPTION_KINDS order, then colours, shapes and relations in the order
    of their tuples.
    """
    if kind is not None and kind not in CAPTION_KINDS:
        raise ValueError(f"kind={kind!r}: use one of {CAPTION_KINDS} or None")
    objects = list(itertools.product(COLOURS, SHAPES))  # 15 (colour, shape) pairs
    prompts: dict[str, list[str]] = {
        "single": [single_caption(colour, shape) for colour, shape in objects],
        "count": [count_caption(colour, shape, n) for colour, shape in objects for n in NUMBER_WORDS],
        # Ordered pairs of two different objects: "a red circle ... a red circle" would be a count.
        "relation": [
            relation_caption(first, relation, second)
            for first, second in itertools.permutations(objects, 2)
            for relation in RELATIONS
        ],
    }
    if kind is not None:
        return prompts[kind]
    return [prompt for name in CAPTION_KINDS for prompt in prompts[name]]


def split_prompts(seed: int = 0, heldout_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """Deterministic (train, heldout) split of `all_prompts()`.

    Each caption kind is split separately (a seeded permutation, then the first round(fraction * n)
    captions are held out), so the held-out set has single, count and relation captions. Every
    colour, shape and (colour, shape) pair still appears in training captions: held-out captions
    test new compositions of known words, not new words.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction}: use a number in [0, 1)")
    rng = np.random.default_rng(seed)
    train: list[str] = []
    heldout: list[str] = []
    for kind in CAPTION_KINDS:
        prompts = all_prompts(kind)
        order = rng.permutation(len(prompts))
        num_heldout = math.floor(heldout_fraction * len(prompts) + 0.5)
        heldout += sorted(prompts[i] for i in order[:num_heldout])
        train += sorted(prompts[i] for i in order[num_heldout:])
    # Each pair appears in 112 relation captions, so this holds unless nearly all are held out; it is
    # checked rather than assumed because a held-out word would silently change what is measured.
    seen_pairs = {(o.colour, o.shape) for prompt in train for o in parse_prompt(prompt).objects}
    if len(seen_pairs) != len(COLOURS) * len(SHAPES):
        raise RuntimeError(f"split_prompts(seed={seed}) left a colour-shape pair out of training")
    return train, heldout


_SINGLE = r"a (?P<{0}colour>\w+) (?P<{0}shape>\w+)"
_SINGLE_RE = re.compile(_SINGLE.format(""))
_COUNT_RE = re.compile(r"(?P<number>\w+) (?P<colour>\w+) (?P<shape>\w+)")
_RELATION_RE = re.compile(
    _SINGLE.format("first_") + " (?P<phrase>" + "|".join(RELATION_PHRASES) + ") " + _SINGLE.format("second_")
)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Read a caption of the grammar into its required objects and relation.

    Case, surrounding spaces, repeated spaces and one trailing full stop are ignored.

    Raises:
        ValueError: the prompt is outside the grammar; the one-line message names it and gives
            valid examples.
    """
    text = " ".join(prompt.lower().split()).removesuffix(".").strip()
    parsed = _parse_normalised(text)
    if parsed is None:
        raise ValueError(f"prompt {prompt!r} is outside the shapes grammar; use e.g. {EXAMPLE_PROMPTS}")
    return parsed


def _parse_normalised(text: str) -> ParsedPrompt | None:
    """Parse a lower-case, single-spaced caption; None when it is not in the grammar."""
    if match := _RELATION_RE.fullmatch(text):
        first = RequiredObject(match["first_colour"], match["first_shape"])
        second = RequiredObject(match["second_colour"], match["second_shape"])
        if first == second or not all(_is_known(o.colour, o.shape) for o in (first, second)):
            return None
        return ParsedPrompt("relation", (first, second), RELATION_PHRASES[match["phrase"]])
    if match := _SINGLE_RE.fullmatch(text):
        if not _is_known(match["colour"], match["shape"]):
            return None
        return ParsedPrompt("single", (RequiredObject(match["colour"], match["shape"]),))
    if match := _COUNT_RE.fullmatch(text):
        count = {word: n for n, word in NUMBER_WORDS.items()}.get(match["number"])
        shape = match["shape"].removesuffix("s")
        if count is None or match["shape"] != plural(shape) or not _is_known(match["colour"], shape):
            return None
        return ParsedPrompt("count", (RequiredObject(match["colour"], shape, count),))
    return None


def _is_known(colour: str, shape: str) -> bool:
    return colour in PALETTE and shape in SHAPES


# ---------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------


def sample_scene(
    rng: np.random.Generator, size: int = REFERENCE_SIZE, prompts: Sequence[str] | None = None
) -> tuple[Scene, str]:
    """Draw a caption, then a random scene that it describes exactly.

    Without `prompts`, the caption kind is uniform over single / count / relation, then the caption
    is uniform within its kind; with `prompts` (e.g. the train split), it is uniform over that list.
    Returns (scene, caption); render the scene with `render(scene)`.
    """
    if prompts is None:
        prompts = all_prompts(CAPTION_KINDS[rng.integers(len(CAPTION_KINDS))])
    caption = prompts[rng.integers(len(prompts))]
    return scene_for_prompt(caption, rng, size), caption


def scene_for_prompt(prompt: str, rng: np.random.Generator, size: int = REFERENCE_SIZE) -> Scene:
    """A random scene of side `size` pixels that the caption `prompt` describes exactly.

    Shapes have bounding-box sides of 7-12 px at 32 px (scaled with `size`), stay MIN_GAP pixels
    clear of each other and of the border, and relation scenes put the named axis offset at least
    RELATION_MARGIN pixels above the cross-axis offset. Positions are found by rejection sampling.
    """
    parsed = parse_prompt(prompt)
    scale = size / REFERENCE_SIZE
    wanted = [(o.colour, o.shape) for o in parsed.objects for _ in range(o.count)]
    background = int(rng.integers(240, 256))
    for _ in range(1000):
        objects = []
        for colour, shape in wanted:
            side = rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE) * scale
            # Keep the whole bounding box, plus the gap, inside the image.
            low, high = side / 2 + MIN_GAP * scale, size - side / 2 - MIN_GAP * scale
            centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
            objects.append(SceneObject(shape, colour, centre, float(side)))
        if not _boxes_apart(objects, MIN_GAP * scale):
            continue
        if parsed.relation is None or relation_holds(
            objects[0].centre, objects[1].centre, parsed.relation, RELATION_MARGIN * scale
        ):
            return Scene(objects, image_size=size, background=background)
    raise RuntimeError(f"could not place the objects of {prompt!r} in a {size} px image")


def _boxes_apart(objects: list[SceneObject], gap: float) -> bool:
    """True if every two bounding boxes are at least `gap` pixels apart along x or along y."""
    for a, b in itertools.combinations(objects, 2):
        reach = (a.size + b.size) / 2 + gap
        if abs(a.centre[0] - b.centre[0]) < reach and abs(a.centre[1] - b.centre[1]) < reach:
            return False
    return True


def relation_holds(
    first: tuple[float, float], second: tuple[float, float], relation: str, margin: float = 0.0
) -> bool:
    """Does the object centred at `first` stand in `relation` to the one centred at `second`?

    The offset along the named axis must point the named way and exceed the cross-axis offset by
    more than `margin` pixels: "left of" means second_x - first_x > |second_y - first_y| + margin.
    A diagonal neighbour is therefore "left of" or "above", never both.
    """
    dx, dy = second[0] - first[0], second[1] - first[1]
    # (offset along the named axis in the named direction, offset across it)
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > abs(across) + margin


def render(scene: Scene, size: int | None = None) -> np.ndarray:
    """Draw a scene as a (size, size, 3) uint8 RGB image, antialiased by supersampling.

    size: output side in pixels, `scene.image_size` by default; another size rescales the scene.
    """
    size = scene.image_size if size is None else size
    scale = size / scene.image_size
    # Sub-pixel sample positions, in output pixels: (size * S,) coordinates of the sample centres.
    samples = (np.arange(size * SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    xs, ys = samples[None, :], samples[:, None]
    canvas = np.full((size * SUPERSAMPLING, size * SUPERSAMPLING, 3), float(scene.background))
    for obj in scene.objects:
        mask = _shape_mask(obj.shape, obj.centre[0] * scale, obj.centre[1] * scale, obj.size * scale, xs, ys)
        canvas[mask] = PALETTE[obj.colour]
    # Average each S x S block of samples into one pixel: (size, S, size, S, 3) -> (size, size, 3).
    image = canvas.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING, 3).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8)


def _shape_mask(shape: str, cx: float, cy: float, side: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean (len(ys), len(xs)) mask of the samples inside a shape whose bounding box has side `side`.

    The triangle is isosceles and points up: apex at the top centre, base along the bottom edge.
    """
    half = side / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":
        depth_below_apex = ys - (cy - half)  # 0 at the apex, `side` at the base
        inside_height = (depth_below_apex >= 0) & (depth_below_apex <= side)
        return inside_height & (np.abs(xs - cx) <= depth_below_apex / 2)  # half-width grows 1/2 px per px
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
