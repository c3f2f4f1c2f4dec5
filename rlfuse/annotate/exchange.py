"""Labels to and from files: the D3PO reference format and a pairs format.

D3PO (yk7333/d3po, scripts/train.py with scripts/utils.py) reads human feedback from a folder of
JSON files, one per annotator. Each file is a list with one entry per prompt, in sampling order, and
each entry holds K numbers, one per image of that prompt (K = 7 there): [[s_0, ..., s_K-1], ...].
The trainer averages the files entry by entry, then for every two images of a prompt the higher
score is preferred and equal scores give no preference.

Export writes one such file: group by group, each annotator's labels on the group summed as score
vectors (store.label_scores: 1 for the best / good / pair winner, 0 otherwise; imported scores as
they are), then averaged over the annotators who labelled the group; groups nobody labelled get all
zeros (no preference). With --annotator, one annotator's file, as the reference's folder expects.

The pairs format lists every pair every live label states (no cancelling; see
store.preference_pairs for how the trainer combines them):
    {"format": "rlfuse-pairs", "version": 1, "images_per_prompt": K,
     "pairs": [{"group": 0, "winner": "0000-2", "loser": "0000-0", "annotator": "ann",
                "task": "best", "label": 7, "time": "2025-01-01T12:00:00.000+00:00"}, ...]}
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from rlfuse.annotate.dataset import Dataset
from rlfuse.annotate.store import Conflict, Label, LabelStore, check_annotator, label_pairs, label_scores
from rlfuse.errors import UserError

PAIRS_FORMAT = "rlfuse-pairs"


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def export_d3po(dataset: Dataset, store: LabelStore, annotator: str | None = None) -> list[list[float]]:
    """One list of K scores per group, in manifest order (see the module docstring)."""
    k_images = dataset.images_per_prompt
    sums: dict[int, dict[str, list[float]]] = defaultdict(dict)  # group -> annotator -> summed scores
    for stored in store.labels(annotator=annotator):
        label = stored.label
        if label.skipped:
            continue
        total = sums[label.group].setdefault(label.annotator, [0.0] * k_images)
        for k, score in enumerate(label_scores(label, k_images)):
            total[k] += score
    scores = []
    for group in dataset.groups:
        per_annotator = list(sums[group.index].values())
        if not per_annotator:
            scores.append([0] * k_images)
            continue
        scores.append([_number(sum(s[k] for s in per_annotator) / len(per_annotator)) for k in range(k_images)])
    return scores


def export_pairs(dataset: Dataset, store: LabelStore, annotator: str | None = None) -> dict:
    pairs = []
    for stored in store.labels(annotator=annotator):
        label = stored.label
        ids = dataset.groups[label.group].image_ids
        for winner, loser in label_pairs(label, dataset.images_per_prompt):
            pairs.append({"group": label.group, "winner": ids[winner], "loser": ids[loser],
                          "annotator": label.annotator, "task": label.task, "label": stored.id,
                          "time": stored.created})
    return {"format": PAIRS_FORMAT, "version": 1, "images_per_prompt": dataset.images_per_prompt, "pairs": pairs}


def parse_d3po(text: str, dataset: Dataset, annotator: str, where: str) -> list[Label]:
    """A D3PO feedback file -> one `score` label per group whose scores are not all equal
    (all-equal entries state no preference, as in the reference trainer). UserError if malformed."""
    try:
        annotator = check_annotator(annotator)
    except ValueError as error:
        raise UserError(f"--annotator: {error}") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise UserError(f"{where}: not valid JSON ({error}); a D3PO file is a list of score lists") from None
    k_images, n_groups = dataset.images_per_prompt, len(dataset.groups)
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a list of {n_groups} score lists (one per prompt), "
                        f"got {type(data).__name__}")
    if len(data) != n_groups:
        raise UserError(f"{where}: {len(data)} entries, the dataset has {n_groups} prompts; give one list of "
                        f"{k_images} scores per prompt, in manifest order (equal scores for an unlabelled prompt)")
    labels = []
    for group, scores in enumerate(data):
        if not isinstance(scores, list) or len(scores) != k_images:
            raise UserError(f"{where}: entry {group} must be a list of {k_images} numbers "
                            f"(one per image of prompt {group}), got {json.dumps(scores)[:60]}")
        for k, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise UserError(f"{where}: entry {group}, score {k} must be a finite number, got {json.dumps(score)}")
        if len(set(scores)) > 1:
            labels.append(Label(annotator, "score", group, "", {"scores": scores}))
    return labels


def store_imported(store: LabelStore, labels: list[Label], where: str) -> tuple[int, int]:
    """Store parsed labels in one transaction: all or nothing. Returns (added, already present)."""
    try:
        return store.add_many(labels)
    except Conflict as error:
        raise UserError(f"{where}: {error} (nothing was imported); import under another --annotator") from None
