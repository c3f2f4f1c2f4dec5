"""The annotation server's API: the three tasks, several annotators, every bad request refused with
a one-line 4xx and nothing stored, concurrency, and a SIGKILL that loses no acknowledged label."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlfuse.annotate.store import preference_pairs

from annotate_helpers import start_server_process, write_dataset
from tests import raw_http


def stored_rows(folder) -> list[tuple]:
    db = sqlite3.connect(folder / "labels.sqlite")
    try:
        return db.execute("SELECT annotator, task, group_index, item, value FROM labels WHERE undone IS NULL "
                          "ORDER BY id").fetchall()
    finally:
        db.close()


def assert_refused(response, code: int, words: str) -> None:
    status, body = response
    assert status == code, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"} and "\n" not in body["error"], body
    assert words in body["error"], body


# -- the three tasks -------------------------------------------------------------------------------

def test_best_of_k_walks_the_groups_with_skip_and_undo(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, "best")
    assert client.get("/api/config")[1] == {"task": "best", "images_per_prompt": 4, "groups": 3, "items": 3,
                                             "dataset": "feedback"}
    status, first = client.get("/api/next?annotator=ann")
    assert status == 200 and first["item"]["group"] == 0 and first["item"]["prompt"] == "a red circle"
    assert [image["id"] for image in first["item"]["images"]] == ["0000-0", "0000-1", "0000-2", "0000-3"]
    assert client.get(first["item"]["images"][1]["url"])[1][:8] == b"\x89PNG\r\n\x1a\n"
    status, answer = client.post("/api/labels", {"annotator": "ann", "task": "best", "group": 0, "best": "0000-1"})
    assert status == 201 and answer["progress"]["done"] == 1 and answer["progress"]["total"] == 3
    assert client.post("/api/labels", {"annotator": "ann", "task": "best", "group": 1, "skip": True})[0] == 201
    assert client.get("/api/next?annotator=ann")[1]["item"]["group"] == 2
    status, undone = client.post("/api/undo", {"annotator": "ann"})
    assert status == 200 and undone["item"]["group"] == 1 and undone["progress"]["done"] == 1
    assert client.get("/api/next?annotator=ann")[1]["item"]["group"] == 1
    # bob starts from the beginning; each annotator has their own progress.
    assert client.get("/api/next?annotator=bob")[1]["item"]["group"] == 0
    client.post("/api/labels", {"annotator": "bob", "task": "best", "group": 0, "best": "0000-3"})
    assert client.get("/api/progress")[1] == {"total": 3, "annotators": {"ann": 1, "bob": 1}}
    for group in (1, 2):
        client.post("/api/labels", {"annotator": "ann", "task": "best", "group": group, "best": f"{group:04d}-0"})
    assert client.get("/api/next?annotator=ann")[1] == {"done": True, "progress": {
        "total": 3, "annotators": {"ann": 3, "bob": 1}, "done": 3}}
    assert len(preference_pairs(dataset_dir)) == 4 * 3 - 2  # ann 1 > 3 and bob 3 > 1 on group 0 cancel


def test_an_annotator_typed_in_nfc_or_nfd_is_one_annotator(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, "best")
    composed, decomposed = "Jos\u00e9", "  Jose\u0301 "
    assert client.post("/api/labels", {**BEST, "annotator": composed})[0] == 201
    status, answer = client.post("/api/labels", {**BEST, "annotator": decomposed})
    assert status == 200 and answer["duplicate"] is True
    assert_refused(client.post("/api/labels", {**BEST, "annotator": decomposed, "best": "0000-2"}), 409, "undo")
    assert client.get("/api/progress")[1]["annotators"] == {composed: 1}
    assert client.get("/api/next?annotator=Jose%CC%81")[1]["item"]["group"] == 1
    assert preference_pairs(dataset_dir) == [(0, 1, 0), (0, 1, 2), (0, 1, 3)]  # one vote, not two


def test_pair_task_asks_each_pair_once_and_alternates_sides(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, "pair")
    assert client.get("/api/config")[1]["items"] == 3 * 6
    shown = []
    for _ in range(6):  # the six pairs of group 0
        item = client.get("/api/next?annotator=ann")[1]["item"]
        assert item["group"] == 0 and item["pair"] is True and len(item["images"]) == 2
        left, right = (image["id"] for image in item["images"])
        shown.append((left, right))
        status, _ = client.post("/api/labels", {"annotator": "ann", "task": "pair", "group": 0,
                                                "winner": right, "loser": left})
        assert status == 201
    assert {tuple(sorted(pair)) for pair in shown} == {(f"0000-{i}", f"0000-{j}") for i in range(4) for j in range(i + 1, 4)}
    assert any(left > right for left, right in shown) and any(left < right for left, right in shown)
    item = client.get("/api/next?annotator=ann")[1]["item"]
    assert item["group"] == 1
    pair = [image["id"] for image in item["images"]]
    assert client.post("/api/labels", {"annotator": "ann", "task": "pair", "group": 1, "skip": True, "pair": pair})[0] == 201
    assert client.get("/api/next?annotator=ann")[1]["item"]["images"] != item["images"]
    # The same pair, other way round, is the same item: a different answer conflicts.
    a, b = shown[0]
    assert_refused(client.post("/api/labels", {"annotator": "ann", "task": "pair", "group": 0, "winner": a, "loser": b}),
                   409, "already labelled group 0, pair")
    assert len(preference_pairs(dataset_dir)) == 6


def test_goodbad_task_stores_each_good_over_each_bad(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, "goodbad")
    label = {"annotator": "ann", "task": "goodbad", "group": 2, "good": ["0002-3", "0002-0"], "bad": ["0002-1", "0002-2"]}
    assert client.post("/api/labels", label)[0] == 201
    assert client.post("/api/labels", label)[1]["duplicate"] is True  # a retry, not a conflict
    assert stored_rows(dataset_dir) == [("ann", "goodbad", 2, "", '{"bad":[1,2],"good":[0,3]}')]
    assert preference_pairs(dataset_dir) == [(2, 0, 1), (2, 0, 2), (2, 3, 1), (2, 3, 2)]


# -- bad requests ----------------------------------------------------------------------------------

BEST = {"annotator": "ann", "task": "best", "group": 0, "best": "0000-1"}

BAD_LABELS = {
    "unknown image id": ({**BEST, "best": "0009-0"}, "unknown image id '0009-0'"),
    "image of another group": ({**BEST, "best": "0001-2"}, "belongs to group 1, not group 0"),
    "unknown group": ({**BEST, "group": 7}, "no group 7"),
    "negative group": ({**BEST, "group": -1}, "no group -1"),
    "group as a string": ({**BEST, "group": "0"}, "\"group\" must be an integer"),
    "group as a bool": ({**BEST, "group": True}, "\"group\" must be an integer"),
    "image as a number": ({**BEST, "best": 1}, "best must be an image id string"),
    "wrong task": ({**BEST, "task": "pair"}, "\"task\" must be 'best'"),
    "no annotator": ({k: v for k, v in BEST.items() if k != "annotator"}, "\"annotator\" must be a non-empty name"),
    "blank annotator": ({**BEST, "annotator": "  "}, "non-empty name"),
    "annotator not a string": ({**BEST, "annotator": ["ann"]}, "non-empty name"),
    "annotator too long": ({**BEST, "annotator": "x" * 65}, "at most 64 printable"),
    "annotator with a newline": ({**BEST, "annotator": "ann\nbob"}, "printable"),
    "annotator with a bidi override": ({**BEST, "annotator": "ann\u202ebob"}, "text-direction character U+202E"),
    "annotator with a zero-width space": ({**BEST, "annotator": "ann\u200b"}, "invisible"),
    "annotator of a Hangul filler": ({**BEST, "annotator": "\u3164"}, "invisible"),
    "unknown key": ({**BEST, "score": 3}, "unknown key 'score'"),
    "missing answer": ({k: v for k, v in BEST.items() if k != "best"}, "missing 'best'"),
    "skip not true": ({**{k: v for k, v in BEST.items() if k != "best"}, "skip": "yes"}, "\"skip\" must be true"),
    "skip with an answer": ({**BEST, "skip": True}, "a skip carries no answer"),
    "a list": ([BEST], "a label must be a JSON object"),
    "a number": (3, "a label must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_a_bad_label_is_refused_and_stores_nothing(case, dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, "best")
    body, words = BAD_LABELS[case]
    assert_refused(client.post("/api/labels", body), 400, words)
    assert stored_rows(dataset_dir) == []


BAD_PAIRS_AND_MARKS = {
    "pair": [
        ({"winner": "0000-1", "loser": "0000-1"}, "two different images"),
        ({"winner": "0000-1"}, "missing 'loser'"),
        ({"winner": "0000-1", "loser": "0001-0"}, "belongs to group 1"),
        ({"skip": True}, "a skipped pair needs"),
        ({"skip": True, "pair": ["0000-1", "0000-1"]}, "two different images"),
        ({"skip": True, "pair": ["0000-1", "../x"]}, "unknown image id"),
        ({"winner": "0000-1", "loser": "0000-0", "pair": ["0000-1", "0000-0"]}, "\"pair\" only goes with \"skip\""),
    ],
    "goodbad": [
        ({"good": ["0000-0"], "bad": ["0000-1", "0000-2"]}, "exactly once"),
        ({"good": ["0000-0", "0000-1"], "bad": ["0000-1", "0000-2", "0000-3"]}, "exactly once"),
        ({"good": "0000-0", "bad": ["0000-1", "0000-2", "0000-3"]}, "\"good\" must be a list"),
        ({"good": [0], "bad": ["0000-1", "0000-2", "0000-3"]}, "good[0] must be an image id string"),
        ({"good": [], "bad": ["0000-1", "0000-2", "0000-3", "0002-0"]}, "bad[3]: image 0002-0 belongs to group 2"),
    ],
}


@pytest.mark.parametrize("task", sorted(BAD_PAIRS_AND_MARKS))
def test_bad_pair_and_goodbad_labels_are_refused(task, dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, task)
    for answer, words in BAD_PAIRS_AND_MARKS[task]:
        assert_refused(client.post("/api/labels", {"annotator": "ann", "task": task, "group": 0, **answer}), 400, words)
    assert stored_rows(dataset_dir) == []


def test_a_conflicting_label_is_409_until_undone(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, "best")
    assert client.post("/api/labels", BEST)[0] == 201
    assert_refused(client.post("/api/labels", {**BEST, "best": "0000-2"}), 409, "undo it first")
    assert client.post("/api/undo", {"annotator": "ann"})[0] == 200
    assert client.post("/api/labels", {**BEST, "best": "0000-2"})[0] == 201
    assert stored_rows(dataset_dir) == [("ann", "best", 0, "", '{"best":2}')]
    assert_refused(client.post("/api/undo", {"annotator": "bob"}), 404, "bob has no best label to undo")
    assert_refused(client.post("/api/undo", {"annotator": "ann", "extra": 1}), 400, "expected {\"annotator\": NAME}")


def test_malformed_bodies_are_400(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir)
    for raw in (b"{not json", b"\xff\xfe", b"", b'{"annotator": "ann", "task": "best", "group": 0, "best": "0000-1"'):
        assert_refused(client.request("POST", "/api/labels", raw=raw), 400, "the body is not JSON")
    assert stored_rows(dataset_dir) == []


def test_a_body_that_is_not_declared_json_is_415(dataset_dir, serve_dataset):
    # A cross-site form or fetch can send text/plain without a CORS preflight; it must not label.
    client = serve_dataset(dataset_dir)
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": kind} if kind else {}
        assert_refused(client.request("POST", "/api/labels", raw=json.dumps(BEST).encode(), headers=headers),
                       415, "Content-Type: application/json")
    assert client.request("POST", "/api/labels", raw=json.dumps(BEST).encode(),
                          headers={"Content-Type": "application/json; charset=utf-8"})[0] == 201
    assert_refused(client.request("OPTIONS", "/api/labels"), 405, "not allowed")  # no CORS preflight passes


TRAVERSALS = ["/images/../manifest.json", "/images/%2e%2e/manifest.json", "/images/%2e%2e%2fmanifest.json",
              "/images/..%2Flabels.sqlite", "/images//etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/0000-0.png",
              "/images/images/0000-0.png", "/images/0000-0/../../manifest.json", "/manifest.json", "/labels.sqlite",
              "/images/", "//etc/passwd", "/static/../server.py", "/static/%2e%2e/server.py", "/static/index.html",
              "/static/", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/rlfuse/annotate/server.py",
              "http://evil.example/etc/passwd"]


def test_only_manifest_images_and_static_files_are_served(dataset_dir, serve_dataset):
    (dataset_dir / "secret.txt").write_text("do not serve")
    client = serve_dataset(dataset_dir)
    for path in TRAVERSALS:
        status, body = client.get(path)
        assert status == (403 if path.startswith("http:") else 404), (path, status)  # that one names a foreign Host
        assert isinstance(body, dict) and "do not serve" not in body["error"], (path, body)
    assert client.get("/")[0] == 200 and b"<title>rlfuse annotate</title>" in client.get("/")[1]
    assert client.get("/static/app.js")[0] == 200 and client.get("/static/style.css")[0] == 200
    assert_refused(client.get("/api/next"), 400, "\"annotator\" must be a non-empty name")
    assert_refused(client.get("/api/nothing"), 404, "no such path")
    assert_refused(client.request("PUT", "/api/labels", body=BEST), 405, "method PUT not allowed")
    assert_refused(client.request("DELETE", "/images/0000-0"), 405, "not allowed")
    assert_refused(client.post("/api/labels/../undo", {"annotator": "ann"}), 404, "no such path")


def test_a_foreign_host_name_is_refused_on_loopback(dataset_dir, serve_dataset):
    # DNS rebinding: evil.example re-pointed at 127.0.0.1 sends its own name as Host.
    client = serve_dataset(dataset_dir)
    for path in ("/", "/api/next?annotator=ann", "/images/0000-0"):
        assert_refused(client.request("GET", path, headers={"Host": f"evil.example:{client.port}"}), 403,
                       "is not this server")
    assert_refused(client.request("GET", "/", headers={"Host": "[::1"}), 403, "is not this server")
    assert_refused(client.request("POST", "/api/labels", body=BEST, headers={
        "Host": "evil.example", "Content-Type": "application/json"}), 403, "is not this server")
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert client.request("GET", "/api/config", headers={"Host": f"{name}:{client.port}"})[0] == 200
    assert stored_rows(dataset_dir) == []


def test_an_oversized_body_is_refused_from_its_length_without_being_read(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir)
    for path, code, words in (("/api/labels", 413, "over the limit of 65536"), ("/api/nothing", 404, "no such path")):
        with socket.create_connection((client.host, client.port), timeout=5) as connection:
            start = time.monotonic()
            connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {200 * 2**20}\r\n\r\n".encode() + b"x" * 2**16)
            reply = b""
            while chunk := connection.recv(65536):  # answered and closed before the rest of the 200 MiB is sent
                reply += chunk
            assert time.monotonic() - start < 1
        head, _, body = reply.partition(b"\r\n\r\n")
        assert_refused((int(head.split()[1]), json.loads(body)), code, words)
    assert client.post("/api/labels", BEST)[0] == 201  # the server is fine afterwards
    assert stored_rows(dataset_dir) == [("ann", "best", 0, "", '{"best":1}')]


def raw_exchange(client, request: bytes) -> tuple[int, dict]:
    return raw_http.raw_exchange(client.host, client.port, request)


def test_deep_json_and_a_body_shorter_than_its_length_are_4xx(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, request_timeout=0.5)
    assert_refused(client.request("POST", "/api/labels", raw=b"[" * 60_000), 400, "nested too deep")
    assert_refused(client.request("POST", "/api/undo", raw=b'{"annotator": ' + b"[" * 30_000), 400, "nested too deep")
    head = b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    start = time.monotonic()
    assert_refused(raw_exchange(client, head + b'{"annotator"'), 408, "did not arrive within 0.5 s")  # then silent
    assert time.monotonic() - start < 2
    with socket.create_connection((client.host, client.port), timeout=5) as connection:
        connection.sendall(head + b'{"annotator"')
        connection.shutdown(socket.SHUT_WR)  # gives up mid-body
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.split()[1] == b"400" and b"ended after 12 of 200 bytes" in reply
    assert stored_rows(dataset_dir) == []


def handler_threads(expected: int, wait: float = 2.0) -> int:
    """The number of connection threads alive, once it equals `expected` or after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        count = sum("process_request_thread" in thread.name for thread in threading.enumerate())
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def test_connections_are_capped_and_a_trickling_client_is_released_within_the_timeout(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir, max_connections=4, request_timeout=0.5)
    slow = [socket.create_connection((client.host, client.port), timeout=5) for _ in range(4)]
    for connection in slow:
        connection.sendall(b"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finish
    assert handler_threads(4) == 4
    assert_refused(client.get("/api/config"), 503, "busy")  # a fifth connection is refused at once
    stop = time.monotonic() + 1.5
    while time.monotonic() < stop:  # a byte every 0.1 s keeps every read short; the deadline still ends it
        for connection in slow:
            try:
                connection.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        time.sleep(0.1)
    answers = [connection.recv(65536).split(b" ", 2)[1] for connection in slow]
    assert answers == [b"408"] * 4
    assert handler_threads(0) == 0
    assert client.get("/api/config")[0] == 200
    for connection in slow:
        connection.close()


def test_a_body_without_length_is_411(dataset_dir, serve_dataset):
    client = serve_dataset(dataset_dir)
    assert_refused(raw_exchange(client, b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), 411, "Content-Length")
    assert_refused(raw_exchange(client, b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n"),
                   411, "Content-Length")
    chunked = b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert_refused(raw_exchange(client, chunked), 411, "chunked")
    assert stored_rows(dataset_dir) == []


# -- concurrency and crashes -----------------------------------------------------------------------

def test_twenty_clients_post_fifty_labels_each_and_all_are_stored(tmp_path):
    folder = write_dataset(tmp_path / "many", prompts=[f"prompt {g}" for g in range(50)], k_images=2)
    process, client = start_server_process(folder, "best")
    try:
        def annotate(worker: int) -> list[int]:
            return [client.post("/api/labels", {"annotator": f"client {worker}", "task": "best", "group": g,
                                                "best": f"{g:04d}-{(g + worker) % 2}"})[0] for g in range(50)]

        start = time.perf_counter()
        with ThreadPoolExecutor(20) as pool:
            statuses = [status for result in pool.map(annotate, range(20)) for status in result]
        seconds = time.perf_counter() - start
    finally:
        process.kill()
        process.wait()
    print(f"\n1000 labels from 20 clients in {seconds:.2f} s ({1000 / seconds:.0f} labels/s)")
    assert statuses == [201] * 1000
    rows = stored_rows(folder)
    assert len(rows) == 1000 and len(set(rows)) == 1000
    assert {(r[0], r[2], r[4]) for r in rows} == {(f"client {w}", g, f'{{"best":{(g + w) % 2}}}')
                                                  for w in range(20) for g in range(50)}


def test_sigkill_loses_no_acknowledged_label(tmp_path):
    folder = write_dataset(tmp_path / "crash", prompts=[f"prompt {g}" for g in range(200)], k_images=2)
    process, client = start_server_process(folder, "best")
    acknowledged: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def annotate(worker: int) -> None:
        for g in range(200):
            label = {"annotator": f"client {worker}", "task": "best", "group": g, "best": f"{g:04d}-{g % 2}"}
            try:
                status, _ = client.post("/api/labels", label)
            except OSError:  # the server is gone
                return
            if status in (200, 201):
                with lock:
                    acknowledged.append((label["annotator"], g, g % 2))

    threads = [threading.Thread(target=annotate, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
    process.wait()
    for thread in threads:
        thread.join(timeout=30)
    db = sqlite3.connect(folder / "labels.sqlite")  # recovers from the WAL
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {(a, g, json.loads(v)["best"]) for a, g, v in db.execute("SELECT annotator, group_index, value FROM labels")}
    db.close()
    assert len(acknowledged) < 8 * 200  # killed before the end
    assert set(acknowledged) <= stored
    print(f"\n{len(acknowledged)} acknowledged before SIGKILL, {len(stored)} stored")
    # The server starts again on the same folder, and each client resumes where it stopped.
    process, client = start_server_process(folder, "best")
    try:
        nexts = [client.get(f"/api/next?annotator=client%20{w}")[1]["item"]["group"] for w in range(8)]
        done = {w: sum(1 for a, _, _ in stored if a == f"client {w}") for w in range(8)}
        assert nexts == [done[w] for w in range(8)]
    finally:
        process.kill()
        process.wait()
