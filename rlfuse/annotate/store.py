"""The label store (<dataset>/labels.sqlite) and the preference pairs the trainer learns from.

A label is one annotator's answer about one item of one task:

    task     item              value (k = image position 0..K-1 in its group)
    best     the group         {"best": k}                      k beats each other image of the group
    pair     two images i < j  {"winner": k, "loser": k'}       one pair
    goodbad  the group         {"good": [k...], "bad": [k...]}  each good image beats each bad one
    score    the group         {"scores": [s_0, ..., s_K-1]}    (imported D3PO scores) higher beats lower
    any      as above          {"skip": true}                   no preference; the item counts as done

Labels are never deleted: undo marks a label undone. An annotator holds at most one live label per
(task, item) (a unique index says so), so a second, different answer is a Conflict until the first
is undone; the same answer again is accepted as a retry and changes nothing. SQLite runs in WAL mode
with synchronous=FULL: add() returns only after its transaction is committed to disk.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import unicodedata
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

from rlfuse.errors import UserError

SERVED_TASKS = ("best", "pair", "goodbad")  # what the web page asks; "score" only comes from import
TASKS = SERVED_TASKS + ("score",)
FILENAME = "labels.sqlite"
SCHEMA_VERSION = "1"
MAX_NAME = 64
# Characters that show nothing yet are letters or marks to Unicode (isprintable() lets them through):
# Hangul fillers, the braille blank, the combining grapheme joiner, variation selectors.
_INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800", "\u034f", *map(chr, range(0xFE00, 0xFE10)),
              *map(chr, range(0xE0100, 0xE01F0))}
_BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    annotator   TEXT NOT NULL,
    task        TEXT NOT NULL,
    group_index INTEGER NOT NULL,
    item        TEXT NOT NULL,   -- '' for a whole group, 'i-j' (i < j) for a pair
    value       TEXT NOT NULL,   -- canonical JSON, see the module docstring
    created     TEXT NOT NULL,   -- ISO 8601, UTC
    undone      TEXT             -- when undone (ISO 8601, UTC), NULL while live
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_label ON labels (annotator, task, group_index, item) WHERE undone IS NULL;
"""


class Conflict(Exception):
    """The annotator already gave a different answer for this item (HTTP 409)."""


@dataclass(frozen=True)
class Label:
    annotator: str
    task: str
    group: int
    item: str  # "" or "i-j"
    value: dict

    @property
    def skipped(self) -> bool:
        return bool(self.value.get("skip"))


@dataclass(frozen=True)
class StoredLabel:
    id: int
    created: str
    label: Label


def check_annotator(name: object) -> str:
    """An annotator's name in Unicode NFC, stripped: "José" typed precomposed or as e + combining
    accent is one annotator, whose votes count once. ValueError unless 1..64 printable characters,
    none of them invisible or a bidirectional control (a name that looks like another's)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("\"annotator\" must be a non-empty name")
    name = unicodedata.normalize("NFC", name.strip())
    hidden = next((c for c in name if c in _INVISIBLE or unicodedata.category(c) == "Cf"
                   or unicodedata.bidirectional(c) in _BIDI_CONTROLS), None)
    if hidden is not None:
        raise ValueError(f"\"annotator\" contains the invisible or text-direction character U+{ord(hidden):04X}; "
                         f"type the name with visible characters only")
    if len(name) > MAX_NAME or not name.isprintable():
        raise ValueError(f"\"annotator\" must be at most {MAX_NAME} printable characters")
    return name


def pair_item(i: int, j: int) -> str:
    """The item key of the pair {i, j}, whatever the order shown."""
    return f"{min(i, j)}-{max(i, j)}"


def task_items(task: str, num_groups: int, images_per_prompt: int) -> list[tuple[int, str]]:
    """Every (group, item) an annotator answers in a task, in the order the page shows them:
    a group per item, or for `pair` every pair of a group's images (K (K - 1) / 2 per group)."""
    if task == "pair":
        return [(g, pair_item(i, j)) for g in range(num_groups) for i, j in combinations(range(images_per_prompt), 2)]
    return [(g, "") for g in range(num_groups)]


