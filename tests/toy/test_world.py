"""The shapes world: caption grammar, split, scene sampling and rendering, and the detector reading it back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rlfuse.toy.detect import detect, detect_batch
from rlfuse.toy.world import (
    COLOURS,
    PALETTE,
    SHAPES,
    ParsedPrompt,
    RequiredObject,
    Scene,
    SceneObject,
    all_prompts,
    caption_for,
    parse_prompt,
    relation_holds,
    render,
    sample_scene,
    split_prompts,
)


def sample(num_scenes: int, size: int, seed: int) -> list[tuple[Scene, str]]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, size) for _ in range(num_scenes)]


@pytest.fixture(scope="module")
def scenes_32() -> list[tuple[Scene, str]]:
    return sample(2000, 32, seed=0)


@pytest.fixture(scope="module")
def scenes_64() -> list[tuple[Scene, str]]:
    return sample(300, 64, seed=1)


# --- grammar --------------------------------------------------------------------------------------


def test_grammar_has_15_single_30_count_and_840_relation_captions():
    assert len(all_prompts("single")) == 15
    assert len(all_prompts("count")) == 30
    assert len(all_prompts("relation")) == 15 * 14 * 4
    assert len(set(all_prompts())) == len(all_prompts()) == 885


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle", ParsedPrompt("single", (RequiredObject("red", "circle"),))),
        ("two blue squares", ParsedPrompt("count", (RequiredObject("blue", "square", 2),))),
        ("three green triangles", ParsedPrompt("count", (RequiredObject("green", "triangle", 3),))),
        (
            "a red circle to the left of a blue square",
            ParsedPrompt("relation", (RequiredObject("red", "circle"), RequiredObject("blue", "square")), "left of"),
        ),
        (
            "a yellow triangle above a purple circle",
            ParsedPrompt("relation", (RequiredObject("yellow", "triangle"), RequiredObject("purple", "circle")), "above"),
        ),
        (
            "a purple square to the right of a purple circle",
            ParsedPrompt("relation", (RequiredObject("purple", "square"), RequiredObject("purple", "circle")), "right of"),
        ),
        (
            "a green circle below a green triangle",
            ParsedPrompt("relation", (RequiredObject("green", "circle"), RequiredObject("green", "triangle")), "below"),
        ),
        # Case, extra spaces and one trailing full stop are ignored.
        ("  A Red  Circle. ", ParsedPrompt("single", (RequiredObject("red", "circle"),))),
    ],
)
def test_parse_prompt_reads_hand_written_captions(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_parse_prompt_inverts_caption_for_on_every_caption():
    for prompt in all_prompts():
        assert caption_for(parse_prompt(prompt)) == prompt


@pytest.mark.parametrize(
    "prompt",
    [
        "a pink circle",
        "a red hexagon",
        "four red circles",
        "two red circle",
        "one red circle",
        "red circle",
        "a red circle to the left of a red circle",  # the same object twice is a count, not a relation
        "a red circle next to a blue square",
        "a red circle and a blue square",
        "",
    ],
)
def test_prompt_outside_grammar_raises_one_line_error_naming_it(prompt):
    with pytest.raises(ValueError) as error:
        parse_prompt(prompt)
    message = str(error.value)
    assert repr(prompt) in message
    assert "a red circle" in message  # gives a valid example
    assert "\n" not in message


# --- train / held-out split ----------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_the_grammar():
    train, heldout = split_prompts(seed=0)
    assert (train, heldout) == split_prompts(seed=0)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(all_prompts())
    assert 0.10 <= len(heldout) / len(all_prompts()) <= 0.20
    assert split_prompts(seed=1)[1] != heldout


def test_split_holds_out_every_kind_and_trains_on_every_word():
    train, heldout = split_prompts(seed=0)
    assert {parse_prompt(p).kind for p in heldout} == {"single", "count", "relation"}
    trained_pairs = {(o.colour, o.shape) for p in train for o in parse_prompt(p).objects}
    assert trained_pairs == set(itertools.product(COLOURS, SHAPES))


# --- scenes and rendering ------------------------------------------------------------------------


def test_sample_scene_is_seeded_and_covers_every_caption_kind(scenes_32):
    assert sample(20, 32, seed=0) == scenes_32[:20]
    assert {parse_prompt(caption).kind for _, caption in scenes_32[:100]} == {"single", "count", "relation"}


def test_sample_scene_draws_only_from_given_prompts():
    train, _ = split_prompts(seed=0)
    rng = np.random.default_rng(0)
    assert all(sample_scene(rng, 32, prompts=train[:5])[1] in train[:5] for _ in range(50))


@pytest.mark.parametrize("scenes, size", [("scenes_32", 32), ("scenes_64", 64)])
def test_scenes_match_their_captions_and_keep_shapes_inside_and_apart(scenes, size, request):
    scale = size / 32
    for scene, caption in request.getfixturevalue(scenes):
        parsed = parse_prompt(caption)
        wanted = sorted((o.colour, o.shape) for o in parsed.objects for _ in range(o.count))
        assert sorted((o.colour, o.shape) for o in scene.objects) == wanted
        for obj in scene.objects:
            assert 7 * scale <= obj.size <= 12 * scale
            for coordinate in obj.centre:
                assert obj.size / 2 < coordinate < size - obj.size / 2
        for a, b in itertools.combinations(scene.objects, 2):
            reach = (a.size + b.size) / 2
            assert abs(a.centre[0] - b.centre[0]) > reach or abs(a.centre[1] - b.centre[1]) > reach
        if parsed.relation is not None:
            assert relation_holds(scene.objects[0].centre, scene.objects[1].centre, parsed.relation)


def test_render_paints_background_and_each_shape_centre_in_its_colour():
    scene = Scene(
        [
            SceneObject("circle", "red", (8.0, 8.0), 10.0),
            SceneObject("square", "blue", (24.0, 8.0), 10.0),
            SceneObject("triangle", "yellow", (16.0, 24.0), 10.0),
        ],
        image_size=32,
        background=250,
    )
    image = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (250, 250, 250)
    for obj in scene.objects:
        x, y = (int(c) for c in obj.centre)
        assert tuple(image[y, x]) == PALETTE[obj.colour]
    assert render(scene, 64).shape == (64, 64, 3)


def test_relation_holds_only_along_the_dominant_axis():
    assert relation_holds((5.0, 10.0), (20.0, 12.0), "left of")
    assert relation_holds((20.0, 12.0), (5.0, 10.0), "right of")
    assert relation_holds((10.0, 5.0), (12.0, 20.0), "above")
    assert relation_holds((12.0, 20.0), (10.0, 5.0), "below")
    # A diagonal neighbour is left of or above, never both.
    assert relation_holds((0.0, 0.0), (10.0, 6.0), "left of") and not relation_holds((0.0, 0.0), (10.0, 6.0), "above")


# --- detector ------------------------------------------------------------------------------------


def assert_detections_match_scene(scene: Scene, detections, max_centre_error: float):
    """Same multiset of (colour, shape); each object has a detection of its kind near its centre."""
    assert sorted((d.colour, d.shape) for d in detections) == sorted((o.colour, o.shape) for o in scene.objects)
    for obj in scene.objects:
        errors = [
            np.hypot(d.centre[0] - obj.centre[0], d.centre[1] - obj.centre[1])
            for d in detections
            if (d.colour, d.shape) == (obj.colour, obj.shape)
        ]
        assert min(errors) <= max_centre_error


@pytest.mark.parametrize("scenes, size", [("scenes_32", 32), ("scenes_64", 64)])
def test_detector_reads_back_every_generated_scene(scenes, size, request):
    scenes = request.getfixturevalue(scenes)
    images = np.stack([render(scene) for scene, _ in scenes])
    for (scene, caption), detections in zip(scenes, detect_batch(images)):
        # Centres are bounding-box centres of the 50% coverage mask: within a pixel of the truth.
        assert_detections_match_scene(scene, detections, max_centre_error=size / 32)
        parsed = parse_prompt(caption)
        if parsed.relation is not None:
            first, second = (
                next(d for d in detections if (d.colour, d.shape) == (o.colour, o.shape)) for o in parsed.objects
            )
            assert relation_holds(first.centre, second.centre, parsed.relation)


def test_detect_on_one_image_equals_detect_batch(scenes_32):
    images = np.stack([render(scene) for scene, _ in scenes_32[:10]])
    assert [detect(image) for image in images] == detect_batch(images)


def test_detector_drops_specks_and_off_palette_colours_and_names_no_shape_for_bars():
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    image[2:4, 2:4] = PALETTE["red"]  # 4 px speck, below 1% of the image
    image[20:30, 20:30] = (128, 128, 128)  # grey is no palette colour
    image[10:12, 4:28] = PALETTE["blue"]  # a bar 12 times longer than wide
    detections = detect(image)
    assert [(d.colour, d.shape) for d in detections] == [("blue", None)]
    assert detect(np.full((32, 32, 3), 255, dtype=np.uint8)) == []
