"""python -m rlfuse.annotate: start-up checks of the dataset, export and import (one line, exit 2)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlfuse.annotate.__main__ import main
from rlfuse.annotate.dataset import load_dataset
from rlfuse.annotate.store import Label, open_store, preference_pairs
from rlfuse.errors import UserError

from annotate_helpers import write_dataset


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlfuse.annotate", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(capsys, *argv: str) -> str:
    """Run main() in-process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rlfuse: error: ") and err.count("\n") == 1, err
    return err


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


# -- start-up checks -------------------------------------------------------------------------------

BROKEN = {
    "not json": (lambda folder: (folder / "manifest.json").write_text("{oops"), "not valid JSON"),
    "wrong format": (lambda f: edit_manifest(f, lambda m: m.update(format="other")), "not an rlfuse feedback manifest"),
    "future version": (lambda f: edit_manifest(f, lambda m: m.update(version=2)), "version 2"),
    "K not an int": (lambda f: edit_manifest(f, lambda m: m.update(images_per_prompt="4")), "images_per_prompt"),
    "no groups": (lambda f: edit_manifest(f, lambda m: m.update(groups=[])), "non-empty list"),
    "group index": (lambda f: edit_manifest(f, lambda m: m["groups"][1].update(index=5)), "groups[1] has index 5"),
    "too few images": (lambda f: edit_manifest(f, lambda m: m["groups"][0]["images"].pop()), "has 3 images"),
    "wrong id": (lambda f: edit_manifest(f, lambda m: m["groups"][0]["images"][1].update(id="0000-7")), "expected '0000-1'"),
    "file escapes": (lambda f: edit_manifest(f, lambda m: m["groups"][0]["images"][0].update(file="../x.png")), "no '..'"),
    "absolute file": (lambda f: edit_manifest(f, lambda m: m["groups"][0]["images"][0].update(file="/etc/passwd")),
                      "no absolute path"),
    "bad sha256": (lambda f: edit_manifest(f, lambda m: m["groups"][0]["images"][0].update(sha256="xyz")), "64 lowercase hex"),
    "missing image": (lambda folder: (folder / "images" / "0002-3.png").unlink(), "image 0002-3 is missing"),
    "changed image": (lambda folder: (folder / "images" / "0001-0.png").write_bytes(b"not the sampled png"),
                      "image 0001-0 has sha256"),
    "no manifest": (lambda folder: (folder / "manifest.json").unlink(), "manifest.json: missing"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_dataset_stops_at_start_up_with_one_line(case, dataset_dir, capsys):
    breaks, message = BROKEN[case]
    breaks(dataset_dir)
    assert message in one_line_error(capsys, str(dataset_dir))
    assert not (dataset_dir / "labels.sqlite").exists()  # nothing created, no server started


def test_a_broken_dataset_exits_2_as_a_process(dataset_dir):
    (dataset_dir / "images" / "0000-1.png").unlink()
    result = run_cli(str(dataset_dir), "--port", "0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "0000-1 is missing" in result.stderr


def test_a_busy_port_is_one_line(dataset_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"--port {port}: cannot listen" in one_line_error(capsys, str(dataset_dir), "--port", str(port))


def test_unknown_task_is_refused(dataset_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(dataset_dir), "--task", "rank"])
    assert exit_info.value.code == 2 and "invalid choice: 'rank'" in capsys.readouterr().err


# -- export and import -----------------------------------------------------------------------------

@pytest.fixture
def labelled(dataset_dir):
    """ann: best-of-4 on groups 0 and 1 (skips 2); bob: good/bad on group 0; cat: two pairs on group 2."""
    store = open_store(load_dataset(dataset_dir))
    store.add(Label("ann", "best", 0, "", {"best": 2}))
    store.add(Label("ann", "best", 1, "", {"best": 0}))
    store.add(Label("ann", "best", 2, "", {"skip": True}))
    store.add(Label("bob", "goodbad", 0, "", {"good": [0, 2], "bad": [1, 3]}))
    store.add(Label("cat", "pair", 2, "0-1", {"winner": 1, "loser": 0}))
    store.add(Label("cat", "pair", 2, "1-3", {"winner": 1, "loser": 3}))
    store.close()
    return dataset_dir


def test_d3po_export_is_a_score_list_per_prompt(labelled, tmp_path, capsys):
    out = tmp_path / "d3po.json"
    main(["export", str(labelled), "--format", "d3po", "-o", str(out)])
    assert "3 prompts" in capsys.readouterr().out
    # group 0: mean of ann [0,0,1,0] and bob [1,0,1,0]; group 1: ann; group 2: cat's two pair wins (ann skipped).
    assert json.loads(out.read_text()) == [[0.5, 0, 1, 0], [1, 0, 0, 0], [0, 2, 0, 0]]
    main(["export", str(labelled), "--format", "d3po", "-o", str(out), "--annotator", "ann"])
    assert json.loads(out.read_text()) == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_pairs_export_lists_every_vote_with_annotator_and_time(labelled, tmp_path):
    out = tmp_path / "pairs.json"
    main(["export", str(labelled), "--format", "pairs", "-o", str(out)])
    data = json.loads(out.read_text())
    assert data["format"] == "rlfuse-pairs" and data["images_per_prompt"] == 4
    pairs = data["pairs"]
    assert len(pairs) == 3 + 3 + 4 + 2
    assert pairs[0]["group"] == 0 and pairs[0]["winner"] == "0000-2" and pairs[0]["loser"] == "0000-0"
    assert pairs[0]["annotator"] == "ann" and pairs[0]["task"] == "best" and pairs[0]["time"].endswith("+00:00")
    assert {(p["winner"], p["loser"]) for p in pairs if p["annotator"] == "cat"} == {("0002-1", "0002-0"), ("0002-1", "0002-3")}


def test_d3po_round_trip_keeps_scores_and_pairs(labelled, tmp_path, capsys):
    exported = tmp_path / "ann.json"
    main(["export", str(labelled), "--format", "d3po", "-o", str(exported), "--annotator", "ann"])
    fresh = write_dataset(tmp_path / "fresh")  # same images (same fixture), no labels
    main(["import", str(fresh), str(exported)])
    assert "imported 2 labels" in capsys.readouterr().out  # group 2 (all equal) states nothing
    again = tmp_path / "again.json"
    main(["export", str(fresh), "--format", "d3po", "-o", str(again)])
    assert json.loads(again.read_text()) == json.loads(exported.read_text())
    # Imported as annotator "ann" (the file name); best-of-K scores give back the same pairs.
    store = open_store(load_dataset(fresh))
    assert {s.label.annotator for s in store.labels()} == {"ann"}
    store.close()
    ann_only = [p for p in preference_pairs(labelled) if p[0] == 1 or p in [(0, 2, 0), (0, 2, 1), (0, 2, 3)]]
    assert preference_pairs(fresh) == sorted(set(ann_only))
    # Importing the same file again adds nothing.
    main(["import", str(fresh), str(exported)])
    assert "imported 0 labels" in capsys.readouterr().out


MALFORMED = {
    "not json": ("[[1, 0, 0", "not valid JSON"),
    "not a list": ('{"scores": []}', "expected a list of 3 score lists"),
    "too few prompts": ("[[1, 0, 0, 0], [0, 1, 0, 0]]", "2 entries, the dataset has 3 prompts"),
    "too few scores": ("[[1, 0, 0, 0], [0, 1, 0], [0, 0, 0, 0]]", "entry 1 must be a list of 4 numbers"),
    "a string score": ('[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, "1", 0]]', "entry 2, score 2 must be a finite number"),
    "a bool score": ("[[1, 0, 0, true], [0, 1, 0, 0], [0, 0, 1, 0]]", "entry 0, score 3"),
    "not finite": ("[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, NaN, 0]]", "finite number"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_d3po_file_stores_nothing(case, dataset_dir, tmp_path, capsys):
    text, message = MALFORMED[case]
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert message in one_line_error(capsys, "import", str(dataset_dir), str(bad))
    assert not (dataset_dir / "labels.sqlite").exists()


def test_an_import_that_conflicts_is_rolled_back_whole(dataset_dir, tmp_path, capsys):
    store = open_store(load_dataset(dataset_dir))
    store.add(Label("ann", "score", 2, "", {"scores": [0, 0, 0, 1]}))
    store.close()
    feedback = tmp_path / "feedback.json"
    feedback.write_text("[[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]")  # groups 0 and 1 are new, 2 conflicts
    assert "nothing was imported" in one_line_error(capsys, "import", str(dataset_dir), str(feedback), "--annotator", "ann")
    assert preference_pairs(dataset_dir) == [(2, 3, 0), (2, 3, 1), (2, 3, 2)]
    main(["import", str(dataset_dir), str(feedback), "--annotator", "bob"])  # another name: no conflict
    assert len(preference_pairs(dataset_dir)) == 3 + 9 - 2  # ann 3 > 0 and bob 0 > 3 on group 2 cancel


def test_export_and_import_errors_are_one_line(dataset_dir, tmp_path, capsys):
    assert "annotate first" in one_line_error(capsys, "export", str(dataset_dir), "--format", "d3po",
                                              "-o", str(tmp_path / "x.json"))
    assert "cannot read" in one_line_error(capsys, "import", str(dataset_dir), str(tmp_path / "absent.json"))
    good = tmp_path / "good.json"
    good.write_text("[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]")
    assert "--annotator" in one_line_error(capsys, "import", str(dataset_dir), str(good), "--annotator", " ")
    main(["import", str(dataset_dir), str(good)])
    assert "no labels from them; annotators: good" in one_line_error(
        capsys, "export", str(dataset_dir), "--format", "d3po", "-o", str(tmp_path / "x.json"), "--annotator", "zed")
    assert "does not exist" in one_line_error(capsys, "export", str(dataset_dir), "--format", "pairs",
                                              "-o", str(tmp_path / "no" / "x.json"))


def test_load_dataset_lists_images(dataset_dir):
    dataset = load_dataset(dataset_dir)
    assert dataset.images_per_prompt == 4 and len(dataset.groups) == 3
    assert dataset.images["0002-3"] == (2, 3)
    assert dataset.groups[1].prompt == "two blue squares"
    with pytest.raises(UserError, match="no such folder"):
        load_dataset(dataset_dir / "nope")
