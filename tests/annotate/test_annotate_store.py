"""The label store and the preference pairs the trainer reads (rlfuse/annotate/store.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from rlfuse.annotate.dataset import load_dataset
from rlfuse.annotate.store import Conflict, Label, label_pairs, label_scores, open_store, preference_pairs, task_items
from rlfuse.errors import UserError


@pytest.fixture
def store(dataset_dir):
    store = open_store(load_dataset(dataset_dir))
    yield store
    store.close()


def best(annotator: str, group: int, k: int) -> Label:
    return Label(annotator, "best", group, "", {"best": k})


def test_each_task_states_its_pairs():
    assert label_pairs(best("a", 0, 2), 4) == [(2, 0), (2, 1), (2, 3)]
    assert label_pairs(Label("a", "pair", 0, "1-3", {"winner": 3, "loser": 1}), 4) == [(3, 1)]
    goodbad = Label("a", "goodbad", 0, "", {"good": [0, 2], "bad": [1, 3]})
    assert sorted(label_pairs(goodbad, 4)) == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert label_pairs(Label("a", "goodbad", 0, "", {"good": [0, 1, 2, 3], "bad": []}), 4) == []
    scores = Label("a", "score", 0, "", {"scores": [0.5, 2, 0.5, 1]})
    assert sorted(label_pairs(scores, 4)) == [(1, 0), (1, 2), (1, 3), (3, 0), (3, 2)]  # ties: none
    assert label_pairs(Label("a", "best", 0, "", {"skip": True}), 4) == []


def test_labels_as_d3po_scores():
    assert label_scores(best("a", 0, 2), 4) == [0, 0, 1, 0]
    assert label_scores(Label("a", "goodbad", 0, "", {"good": [0, 2], "bad": [1, 3]}), 4) == [1, 0, 1, 0]
    assert label_scores(Label("a", "pair", 0, "1-3", {"winner": 3, "loser": 1}), 4) == [0, 0, 0, 1]
    assert label_scores(Label("a", "score", 0, "", {"scores": [3, 1, 2, 0]}), 4) == [3, 1, 2, 0]
    assert label_scores(Label("a", "pair", 0, "1-3", {"skip": True}), 4) == [0, 0, 0, 0]


def test_pair_task_asks_every_pair_of_every_group():
    items = task_items("pair", 2, 3)
    assert items == [(0, "0-1"), (0, "0-2"), (0, "1-2"), (1, "0-1"), (1, "0-2"), (1, "1-2")]
    assert task_items("best", 2, 3) == [(0, ""), (1, "")]


def test_add_commits_and_a_retry_of_the_same_answer_changes_nothing(store, dataset_dir):
    label_id, new = store.add(best("ann", 0, 1))
    assert new
    assert store.add(best("ann", 0, 1)) == (label_id, False)
    # Committed: another connection sees it at once.
    rows = sqlite3.connect(dataset_dir / "labels.sqlite").execute("SELECT annotator, task, group_index, value, created "
                                                                 "FROM labels").fetchall()
    assert len(rows) == 1 and rows[0][:3] == ("ann", "best", 0) and json.loads(rows[0][3]) == {"best": 1}
    assert rows[0][4].endswith("+00:00")  # UTC time stamp


def test_database_is_in_wal_mode_with_full_sync(store, dataset_dir):
    db = sqlite3.connect(dataset_dir / "labels.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_different_answer_conflicts_until_undone(store):
    store.add(best("ann", 0, 1))
    with pytest.raises(Conflict, match="undo it first"):
        store.add(best("ann", 0, 2))
    store.add(best("bob", 0, 2))  # another annotator may disagree
    assert store.add(best("ann", 1, 3))[1]
    undone = store.undo("ann", "best")
    assert undone.label == best("ann", 1, 3)  # the most recent one
    assert store.undo("ann", "best").label == best("ann", 0, 1)
    assert store.undo("ann", "best") is None
    assert store.add(best("ann", 0, 2))[1]  # answered again after undo
    assert store.progress("best") == {"ann": 1, "bob": 1}


def test_undo_only_touches_that_annotators_labels_of_that_task(store):
    store.add(best("ann", 0, 1))
    store.add(best("bob", 1, 1))
    store.add(Label("ann", "pair", 2, "0-1", {"winner": 0, "loser": 1}))
    assert store.undo("ann", "best").label.group == 0
    assert store.undo("ann", "best") is None
    assert [s.label.annotator for s in store.labels()] == ["bob", "ann"]


def test_add_many_stores_all_or_nothing(store):
    store.add(Label("ann", "score", 1, "", {"scores": [1, 0, 0, 0]}))
    batch = [Label("ann", "score", 0, "", {"scores": [0, 1, 0, 0]}), Label("ann", "score", 1, "", {"scores": [0, 0, 0, 1]})]
    with pytest.raises(Conflict):
        store.add_many(batch)
    assert len(store.labels()) == 1  # group 0 was rolled back
    assert store.add_many([batch[0], Label("ann", "score", 1, "", {"scores": [1, 0, 0, 0]})]) == (1, 1)


def test_preference_pairs_from_each_task(dataset_dir, store):
    store.add(best("ann", 0, 2))
    store.add(Label("ann", "pair", 1, "0-3", {"winner": 3, "loser": 0}))
    store.add(Label("ann", "goodbad", 2, "", {"good": [1], "bad": [0, 2, 3]}))
    store.add(Label("ann", "best", 1, "", {"skip": True}))
    store.add(best("bob", 1, 0))
    store.undo("bob", "best")  # undone labels count for nothing
    assert preference_pairs(dataset_dir) == [(0, 2, 0), (0, 2, 1), (0, 2, 3), (1, 3, 0), (2, 1, 0), (2, 1, 2), (2, 1, 3)]


def test_annotators_votes_add_up_and_opposite_votes_cancel(dataset_dir, store):
    # Three annotators on group 0: ann and bob pick image 1, cat picks image 2.
    store.add(best("ann", 0, 1))
    store.add(best("bob", 0, 1))
    store.add(best("cat", 0, 2))
    pairs = preference_pairs(dataset_dir)
    # 1 > 0 and 1 > 3: two votes each; 1 > 2 (two votes) against 2 > 1 (one): once; 2 > 0, 2 > 3: once.
    assert pairs == [(0, 1, 0), (0, 1, 0), (0, 1, 2), (0, 1, 3), (0, 1, 3), (0, 2, 0), (0, 2, 3)]
    # A fourth annotator, dan, prefers 2 over 1 on a pair: the 1-vs-2 votes are now even and vanish.
    store.add(Label("dan", "pair", 0, "1-2", {"winner": 2, "loser": 1}))
    assert (0, 1, 2) not in preference_pairs(dataset_dir) and (0, 2, 1) not in preference_pairs(dataset_dir)


def test_preference_pairs_needs_labels(dataset_dir, tmp_path):
    with pytest.raises(UserError, match="annotate first"):
        preference_pairs(dataset_dir)
    with pytest.raises(UserError, match="manifest.json: missing"):
        preference_pairs(tmp_path)
    open_store(load_dataset(dataset_dir)).close()
    assert preference_pairs(dataset_dir) == []


def test_labels_of_other_images_are_refused(dataset_dir, store):
    store.add(best("ann", 0, 1))
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    manifest["groups"][0]["images"][0]["sha256"] = "0" * 64  # as if the dataset was sampled again
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="belong to other images"):
        open_store(load_dataset(dataset_dir, check_images=False))


def test_no_torch_import_in_the_annotate_package():
    code = ("import sys, rlfuse.annotate.__main__, rlfuse.annotate.server, rlfuse.annotate.store, "
            "rlfuse.annotate.exchange; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
