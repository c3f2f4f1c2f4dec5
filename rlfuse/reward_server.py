"""Serve any rlfuse reward over HTTP, for `reward=http` runs on other machines.

    python -m rlfuse.reward_server reward=jpeg --port 8765
    python -m rlfuse.reward_server reward=aesthetic reward.fn.weights=/data/aesthetic.pth --host 0.0.0.0

Overrides are those of rlfuse.train's reward group; the protocol is in rlfuse/rewards/http.py.
Requests are scored one at a time (rewards hold one model); bad requests get a 4xx with a one-line
error and change nothing.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rlfuse.rewards.base import Reward, score

log = logging.getLogger("rlfuse.reward_server")
MAX_IMAGES = 1024


class BadRequest(Exception):
    """A request the server refuses with 400 (or the code given)."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """A /score body -> images (B, 3, H, W) float in [0, 1] and B prompts; BadRequest if malformed."""
    try:
        payload = json.loads(body)
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
    arrays = []
    for i, text in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
            arrays.append(np.asarray(image.convert("RGB")))
        except (binascii.Error, TypeError, ValueError, UnidentifiedImageError, OSError):
            raise BadRequest(f"images[{i}] is not a base64 PNG or JPEG") from None
    if len({a.shape for a in arrays}) != 1:
        raise BadRequest("all images of a request must have the same size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return images, prompts


def make_handler(reward_fn: Reward, name: str, max_body: int) -> type[BaseHTTPRequestHandler]:
    """The request handler: GET /health, and POST /score answered with the scores of `reward_fn`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, {"status": "ok", "reward": name})
            else:
                self._send(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"error": "a Content-Length header is required"})
                return
            if length > max_body:
                # Read and discard the body first (in chunks, nothing kept), or the client, still
                # sending, sees a broken pipe instead of this answer.
                for _ in range(0, length, 2**16):
                    if not self.rfile.read(min(2**16, length)):
                        break
                    length -= 2**16
                self._send(413, {"error": f"body over the limit of {max_body} bytes"})
                self.close_connection = True
                return
            try:
                images, prompts = decode_request(self.rfile.read(length))
                with lock:
                    rewards = score(reward_fn, images, prompts).scores.float().tolist()
            except BadRequest as error:
                self._send(error.code, {"error": str(error)})
                return
            except ValueError as error:  # the reward refused the input (e.g. a prompt outside its grammar)
                self._send(422, {"error": str(error).splitlines()[0]})
                return
            except Exception as error:  # noqa: BLE001 (a failing reward must answer, not hang the client)
                log.exception("reward failed")
                self._send(500, {"error": f"the reward failed: {type(error).__name__}: {error}"})
                return
            self._send(200, {"rewards": rewards})

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.debug(format, *args)

    return Handler


def serve(reward_fn: Reward, name: str, host: str = "127.0.0.1", port: int = 8765,
          max_body: int = 64 * 2**20) -> ThreadingHTTPServer:
    """Start serving in a background thread; returns the server (server.server_address has the port
    actually bound, useful with port 0; call shutdown() to stop)."""
    server = ThreadingHTTPServer((host, port), make_handler(reward_fn, name, max_body))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    from rlfuse.cli import check_overrides, fail
    from rlfuse.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m rlfuse.reward_server", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="reward=<name> and reward.fn.<key>=<value> overrides")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument("--max-body-mb", type=float, default=64, help="largest request body accepted, in MB")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad = [o for o in args.overrides if not o.startswith("reward")]
    if bad:
        fail(f"{bad[0]}: only reward=<name> and reward.* overrides apply to the reward server")
    try:
        from rlfuse.config import build_reward

        cfg = check_overrides("train", list(args.overrides))
        reward_fn = build_reward(cfg.reward.fn, "reward.fn", f"reward={cfg.reward.name}")
    except UserError as error:
        fail(str(error).strip().splitlines()[0])
    try:
        server = serve(reward_fn, cfg.reward.name, args.host, args.port, int(args.max_body_mb * 2**20))
    except OSError as error:
        fail(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({error.strerror}); pick another port")
    log.info("serving reward=%s on http://%s:%d (POST /score, GET /health)", cfg.reward.name, *server.server_address)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
