"""The annotation web server: the page, the dataset's images, and a small JSON API.

    GET  /                        the page (static/index.html, app.js, style.css)
    GET  /images/<image id>       an image listed in the manifest (nothing else on disk is served)
    GET  /api/config              {"task", "images_per_prompt", "groups", "items", "dataset"}
    GET  /api/next?annotator=NAME {"done": false, "item": {...}, "progress": {...}} or {"done": true, ...}
    GET  /api/progress            {"total": items, "annotators": {name: labelled}}
    POST /api/labels              a label (below) -> 201 {"id", "progress"}; the same label again -> 200
    POST /api/undo                {"annotator": NAME} -> 200 {"undone", "item", "progress"}

Label bodies name images by id (k is the image's position in its group):

    {"annotator": "ann", "task": "best", "group": 3, "best": "0003-2"}
    {"annotator": "ann", "task": "pair", "group": 3, "winner": "0003-1", "loser": "0003-0"}
    {"annotator": "ann", "task": "goodbad", "group": 3, "good": ["0003-0"], "bad": ["0003-1", "0003-2"]}
    {"annotator": "ann", "task": "best", "group": 3, "skip": true}          (pair: add "pair": [id, id])

A label is answered 201 only after it is committed to labels.sqlite. Every refusal is a 4xx with a
one-line {"error": "..."} and stores nothing: 400 malformed (JSON nested too deep included, or a
body shorter than its Content-Length), 403 another Host name while listening on a loopback address
(DNS rebinding), 404 unknown path, 408 a request that did not arrive within request_timeout, 409 a
different answer to an item already labelled (undo first), 411 no Content-Length, 413 body too
large (refused from its Content-Length, unread), 415 a body that is not Content-Type:
application/json. Connections are capped (503 beyond; rlfuse/bounded_http.py).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from importlib.resources import files
from urllib.parse import parse_qs, urlsplit

from rlfuse.annotate.dataset import Dataset
from rlfuse.annotate.store import Conflict, Label, LabelStore, StoredLabel, check_annotator, pair_item, task_items
from rlfuse.bounded_http import BadRequest, BoundedHTTPServer, JsonRequestHandler

log = logging.getLogger("rlfuse.annotate")
MAX_BODY = 64 * 2**10  # a label is well under 1 kB; a goodbad label with K = 64 is about 2 kB
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/static/style.css": ("style.css", "text/css; charset=utf-8")}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_TASK_KEYS = {"best": {"best"}, "pair": {"winner", "loser"}, "goodbad": {"good", "bad"}}


class AnnotationApp:
    """What the handlers share: the dataset, the store and the task, and the API's logic."""

    def __init__(self, dataset: Dataset, store: LabelStore, task: str):
        self.dataset, self.store, self.task = dataset, store, task
        self.items = task_items(task, len(dataset.groups), dataset.images_per_prompt)
        self.image_index = dataset.images  # id -> (group, k)

    # -- reading ---------------------------------------------------------------------------------

    def config(self) -> dict:
        return {"task": self.task, "images_per_prompt": self.dataset.images_per_prompt,
                "groups": len(self.dataset.groups), "items": len(self.items), "dataset": self.dataset.root.name}

    def progress(self, annotator: str | None = None) -> dict:
        counts = self.store.progress(self.task)
        result = {"total": len(self.items), "annotators": counts}
        if annotator is not None:
            result["done"] = counts.get(annotator, 0)
        return result

    def item(self, group: int, item: str) -> dict:
        """What the page shows for one item; pairs alternate sides so that neither side is always
        the lower-numbered image (a guard against position bias)."""
        g = self.dataset.groups[group]
        shown = list(range(self.dataset.images_per_prompt))
        if item:
            i, j = map(int, item.split("-"))
            shown = [j, i] if (group + i + j) % 2 else [i, j]
        return {"group": group, "prompt": g.prompt, "pair": bool(item),
                "images": [{"id": g.image_ids[k], "url": f"/images/{g.image_ids[k]}"} for k in shown]}

    def next_item(self, annotator: str) -> dict:
        done = self.store.done_items(annotator, self.task)
        for group, item in self.items:
            if (group, item) not in done:
                return {"done": False, "item": self.item(group, item), "progress": self.progress(annotator)}
        return {"done": True, "progress": self.progress(annotator)}

    # -- writing ---------------------------------------------------------------------------------

    def add(self, payload: object) -> tuple[int, dict]:
        label = self.parse_label(payload)
        try:
            label_id, new = self.store.add(label)
        except Conflict as error:
            raise BadRequest(str(error), 409) from None
        answer = {"id": label_id, "progress": self.progress(label.annotator)}
        if not new:
            answer["duplicate"] = True
        return (201 if new else 200), answer

    def undo(self, payload: object) -> dict:
        if not isinstance(payload, dict) or set(payload) != {"annotator"}:
            raise BadRequest('expected {"annotator": NAME}')
        annotator = parse_annotator(payload["annotator"])
        undone: StoredLabel | None = self.store.undo(annotator, self.task)
        if undone is None:
            raise BadRequest(f"{annotator} has no {self.task} label to undo", 404)
        label = undone.label
        return {"undone": {"id": undone.id, "group": label.group, "value": label.value},
                "item": self.item(label.group, label.item), "progress": self.progress(annotator)}

    def parse_label(self, payload: object) -> Label:
        """A request body -> Label, or BadRequest naming the first thing wrong."""
        if not isinstance(payload, dict):
            raise BadRequest("a label must be a JSON object")
        allowed = {"annotator", "task", "group", "skip"} | _TASK_KEYS[self.task]
        if self.task == "pair":
            allowed.add("pair")  # the pair a skip skips
        unknown = sorted(set(payload) - allowed)
        if unknown:
            raise BadRequest(f"unknown key {unknown[0]!r} for task {self.task}; allowed: {', '.join(sorted(allowed))}")
        annotator = parse_annotator(payload.get("annotator"))
        if payload.get("task") != self.task:
            raise BadRequest(f"\"task\" must be {self.task!r} (this server collects {self.task} labels), "
                             f"got {payload.get('task')!r}")
        group = payload.get("group")
        if not isinstance(group, int) or isinstance(group, bool):
            raise BadRequest(f"\"group\" must be an integer, got {group!r}")
        if not 0 <= group < len(self.dataset.groups):
            raise BadRequest(f"no group {group}: the dataset has groups 0..{len(self.dataset.groups) - 1}")

        def k_of(name: str, value: object) -> int:
            if not isinstance(value, str):
                raise BadRequest(f"{name} must be an image id string like \"{group:04d}-0\", got {value!r}")
            if value not in self.image_index:
                raise BadRequest(f"{name}: unknown image id {value!r}")
            image_group, k = self.image_index[value]
            if image_group != group:
                raise BadRequest(f"{name}: image {value} belongs to group {image_group}, not group {group}")
            return k

        if "skip" in payload:
            if payload["skip"] is not True:
                raise BadRequest(f"\"skip\" must be true, got {payload['skip']!r}")
            chosen = sorted(_TASK_KEYS[self.task] & set(payload))
            if chosen:
                raise BadRequest(f"a skip carries no answer; drop {chosen[0]!r}")
            item = ""
            if self.task == "pair":
                pair = payload.get("pair")
                if not isinstance(pair, list) or len(pair) != 2:
                    raise BadRequest('a skipped pair needs "pair": [image id, image id]')
                i, j = k_of("pair[0]", pair[0]), k_of("pair[1]", pair[1])
                if i == j:
                    raise BadRequest("a pair needs two different images")
                item = pair_item(i, j)
            return Label(annotator, self.task, group, item, {"skip": True})
        missing = sorted(_TASK_KEYS[self.task] - set(payload))
        if missing:
            raise BadRequest(f"missing {missing[0]!r} for task {self.task} (or send \"skip\": true)")
        if "pair" in payload:
            raise BadRequest('"pair" only goes with "skip"; a pair label names "winner" and "loser"')
        if self.task == "best":
            return Label(annotator, "best", group, "", {"best": k_of("best", payload["best"])})
        if self.task == "pair":
            winner, loser = k_of("winner", payload["winner"]), k_of("loser", payload["loser"])
            if winner == loser:
                raise BadRequest("winner and loser must be two different images")
            return Label(annotator, "pair", group, pair_item(winner, loser), {"winner": winner, "loser": loser})
        sides = {}
        for side in ("good", "bad"):
            ids = payload[side]
            if not isinstance(ids, list):
                raise BadRequest(f"\"{side}\" must be a list of image ids, got {ids!r}")
            sides[side] = [k_of(f"{side}[{n}]", image) for n, image in enumerate(ids)]
        marked = sides["good"] + sides["bad"]
        if sorted(marked) != list(range(self.dataset.images_per_prompt)):
            raise BadRequest(f"mark each of the group's {self.dataset.images_per_prompt} images exactly once, "
                             f"as good or bad")
        return Label(annotator, "goodbad", group, "", {"good": sorted(sides["good"]), "bad": sorted(sides["bad"])})


