"""The fine-tuned model's win rate over its base model, from people's labels of a comparison dataset.

`python -m rlfuse.evaluate <run> --human-pairs <folder>` writes the dataset: each group is one prompt
and seed, with the base and the fine-tuned image from the same noise in a seeded random order, and
comparison.json records which position (0 or 1) is the fine-tuned one. Each label (any task: pair,
best, good/bad) is one judgment of one group: a win for the fine-tuned image, a loss, or a tie (a
skip, both good or both bad).

    win rate   = wins / (wins + losses), ties left out; every annotator's judgments pooled
    interval   the Wilson score interval at 95 % (E. B. Wilson, "Probable inference, the law of
               succession, and statistical inference", JASA 22 (1927) 209-212): for n judgments with
               share p and z = 1.96, (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n); unlike
               p +- z sqrt(p(1-p)/n), it stays inside [0, 1] and does not collapse at p = 0 or 1
    agreement  for each two annotators, the share of the groups both judged on which they gave the
               same outcome (win, loss or tie), and Cohen's kappa (J. Cohen, "A coefficient of agreement
               for nominal scales", Educ. Psychol. Meas. 20 (1960) 37-46): (p_o - p_e) / (1 - p_e)
               with p_e from each annotator's own outcome shares; overall, the pooled share.

Judgments of one group by several people are not independent, so with many annotators per group the
interval is narrower than it should be; it is exact for one judgment per group.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

from rlfuse.annotate.dataset import load_dataset
from rlfuse.annotate.store import FILENAME, Label, open_store
from rlfuse.errors import UserError

COMPARISON = "comparison.json"
COMPARISON_FORMAT = "rlfuse-comparison"
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile
WIN, LOSS, TIE = "win", "loss", "tie"


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) Wilson score interval of a binomial share; (0, 1) with no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def outcome(label: Label, finetuned: int) -> str:
    """The fine-tuned image's outcome in one label of a two-image group."""
    value, base = label.value, 1 - finetuned
    if label.skipped:
        return TIE
    if label.task == "pair":
        return WIN if value["winner"] == finetuned else LOSS
    if label.task == "best":
        return WIN if value["best"] == finetuned else LOSS
    if label.task == "goodbad":
        good = set(value["good"])
        return TIE if (finetuned in good) == (base in good) else (WIN if finetuned in good else LOSS)
    scores = value["scores"]
    return TIE if scores[finetuned] == scores[base] else (WIN if scores[finetuned] > scores[base] else LOSS)


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two annotators' outcomes on the same items; None where it is undefined (p_e = 1)."""
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    expected = sum((first.count(c) / n) * (second.count(c) / n) for c in (WIN, LOSS, TIE))
    return None if expected == 1 else (observed - expected) / (1 - expected)


def read_comparison(folder: Path) -> list[int]:
    """The fine-tuned image's position in each group, from comparison.json (UserError if absent or wrong)."""
    path = folder / COMPARISON
    fix = f"write the dataset with `python -m rlfuse.evaluate <run> --human-pairs {folder}`"
    if not path.is_file():
        raise UserError(f"{folder}: no {COMPARISON}, so not a base-against-fine-tuned dataset; {fix}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        positions = record["finetuned"]
        assert record.get("format") == COMPARISON_FORMAT and all(p in (0, 1) for p in positions)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{path}: not a comparison record (\"format\": \"{COMPARISON_FORMAT}\", \"finetuned\": a 0 or "
                        f"1 per group); {fix}") from None
    return positions


def win_rate(folder: Path) -> dict:
    """The win rate, its interval, the ties and the agreement between annotators (module docstring)."""
    dataset = load_dataset(folder, check_images=False)
    finetuned = read_comparison(folder)
    if dataset.images_per_prompt != 2 or len(finetuned) != len(dataset.groups):
        raise UserError(f"{folder}: {len(dataset.groups)} groups of {dataset.images_per_prompt} images but "
                        f"{COMPARISON} records {len(finetuned)} pairs; write the dataset again with rlfuse.evaluate "
                        f"--human-pairs")
    if not (folder / FILENAME).is_file():
        raise UserError(f"{folder}: no labels yet; label it with `python -m rlfuse.annotate {folder} --task pair`")
    store = open_store(dataset, create=False)
    try:
        labels = [stored.label for stored in store.labels()]
    finally:
        store.close()
    by_annotator: dict[str, dict[int, str]] = {}
    for label in labels:
        by_annotator.setdefault(label.annotator, {})[label.group] = outcome(label, finetuned[label.group])
    outcomes = [o for votes in by_annotator.values() for o in votes.values()]
    wins, losses, ties = outcomes.count(WIN), outcomes.count(LOSS), outcomes.count(TIE)
    low, high = wilson_interval(wins, wins + losses)
    agreement, agreeing, compared = [], 0, 0
    for a, b in combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[a]) & set(by_annotator[b]))
        if not shared:
            continue
        first, second = [by_annotator[a][g] for g in shared], [by_annotator[b][g] for g in shared]
        same = sum(x == y for x, y in zip(first, second))
        agreeing, compared = agreeing + same, compared + len(shared)
        agreement.append({"annotators": [a, b], "groups": len(shared), "agreement": same / len(shared),
                          "cohen_kappa": cohen_kappa(first, second)})
    return {"dataset": str(folder), "pairs": len(finetuned), "judgments": len(outcomes), "wins": wins,
            "losses": losses, "ties": ties, "win_rate": wins / (wins + losses) if wins + losses else None,
            "interval_95": [low, high], "interval_method": "Wilson score",
            "annotators": {name: len(votes) for name, votes in sorted(by_annotator.items())},
            "agreement": agreeing / compared if compared else None, "pairwise_agreement": agreement}


def render(result: dict) -> str:
    """The result as a few lines of text."""
    rate = result["win_rate"]
    low, high = result["interval_95"]
    lines = [f"{result['dataset']}: {result['judgments']} judgments of {result['pairs']} pairs by "
             f"{len(result['annotators'])} annotator(s)",
             f"fine-tuned wins {result['wins']}, base wins {result['losses']}, ties {result['ties']}",
             "win rate " + ("n/a (no decided judgment)" if rate is None else
                            f"{rate:.3f} (95 % Wilson interval {low:.3f} to {high:.3f}; ties left out)")]
    if result["agreement"] is None:
        lines.append("agreement: n/a (no group judged by two annotators)")
    else:
        lines.append(f"agreement between annotators: {result['agreement']:.3f} of shared judgments")
        for pair in result["pairwise_agreement"]:
            kappa = pair["cohen_kappa"]
            lines.append(f"  {pair['annotators'][0]} / {pair['annotators'][1]}: {pair['agreement']:.3f} on "
                         f"{pair['groups']} pairs, Cohen's kappa " + ("n/a" if kappa is None else f"{kappa:.3f}"))
    return "\n".join(lines)
