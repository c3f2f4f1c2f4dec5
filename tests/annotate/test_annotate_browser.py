"""End to end: headless Chromium (Playwright) annotates by clicking and by keyboard, in each task,
and the labels land in labels.sqlite. Each test fails (never skips) with one line saying what to install
when Chromium is missing: `make test` installs it with apt-get where it can (`make browser`); otherwise
`sudo apt-get install chromium` (Debian/Ubuntu), or set RLFUSE_CHROMIUM to a Chromium binary.

RLFUSE_UPDATE_SCREENSHOT=1 also writes docs/annotate.png.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from annotate_helpers import write_dataset

DOCS = Path(__file__).resolve().parents[2] / "docs"


MISSING = ("rlfuse: the browser tests need Chromium: run 'sudo apt-get install chromium' (Debian/Ubuntu) "
           "or set RLFUSE_CHROMIUM=/path/to/chromium")


def chromium_path() -> tuple[str | None, str]:
    """(RLFUSE_CHROMIUM, else `chromium` on PATH, else /usr/bin/chromium; None if it is not an executable file,
    the one-line reason)."""
    given = os.environ.get("RLFUSE_CHROMIUM")
    path = given or shutil.which("chromium") or "/usr/bin/chromium"
    if Path(path).is_file() and os.access(path, os.X_OK):
        return path, ""
    if given:
        return None, (f"rlfuse: RLFUSE_CHROMIUM={given} is not an executable file: point it at a Chromium binary, "
                      "or unset it and run 'sudo apt-get install chromium' (Debian/Ubuntu)")
    return None, MISSING


@pytest.fixture(scope="module")
def browser():
    """The browser, or the one-line reason there is none: open_page fails each test with it (a failure, not a
    skip, and not a setup error with Playwright's traceback)."""
    path, missing = chromium_path()
    if path is None:
        yield missing
        return
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(client, name=None) -> a page of a fresh browser profile; with a name, signed in."""
    contexts = []

    def open_(client, name: str | None = None, viewport=(1000, 620)):
        if isinstance(browser, str):
            pytest.fail(browser, pytrace=False)
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        errors = []
        page.on("pageerror", lambda error: errors.append(error))
        page.errors = errors
        page.goto(f"http://{client.host}:{client.port}/")
        if name is not None:
            expect(page.locator("#name")).to_be_visible()
            page.fill("#name", name)
            page.click("#start")
        return page

    yield open_
    for context in contexts:
        context.close()


def wait_for_group(page, group: int) -> None:
    expect(page.locator(f'#item[data-group="{group}"][data-busy="false"]')).to_be_visible()


def labels(folder: Path) -> list[tuple]:
    db = sqlite3.connect(folder / "labels.sqlite")
    try:
        return db.execute("SELECT annotator, task, group_index, item, value FROM labels WHERE undone IS NULL "
                          "ORDER BY id").fetchall()
    finally:
        db.close()


def test_best_of_k_by_click_and_keyboard_with_skip_undo_and_two_annotators(dataset_dir, serve_dataset, open_page):
    client = serve_dataset(dataset_dir, "best")
    page = open_page(client, "alice")
    wait_for_group(page, 0)
    expect(page.locator("#prompt")).to_have_text("a red circle")
    expect(page.locator("#progress")).to_have_text("you: 0 / 3")
    page.click('button.choice[data-id="0000-2"]')  # click
    wait_for_group(page, 1)
    page.keyboard.press("4")  # keyboard: the fourth image
    wait_for_group(page, 2)
    page.keyboard.press("s")  # skip the last prompt
    expect(page.locator("#done")).to_be_visible()
    expect(page.locator("#progress")).to_have_text("you: 3 / 3")
    page.keyboard.press("u")  # undo the skip: the prompt comes back
    wait_for_group(page, 2)
    expect(page.locator("#progress")).to_have_text("you: 2 / 3")
    page.click("#undo")  # undo again: prompt 1 comes back, answer it differently
    wait_for_group(page, 1)
    page.keyboard.press("2")
    wait_for_group(page, 2)
    page.keyboard.press("1")
    expect(page.locator("#done")).to_be_visible()
    assert labels(dataset_dir) == [("alice", "best", 0, "", '{"best":2}'), ("alice", "best", 1, "", '{"best":1}'),
                                   ("alice", "best", 2, "", '{"best":0}')]
    # A second annotator in another browser profile has their own progress and sees alice's count.
    bob = open_page(client, "bob")
    wait_for_group(bob, 0)
    bob.keyboard.press("3")
    wait_for_group(bob, 1)
    expect(bob.locator("#progress")).to_have_text("you: 1 / 3 \u00b7 alice 3")
    assert labels(dataset_dir)[-1] == ("bob", "best", 0, "", '{"best":2}')
    # The name is remembered: a reload continues where bob stopped.
    bob.reload()
    wait_for_group(bob, 1)
    assert page.errors == [] and bob.errors == []


def test_a_conflicting_answer_from_a_second_tab_is_shown_not_stored(dataset_dir, serve_dataset, open_page):
    client = serve_dataset(dataset_dir, "best")
    first = open_page(client, "carol")
    wait_for_group(first, 0)
    second = first.context.new_page()  # same profile, same name, still showing prompt 0
    second.goto(first.url)
    wait_for_group(second, 0)
    first.keyboard.press("1")
    wait_for_group(first, 1)
    second.keyboard.press("2")
    expect(second.locator("#status")).to_contain_text("carol already labelled group 0 in task best differently")
    assert labels(dataset_dir) == [("carol", "best", 0, "", '{"best":0}')]


def test_pairs_by_click_arrows_and_letters(dataset_dir, serve_dataset, open_page):
    client = serve_dataset(dataset_dir, "pair")
    page = open_page(client, "dave")
    expected = []
    for action in ("click-right", "ArrowLeft", "d", "a", "ArrowRight", "click-left"):
        wait_for_group(page, 0)
        left, right = page.locator("#item").get_attribute("data-images").split(",")
        before = len(labels(dataset_dir)) if (dataset_dir / "labels.sqlite").exists() else 0
        if action.startswith("click"):
            page.locator("button.choice").nth(0 if action == "click-left" else 1).click()
        else:
            page.keyboard.press(action)
        left_wins = action in ("click-left", "ArrowLeft", "a")
        winner, loser = (left, right) if left_wins else (right, left)
        expected.append((int(winner[-1]), int(loser[-1])))
        expect(page.locator("#progress")).to_have_text(f"you: {before + 1} / 18")
    wait_for_group(page, 1)  # group 0's six pairs are done
    stored = [(json.loads(value)["winner"], json.loads(value)["loser"]) for *_, value in labels(dataset_dir)]
    assert stored == expected
    assert {tuple(sorted(pair)) for pair in stored} == {(i, j) for i in range(4) for j in range(i + 1, 4)}


def test_good_and_bad_by_click_and_keyboard(dataset_dir, serve_dataset, open_page):
    client = serve_dataset(dataset_dir, "goodbad")
    page = open_page(client, "erin")
    wait_for_group(page, 0)
    expect(page.locator("#submit")).to_be_disabled()
    for k, mark in enumerate(["good", "bad", "bad", "good"]):
        page.locator(f'.card[data-id="0000-{k}"] .mark-{mark}').click()
    page.click("#submit")
    wait_for_group(page, 1)
    for key in ["b", "g", "g", "b"]:
        page.keyboard.press(key)
    page.keyboard.press("ArrowLeft")  # the cursor stays on the last image; go back one and change it
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    wait_for_group(page, 2)
    assert labels(dataset_dir) == [("erin", "goodbad", 0, "", '{"bad":[1,2],"good":[0,3]}'),
                                   ("erin", "goodbad", 1, "", '{"bad":[0,2,3],"good":[1]}')]
    assert page.errors == []


def test_screenshot_of_the_page(tmp_path, serve_dataset, open_page):
    folder = write_dataset(tmp_path / "shapes", shapes=True)
    page = open_page(serve_dataset(folder, "best"), "alice", viewport=(940, 460))
    wait_for_group(page, 0)
    page.keyboard.press("3")
    wait_for_group(page, 1)
    expect(page.locator("#status")).to_have_text("saved prompt 0")
    page.evaluate("Promise.all([...document.images].map((image) => image.decode()))")
    shot = page.screenshot()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) < 200_000
    if os.environ.get("RLFUSE_UPDATE_SCREENSHOT"):
        DOCS.mkdir(exist_ok=True)
        (DOCS / "annotate.png").write_bytes(shot)