def label_pairs(label: Label, images_per_prompt: int) -> list[tuple[int, int]]:
    """The (winner k, loser k) pairs one label states (see the module docstring)."""
    value = label.value
    if label.skipped:
        return []
    if label.task == "best":
        return [(value["best"], k) for k in range(images_per_prompt) if k != value["best"]]
    if label.task == "pair":
        return [(value["winner"], value["loser"])]
    if label.task == "goodbad":
        return [(good, bad) for good in value["good"] for bad in value["bad"]]
    if label.task == "score":
        scores = value["scores"]
        return [(a, b) for a in range(len(scores)) for b in range(len(scores)) if scores[a] > scores[b]]
    raise ValueError(f"unknown task {label.task!r}")


def label_scores(label: Label, images_per_prompt: int) -> list[float]:
    """One label as a D3PO score vector (K numbers, higher is better, ties carry no preference):
    best -> 1 for the best image, 0 elsewhere; pair -> 1 for the winner, 0 elsewhere;
    goodbad -> 1 good, 0 bad; score -> the scores; skip -> all 0."""
    scores = [0.0] * images_per_prompt
    if label.skipped:
        return scores
    if label.task == "score":
        return [float(s) for s in label.value["scores"]]
    if label.task == "best":
        winners = [label.value["best"]]
    elif label.task == "pair":
        winners = [label.value["winner"]]
    else:
        winners = label.value["good"]
    for k in winners:
        scores[k] = 1.0
    return scores


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class LabelStore:
    """<dataset>/labels.sqlite. One connection, serialised by a lock: safe to share between the
    threads of the server. Other processes may open the same file at the same time (SQLite locks)."""

    def __init__(self, path: Path, fingerprint: str, images_per_prompt: int, create: bool = True):
        self.path = Path(path)
        self.images_per_prompt = images_per_prompt
        if not create and not self.path.is_file():
            raise UserError(f"{self.path}: no labels yet; annotate first: python -m rlfuse.annotate {self.path.parent}")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if create:
                self._db.executescript(_SCHEMA)  # IF NOT EXISTS: safe when another process does it too
            with self._transaction():
                meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
                if not meta:
                    self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                        ("schema", SCHEMA_VERSION), ("fingerprint", fingerprint),
                        ("images_per_prompt", str(images_per_prompt))])
        except sqlite3.DatabaseError as error:
            raise UserError(f"{self.path}: not a readable label store ({error}); "
                            f"move it away to start afresh") from None
        if meta and meta.get("fingerprint") != fingerprint:
            raise UserError(f"{self.path}: these labels belong to other images (the manifest's images changed "
                            f"since they were made); move labels.sqlite away, or restore the dataset it was made for")
        if meta and meta.get("schema") != SCHEMA_VERSION:
            raise UserError(f"{self.path}: label store schema {meta.get('schema')!r}, this rlfuse reads "
                            f"{SCHEMA_VERSION}; upgrade rlfuse")

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")  # take the write lock at once: no lock upgrade (deadlock) later
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------------

    def add(self, label: Label) -> tuple[int, bool]:
        """Store a label, committed before returning. Returns (label id, True if new); the same
        live answer again returns its id and False; a different live answer raises Conflict."""
        with self._lock, self._transaction():
            return self._add(label, _now())

    def add_many(self, labels: list[Label]) -> tuple[int, int]:
        """Store labels in one transaction: all or none (Conflict rolls every one back).
        Returns (added, already present)."""
        added = 0
        with self._lock, self._transaction():
            created = _now()
            for label in labels:
                added += self._add(label, created)[1]
        return added, len(labels) - added

    def _add(self, label: Label, created: str) -> tuple[int, bool]:
        value = json.dumps(label.value, sort_keys=True, separators=(",", ":"))
        row = self._db.execute(
            "SELECT id, value FROM labels WHERE annotator = ? AND task = ? AND group_index = ? AND item = ? "
            "AND undone IS NULL", (label.annotator, label.task, label.group, label.item)).fetchone()
        if row is not None:
            if row[1] == value:
                return row[0], False
            what = f"group {label.group}" + (f", pair {label.item}" if label.item else "")
            raise Conflict(f"{label.annotator} already labelled {what} in task {label.task} differently "
                           f"(label {row[0]}); undo it first")
        cursor = self._db.execute(
            "INSERT INTO labels (annotator, task, group_index, item, value, created) VALUES (?, ?, ?, ?, ?, ?)",
            (label.annotator, label.task, label.group, label.item, value, created))
        return cursor.lastrowid, True

    def undo(self, annotator: str, task: str) -> StoredLabel | None:
        """Mark the annotator's most recent live label of the task undone; returns it, or None."""
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT id, annotator, task, group_index, item, value, created FROM labels "
                "WHERE annotator = ? AND task = ? AND undone IS NULL ORDER BY id DESC LIMIT 1",
                (annotator, task)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE labels SET undone = ? WHERE id = ?", (_now(), row[0]))
        return _stored(row)

    # -- reading ---------------------------------------------------------------------------------

    def labels(self, task: str | None = None, annotator: str | None = None) -> list[StoredLabel]:
        """Live labels (not undone), oldest first, optionally of one task and one annotator."""
        query = "SELECT id, annotator, task, group_index, item, value, created FROM labels WHERE undone IS NULL"
        args: list = []
        if task is not None:
            query, args = query + " AND task = ?", args + [task]
        if annotator is not None:
            query, args = query + " AND annotator = ?", args + [annotator]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [_stored(row) for row in rows]

    def done_items(self, annotator: str, task: str) -> set[tuple[int, str]]:
        """The (group, item) pairs the annotator has a live label for (skips included)."""
        with self._lock:
            rows = self._db.execute("SELECT group_index, item FROM labels WHERE annotator = ? AND task = ? "
                                    "AND undone IS NULL", (annotator, task)).fetchall()
        return set(rows)

    def progress(self, task: str) -> dict[str, int]:
        """Annotator -> number of live labels in the task."""
        with self._lock:
            rows = self._db.execute("SELECT annotator, COUNT(*) FROM labels WHERE task = ? AND undone IS NULL "
                                    "GROUP BY annotator ORDER BY annotator", (task,)).fetchall()
        return dict(rows)


