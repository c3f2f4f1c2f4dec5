"""Win rate of a fine-tuned model over its base from people's labels: the statistics by hand, every
kind of label as an outcome, agreement between annotators, and the command line."""

import json
import math

import pytest
from annotate_helpers import write_dataset

from rlfuse.annotate.__main__ import main
from rlfuse.annotate.dataset import load_dataset
from rlfuse.annotate.store import Label, open_store, pair_item
from rlfuse.annotate.winrate import COMPARISON, LOSS, TIE, WIN, cohen_kappa, outcome, wilson_interval, win_rate

PROMPTS = [f"prompt {g}" for g in range(6)]
FINETUNED = [1, 0, 0, 1, 1, 0]   # the fine-tuned image's position in each group


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width 1.96 sqrt(0.016 + 0.0009604) / 1.38416
    low, high = wilson_interval(8, 10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)   # the published table value for 8/10
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("task, value, finetuned, expected", [
    ("pair", {"winner": 1, "loser": 0}, 1, WIN),
    ("pair", {"winner": 1, "loser": 0}, 0, LOSS),
    ("pair", {"skip": True}, 0, TIE),
    ("best", {"best": 0}, 0, WIN),
    ("goodbad", {"good": [0, 1], "bad": []}, 1, TIE),
    ("goodbad", {"good": [0], "bad": [1]}, 1, LOSS),
    ("score", {"scores": [0.2, 0.7]}, 1, WIN),
    ("score", {"scores": [0.5, 0.5]}, 1, TIE),
])
def test_every_kind_of_label_is_a_win_a_loss_or_a_tie(task, value, finetuned, expected):
    assert outcome(Label("a", task, 0, "0-1" if task == "pair" else "", value), finetuned) == expected


def test_cohen_kappa_by_hand():
    first = [WIN, WIN, LOSS, TIE]
    second = [WIN, LOSS, LOSS, TIE]
    # p_o = 3/4; p_e = (2/4)(1/4) + (1/4)(2/4) + (1/4)(1/4) = 5/16; kappa = (3/4 - 5/16) / (11/16) = 7/11
    assert cohen_kappa(first, second) == pytest.approx(7 / 11)
    assert cohen_kappa([WIN, WIN], [WIN, WIN]) is None


def comparison_dataset(tmp_path):
    root = write_dataset(tmp_path / "pairs", prompts=PROMPTS, k_images=2)
    (root / COMPARISON).write_text(json.dumps({"format": "rlfuse-comparison", "version": 1, "finetuned": FINETUNED}))
    return root


def vote(store, annotator, group, winner):
    value = {"skip": True} if winner is None else {"winner": winner, "loser": 1 - winner}
    store.add(Label(annotator, "pair", group, pair_item(0, 1), value))


def test_win_rate_ties_and_agreement_on_a_labelled_dataset(tmp_path, capsys):
    root = comparison_dataset(tmp_path)
    store = open_store(load_dataset(root))
    # ann: the fine-tuned image wins groups 0-3, loses 4, skips 5; bob: groups 0-3 the same but 3 lost.
    for g in range(4):
        vote(store, "ann", g, FINETUNED[g])
    vote(store, "ann", 4, 1 - FINETUNED[4])
    vote(store, "ann", 5, None)
    for g in range(3):
        vote(store, "bob", g, FINETUNED[g])
    vote(store, "bob", 3, 1 - FINETUNED[3])
    store.close()
    result = win_rate(root)
    assert (result["wins"], result["losses"], result["ties"], result["judgments"]) == (7, 2, 1, 10)
    assert result["win_rate"] == pytest.approx(7 / 9)
    assert result["interval_95"] == pytest.approx(list(wilson_interval(7, 9)))
    assert result["annotators"] == {"ann": 6, "bob": 4}
    # Shared groups 0-3: they agree on 0, 1, 2 (wins) and not on 3: 3 of 4.
    assert result["agreement"] == pytest.approx(0.75)
    pair = result["pairwise_agreement"][0]
    assert pair["annotators"] == ["ann", "bob"] and pair["groups"] == 4
    assert pair["cohen_kappa"] == pytest.approx(cohen_kappa([WIN] * 4, [WIN, WIN, WIN, LOSS]))

    main(["winrate", str(root), "--json"])
    assert json.loads(capsys.readouterr().out)["win_rate"] == pytest.approx(7 / 9)
    main(["winrate", str(root)])
    text = capsys.readouterr().out
    assert "win rate 0.778 (95 % Wilson interval" in text and "ties 1" in text and "Cohen's kappa 0.000" in text


@pytest.mark.parametrize("change, expected", [
    (lambda root: (root / COMPARISON).unlink(), "no comparison.json, so not a base-against-fine-tuned dataset"),
    (lambda root: (root / COMPARISON).write_text("{\"finetuned\": [3]}"), "not a comparison record"),
    (lambda root: None, "no labels yet"),
])
def test_bad_comparison_datasets_are_one_line_and_exit_2(tmp_path, capsys, change, expected):
    root = comparison_dataset(tmp_path)
    change(root)
    with pytest.raises(SystemExit) as stop:
        main(["winrate", str(root)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
