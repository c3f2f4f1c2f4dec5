"""Serve any rlfuse reward over HTTP, for `reward=http` runs on other machines.

    python -m rlfuse.reward_server reward=jpeg --port 8765
    RLFUSE_REWARD_TOKEN=<secret> python -m rlfuse.reward_server reward=aesthetic \\
        reward.fn.weights=/data/aesthetic.pth --host 0.0.0.0

Overrides are those of rlfuse.train's reward group; the protocol is in rlfuse/rewards/http.py.
Requests are decoded and scored one at a time (rewards hold one model, and one request's pixels are
in memory at a time). Every client fault gets a 4xx with a one-line error and changes nothing:
400 malformed JSON, images or prompts; 401 no token or a wrong one (with a token set); 403 another
Host name while listening on a loopback address (DNS rebinding); 404 unknown path; 408 a request
slower than --read-timeout; 411 no Content-Length; 413 a body over --max-body-mb, an image over
--max-pixels, images over --max-request-pixels in all; 415 a body not sent as application/json
(a cross-site form post); 422 a prompt the reward refuses. 503: all --max-connections are busy.
Images are checked from their headers before any pixel is decoded, and only PNG and JPEG are read.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from rlfuse.bounded_http import BadRequest, BoundedHTTPServer, JsonRequestHandler, is_loopback
from rlfuse.rewards.base import Reward, score
from rlfuse.rewards.http import TOKEN_ENV, check_token

log = logging.getLogger("rlfuse.reward_server")
MAX_IMAGES = 1024
MAX_ASPECT = 4  # longer side / shorter side: CLIP-style resizes scale the shorter side up to the input size
FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 2048 * 2048  # per image: 4x the largest model's output (1024 x 1024 for SD3 and FLUX)
MAX_REQUEST_PIXELS = 32 * 2**20  # per request: 32 images of 1024 x 1024, about 400 MB as float32


def parse_request(body: bytes) -> tuple[list[str], list[str]]:
    """A /score body -> B prompts and B base64 images, as sent; BadRequest if malformed."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise BadRequest("the JSON is nested too deep; send {\"prompts\": [...], \"images\": [...]}") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("prompts"), list) \
            or not isinstance(payload.get("images"), list):
        raise BadRequest("expected {\"prompts\": [...], \"images\": [...]}")
    prompts, encoded = payload["prompts"], payload["images"]
    if len(prompts) != len(encoded) or not prompts:
        raise BadRequest(f"{len(prompts)} prompts and {len(encoded)} images: give one prompt per image, at least one")
    if len(prompts) > MAX_IMAGES:
        raise BadRequest(f"{len(prompts)} images: at most {MAX_IMAGES} per request", 413)
    if not all(isinstance(p, str) for p in prompts):
        raise BadRequest("every prompt must be a string")
    if not all(isinstance(text, str) for text in encoded):
        raise BadRequest("every image must be a base64 string of a PNG or JPEG")
    return prompts, encoded


def open_images(encoded: list[str], max_pixels: int, max_request_pixels: int) -> list[Image.Image]:
    """Base64 PNGs or JPEGs -> images opened but not decoded, their declared sizes checked: each at
    most max_pixels and MAX_ASPECT, all of one size, at most max_request_pixels in all. BadRequest
    (400 or 413) otherwise, before a single pixel is decoded."""
    images, total = [], 0
    for i, text in enumerate(encoded):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{i}] is not base64; send each image as base64 text of a PNG or JPEG") from None
        try:
            with warnings.catch_warnings():  # Pillow's own bomb check warns below twice its limit: refuse
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise BadRequest(f"images[{i}] declares more pixels than --max-pixels {max_pixels}; send smaller "
                             f"images", 413) from None
        except Exception:  # noqa: BLE001 (any failure to parse a client's bytes is the client's fault)
            raise BadRequest(f"images[{i}] is not a base64 PNG or JPEG (only these two formats are read)") from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadRequest(f"images[{i}] is {width}x{height}, over --max-pixels {max_pixels}; send smaller "
                             f"images", 413)
        if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
            raise BadRequest(f"images[{i}] is {width}x{height}: the longer side may be at most {MAX_ASPECT} "
                             f"times the shorter")
        total += width * height
        if total > max_request_pixels:
            raise BadRequest(f"the images hold over {max_request_pixels} pixels in all (--max-request-pixels); "
                             f"send fewer per request (reward.fn.batch_size)", 413)
        images.append(image)
    if len({image.size for image in images}) != 1:
        raise BadRequest("all images of a request must have the same size")
    return images