def _stored(row: tuple) -> StoredLabel:
    id_, annotator, task, group, item, value, created = row
    return StoredLabel(id=id_, created=created, label=Label(annotator, task, group, item, json.loads(value)))


def open_store(dataset, create: bool = True) -> LabelStore:
    """The label store of a loaded Dataset (rlfuse/annotate/dataset.py)."""
    return LabelStore(dataset.root / FILENAME, dataset.fingerprint, dataset.images_per_prompt, create=create)


def preference_pairs(dataset: Path) -> list[tuple[int, int, int]]:
    """Every preference the stored labels state, as (group index, winner k, loser k), sorted.

    Each live label (all tasks, all annotators; undone labels and skips give none) votes for pairs:
    best-of-K -> the best image beats each of the K - 1 others; pair -> its one pair; good/bad ->
    each good image beats each bad one (none if all good or all bad); imported D3PO scores ->
    the higher score beats the lower, ties give none.

    Votes combine by majority with multiplicity: for two images a, b of a group, with n votes for
    a > b and m for b > a, the result holds (g, a, b) n - m times if n > m, (g, b, a) m - n times if
    m > n, and nothing if n == m. So opposite votes cancel one for one, and a preference several
    annotators agree on weighs more. Raises UserError if the dataset has no manifest or no labels.
    """
    from rlfuse.annotate.dataset import load_dataset

    data = load_dataset(dataset, check_images=False)
    store = open_store(data, create=False)
    try:
        votes: Counter[tuple[int, int, int]] = Counter()
        for stored in store.labels():
            for winner, loser in label_pairs(stored.label, data.images_per_prompt):
                votes[(stored.label.group, winner, loser)] += 1
    finally:
        store.close()
    pairs = []
    for (group, winner, loser), count in votes.items():
        net = count - votes.get((group, loser, winner), 0)
        pairs += [(group, winner, loser)] * max(net, 0)
    return sorted(pairs)