def parse_annotator(name: object) -> str:
    try:
        return check_annotator(name)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def make_handler(app: AnnotationApp, max_body: int) -> type[JsonRequestHandler]:
    static = {path: ((files("rlfuse.annotate") / "static" / name).read_bytes(), kind)
              for path, (name, kind) in _STATIC.items()}

    class Handler(JsonRequestHandler):
        def _send(self, code: int, body: bytes, kind: str, cache: str = "no-store") -> None:
            self.send_body(code, body, kind, {"Cache-Control": cache, "X-Content-Type-Options": "nosniff",
                                              "Content-Security-Policy": "default-src 'self'; img-src 'self'"})

        def _json(self, code: int, payload: dict) -> None:
            self._send(code, json.dumps(payload).encode(), "application/json")

        def _guarded(self, route) -> None:
            try:
                self.check_host()
                route()
            except BadRequest as error:
                self._json(error.code, {"error": str(error)})
            except sqlite3.Error as error:
                log.exception("label store failed")
                self._json(503, {"error": f"the label store failed ({error}); nothing was stored, try again"})
            except Exception as error:  # noqa: BLE001 (answer, do not leave the client hanging)
                log.exception("request failed")
                self._json(500, {"error": f"internal error: {type(error).__name__}: {error}".splitlines()[0]})

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._guarded(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._guarded(self._post)

        def _refuse_method(self) -> None:
            self.refuse_body()
            self._json(405, {"error": f"method {self.command} not allowed; use GET or POST"})

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

        def _get(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path in static:
                self._send(200, *static[url.path])
            elif url.path.startswith("/images/"):
                self._image(url.path[len("/images/"):])
            elif url.path == "/api/config":
                self._json(200, app.config())
            elif url.path == "/api/progress":
                self._json(200, app.progress())
            elif url.path == "/api/next":
                self._json(200, app.next_item(parse_annotator(query.get("annotator", [""])[0])))
            else:
                raise BadRequest(f"no such path {url.path!r}", 404)

        def _image(self, image_id: str) -> None:
            # Only ids listed in the manifest map to files; the URL is never joined to a path.
            if image_id not in app.image_index:
                raise BadRequest(f"no image {image_id!r} in this dataset", 404)
            group, k = app.image_index[image_id]
            path = app.dataset.groups[group].files[k]
            kind = _IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
            self._send(200, path.read_bytes(), kind, cache="private, max-age=3600")

        def _post(self) -> None:
            url = urlsplit(self.path)
            routes = {"/api/labels": app.add, "/api/undo": lambda payload: (200, app.undo(payload))}
            if url.path not in routes:
                self.refuse_body()
                raise BadRequest(f"no such path {url.path!r}; POST /api/labels or /api/undo", 404)
            length = self.content_length()
            self.check_json_body()
            body = self.read_body(length)
            try:
                payload = json.loads(body)
            except RecursionError:
                raise BadRequest("the JSON is nested too deep; a label is a flat JSON object") from None
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("the body is not JSON") from None
            code, answer = routes[url.path](payload)
            self._json(code, answer)

    Handler.max_body = max_body
    return Handler


class Server(BoundedHTTPServer):
    """Many annotators' browsers (a few connections each) or a test's 20 clients at once."""


def serve(dataset: Dataset, store: LabelStore, task: str, host: str = "127.0.0.1", port: int = 8000,
          max_body: int = MAX_BODY, max_connections: int = 64, idle_timeout: float = 30.0,
          request_timeout: float = 10.0) -> Server:
    """Start serving in a background thread; returns the server (server.server_address holds the
    port actually bound, useful with port 0; call shutdown() to stop). At most max_connections are
    served at once (one more is answered 503); a request must arrive within request_timeout seconds."""
    handler = make_handler(AnnotationApp(dataset, store, task), max_body)
    server = Server((host, port), handler, max_connections, idle_timeout, request_timeout)
    # A short poll interval makes shutdown() prompt; the idle cost is negligible.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server