def decode_images(images: list[Image.Image]) -> torch.Tensor:
    """Opened images -> (B, 3, H, W) float in [0, 1]; BadRequest if one does not decode (truncated,
    corrupt)."""
    arrays = []
    for i, image in enumerate(images):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                arrays.append(np.asarray(image.convert("RGB")))
        except Exception as error:  # noqa: BLE001 (as above: the client's bytes)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BadRequest(f"images[{i}] does not decode as {image.format} ({reason}); send a complete file") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def make_handler(reward_fn: Reward, name: str, token: str | None, max_body: int, max_pixels: int,
                 max_request_pixels: int) -> type[JsonRequestHandler]:
    """The request handler: GET /health, and POST /score answered with the scores of `reward_fn`."""
    lock = threading.Lock()
    expected = f"Bearer {token}".encode() if token else None

    class Handler(JsonRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._guarded(self._health)

        def do_POST(self) -> None:  # noqa: N802
            self._guarded(self._score)

        def _guarded(self, route: Callable[[], None]) -> None:
            try:
                self.check_host()
                self._check_token()
                route()
            except BadRequest as error:
                self.answer_error(error, {"WWW-Authenticate": "Bearer"} if error.code == 401 else None)
            except ValueError as error:  # the reward refused the input (e.g. a prompt outside its grammar)
                self.send_json(422, {"error": str(error).splitlines()[0]})
            except Exception as error:  # noqa: BLE001 (a failing reward must answer, not hang the client)
                log.exception("reward failed")
                self.send_json(500, {"error": f"the reward failed: {type(error).__name__}: {error}".splitlines()[0]})

        def _check_token(self) -> None:
            if expected is None:
                return
            given = self.headers.get("Authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):  # constant time: the answer's timing tells nothing
                self.refuse_body()
                raise BadRequest(f"send the server's token as Authorization: Bearer <token> (reward=http: set "
                                 f"{TOKEN_ENV} or reward.fn.token)", 401)

        def _health(self) -> None:
            if self.path != "/health":
                self.refuse_body()
                raise BadRequest(f"no such path {self.path!r}; use GET /health or POST /score", 404)
            self.send_json(200, {"status": "ok", "reward": name})

        def _score(self) -> None:
            if self.path != "/score":
                self.refuse_body()
                raise BadRequest(f"no such path {self.path!r}; use POST /score", 404)
            self.check_json_body()
            prompts, encoded = parse_request(self.read_body(self.content_length()))
            with lock:
                images = decode_images(open_images(encoded, max_pixels, max_request_pixels))
                rewards = score(reward_fn, images, prompts).scores.float().tolist()
            self.send_json(200, {"rewards": rewards})

    Handler.max_body = max_body
    return Handler


def serve(reward_fn: Reward, name: str, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          max_body: int = 64 * 2**20, max_pixels: int = MAX_PIXELS, max_request_pixels: int = MAX_REQUEST_PIXELS,
          max_connections: int = 32, idle_timeout: float = 10.0, request_timeout: float = 30.0) -> BoundedHTTPServer:
    """Start serving in a background thread; returns the server (server.server_address has the port
    actually bound, useful with port 0; call shutdown() to stop). With a token, every request must
    carry it (401 otherwise)."""
    handler = make_handler(reward_fn, name, token, max_body, max_pixels, max_request_pixels)
    server = BoundedHTTPServer((host, port), handler, max_connections, idle_timeout, request_timeout)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlfuse.reward_server", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="reward=<name> and reward.fn.<key>=<value> overrides")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; another "
                        "address needs a token or --no-auth)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument("--token", help=f"require Authorization: Bearer <token> (default: ${TOKEN_ENV}; the "
                        f"environment keeps it out of the process list)")
    parser.add_argument("--no-auth", action="store_true", help="listen beyond loopback without a token "
                        "(a trusted network only)")
    parser.add_argument("--max-body-mb", type=float, default=64, help="largest request body accepted, in MB (default 64)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image, width x height (default {MAX_PIXELS})")
    parser.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS,
                        help=f"most pixels in all the images of one request (default {MAX_REQUEST_PIXELS})")
    parser.add_argument("--max-connections", type=int, default=32,
                        help="connections served at once; one more is answered 503 (default 32)")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a connection may wait for its request, and the request take to arrive, "
                        "headers and body (default 30)")
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> str | None:
    """The token to require (None: none); UserError (one line) for arguments that do not hold together."""
    from rlfuse.errors import UserError

    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    if token is not None and args.no_auth:
        raise UserError(f"--no-auth with a token (--token or {TOKEN_ENV}): drop one of them")
    if token is not None:
        try:
            check_token(token, "--token" if args.token is not None else TOKEN_ENV)
        except ValueError as error:
            raise UserError(str(error)) from None
    if token is None and not args.no_auth and not is_loopback(args.host):
        raise UserError(f"--host {args.host}: other machines could score with this reward unasked; set {TOKEN_ENV} "
                        f"(or --token) to a secret, or pass --no-auth on a trusted network")
    if args.max_pixels < 1 or args.max_request_pixels < args.max_pixels:
        raise UserError(f"--max-pixels {args.max_pixels}, --max-request-pixels {args.max_request_pixels}: need "
                        f"1 <= --max-pixels <= --max-request-pixels")
    if args.max_body_mb <= 0 or args.max_connections < 1 or args.read_timeout <= 0:
        raise UserError("--max-body-mb, --max-connections and --read-timeout must be positive")
    return token


def main() -> None:
    from rlfuse.cli import check_overrides, fail
    from rlfuse.errors import UserError

    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad = [o for o in args.overrides if not o.startswith("reward")]
    if bad:
        fail(f"{bad[0]}: only reward=<name> and reward.* overrides apply to the reward server")
    try:
        token = check_args(args)
        from rlfuse.config import build_reward

        cfg = check_overrides("train", list(args.overrides))
        reward_fn = build_reward(cfg.reward.fn, "reward.fn", f"reward={cfg.reward.name}")
    except UserError as error:
        fail(str(error).strip().splitlines()[0])
    try:
        server = serve(reward_fn, cfg.reward.name, args.host, args.port, token, int(args.max_body_mb * 2**20),
                       args.max_pixels, args.max_request_pixels, args.max_connections,
                       idle_timeout=args.read_timeout, request_timeout=args.read_timeout)
    except OSError as error:
        fail(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({error.strerror}); pick another port")
    log.info("serving reward=%s on http://%s:%d (POST /score, GET /health; %s)", cfg.reward.name,
             *server.server_address[:2], "token required" if token else "no token")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
