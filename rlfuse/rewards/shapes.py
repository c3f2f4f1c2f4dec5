"""Exact compositional reward for the shapes world: a miniature GenEval.

The caption is parsed by `rlfuse.toy.world.parse_prompt`, the image is read by colour segmentation
(`rlfuse.toy.detect`), and the score says how exactly the detected objects are the requested ones:
right colours, right shapes, right counts, right relative position, nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.jpeg import to_uint8
from rlfuse.toy.detect import DetectedObject, detect_batch
from rlfuse.toy.world import ParsedPrompt, RequiredObject, parse_prompt, relation_holds

CRITERIA: tuple[str, ...] = ("objects", "colour", "shape", "count", "position")


class ShapesReward:
    """score = mean of the criteria that apply to the prompt, each in [0, 1]; 1 only for an exact image.

    Pairing. A caption asks for groups of identical objects ("two blue squares": one group of 2; a
    relation caption: two groups of 1). Each requested object is paired with at most one detected
    object: first with detections of the same colour and shape, then (maximising the number of
    pairs) with detections sharing the colour or the shape. A detection sharing neither is never
    paired. A group's detections are its paired ones plus unpaired exact copies; the other unpaired
    detections are extra objects.

    Criteria:
        objects: groups with at least one detection / (groups + extra objects). An unrequested
            object costs as much as a missing one: "a red circle" scores 1/2 with an extra blue
            square, 1/3 with two.
        colour: fraction of pairs whose colours agree (0 when nothing is paired).
        shape: fraction of pairs whose shapes agree (0 when nothing is paired).
        count: fraction of groups with exactly the requested number of detections; a single-object
            caption asks for exactly one ("a red circle" with two red circles scores 0).
        position: relation captions only. 1 if some detection of the first group stands in the
            relation to some detection of the second (`relation_holds`: the offset along the named
            axis, in the named direction, exceeds the cross-axis offset), else 0. NaN for captions
            without a relation, and left out of their mean.

    A wrong colour, a wrong shape, a wrong count or a swapped position each lowers only its own
    criterion; an empty image scores 0. The score is 1 exactly when the detections are the requested
    objects, nothing else, in the requested relation.

    Call: images (B, 3, H, W) float in [0, 1] (any device) and B prompts -> RewardOutput with scores
    (B,) float32 on the CPU and details {criterion: (B,) float32 on the CPU, NaN where it does not apply}.
    A prompt outside the grammar raises ValueError at call time, before any image is read, with a
    one-line message naming the prompt and giving valid examples.

    Args:
        colour_tolerance, min_area_fraction: passed to `rlfuse.toy.detect.detect_batch`.
    """

    def __init__(self, colour_tolerance: float = 48.0, min_area_fraction: float = 0.01):
        self.colour_tolerance = colour_tolerance
        self.min_area_fraction = min_area_fraction

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ValueError (one line, naming the first bad prompt) if any prompt is outside the grammar.

        The loop calls this at start-up so that a wrong prompt list stops a run before any sampling.
        """
        for prompt in prompts:
            parse_prompt(prompt)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(
                f"ShapesReward takes images (B, 3, H, W) and B prompts, "
                f"got images {tuple(images.shape)} and {len(prompts)} prompts"
            )
        parsed_prompts = [parse_prompt(prompt) for prompt in prompts]
        # (B, 3, H, W) float -> (B, H, W, 3) uint8, as the image would be saved.
        detections = detect_batch(to_uint8(images), self.colour_tolerance, self.min_area_fraction)
        scores = [score_detections(parsed, found) for parsed, found in zip(parsed_prompts, detections)]
        criteria = np.array([[score[name] for name in CRITERIA] for score in scores], dtype=np.float32)
        criteria = criteria.reshape(len(prompts), len(CRITERIA))  # (B, 5), NaN where a criterion does not apply
        details = {name: torch.from_numpy(criteria[:, i].copy()) for i, name in enumerate(CRITERIA)}
        return RewardOutput(torch.from_numpy(np.nanmean(criteria, axis=1).astype(np.float32)), details=details)


def score_detections(parsed: ParsedPrompt, detections: list[DetectedObject]) -> dict[str, float]:
    """The criteria of `ShapesReward` for one image: {criterion: score in [0, 1], or NaN}."""
    groups = parsed.objects
    # One slot per requested object: slot_group[i] is the index of its group.
    slot_group = [g for g, required in enumerate(groups) for _ in range(required.count)]
    pair_of_slot: list[int | None] = [None] * len(slot_group)
    paired: set[int] = set()

    # 1. Exact pairs. Any choice among identical detections gives the same scores below.
    for slot, g in enumerate(slot_group):
        for d, detection in enumerate(detections):
            if d not in paired and _same_object(detection, groups[g]):
                pair_of_slot[slot] = d
                paired.add(d)
                break
    # 2. The most pairs sharing colour or shape, among the rest (maximum bipartite matching).
    open_slots = [slot for slot, d in enumerate(pair_of_slot) if d is None]
    compatible = [
        [d for d, detection in enumerate(detections) if d not in paired and _shares_a_trait(detection, groups[g])]
        for g in (slot_group[slot] for slot in open_slots)
    ]
    for slot, d in zip(open_slots, _maximum_matching(compatible)):
        pair_of_slot[slot] = d

    pairs = [(slot_group[slot], d) for slot, d in enumerate(pair_of_slot) if d is not None]
    paired = {d for _, d in pairs}
    group_detections: list[list[int]] = [[] for _ in groups]
    for g, d in pairs:
        group_detections[g].append(d)
    extra_objects = 0
    for d, detection in enumerate(detections):
        if d in paired:
            continue
        copy_of = [g for g, required in enumerate(groups) if _same_object(detection, required)]
        if copy_of:
            group_detections[copy_of[0]].append(d)
        else:
            extra_objects += 1

    present_groups = sum(1 for found in group_detections if found)
    scores = {
        "objects": present_groups / (len(groups) + extra_objects),
        "colour": _mean([detections[d].colour == groups[g].colour for g, d in pairs]),
        "shape": _mean([detections[d].shape == groups[g].shape for g, d in pairs]),
        "count": _mean([len(found) == required.count for found, required in zip(group_detections, groups)]),
        "position": math.nan,
    }
    if parsed.relation is not None:
        scores["position"] = float(
            any(
                relation_holds(detections[first].centre, detections[second].centre, parsed.relation)
                for first in group_detections[0]
                for second in group_detections[1]
            )
        )
    return scores


def _same_object(detection: DetectedObject, required: RequiredObject) -> bool:
    return detection.colour == required.colour and detection.shape == required.shape


def _shares_a_trait(detection: DetectedObject, required: RequiredObject) -> bool:
    return detection.colour == required.colour or detection.shape == required.shape


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _maximum_matching(compatible: list[list[int]]) -> list[int | None]:
    """Maximum bipartite matching of slots to detections by augmenting paths (Kuhn's algorithm).

    compatible[i]: the detections slot i may take. Returns the detection of each slot, or None.
    """
    slot_of_detection: dict[int, int] = {}

    def augment(slot: int, visited: set[int]) -> bool:
        for d in compatible[slot]:
            if d in visited:
                continue
            visited.add(d)
            if d not in slot_of_detection or augment(slot_of_detection[d], visited):
                slot_of_detection[d] = slot
                return True
        return False

    for slot in range(len(compatible)):
        augment(slot, set())
    detection_of_slot: list[int | None] = [None] * len(compatible)
    for d, slot in slot_of_detection.items():
        detection_of_slot[slot] = d
    return detection_of_slot
