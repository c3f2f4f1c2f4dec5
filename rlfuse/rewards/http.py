"""A reward computed by a server on another machine (a VLM judge, a large reward model): the client
posts images and prompts and reads scores back. `python -m rlfuse.reward_server` serves any rlfuse
reward this way.

Protocol (JSON over HTTP):
    GET  /health -> 200 {"status": "ok", "reward": <name>}
    POST /score  {"prompts": [B strings], "images": [B base64 PNGs]} -> 200 {"rewards": [B numbers]}
    errors       4xx / 5xx {"error": "<one line>"}
With a token, every request carries `Authorization: Bearer <token>` (401 without it). The token comes
from reward.fn.token or, when that is null, the environment variable RLFUSE_REWARD_TOKEN (better:
the run folder's config.yaml records reward.fn.token in clear).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image

from rlfuse.rewards.base import RewardOutput
from rlfuse.rewards.jpeg import to_uint8

TOKEN_ENV = "RLFUSE_REWARD_TOKEN"
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII without spaces: it travels in an HTTP header


def check_token(token: str, name: str) -> str:
    """The token, or ValueError (one line) unless it is printable ASCII without spaces."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{name}: a token is printable ASCII without spaces (e.g. from `openssl rand -hex 32`)")
    return token


def encode_png(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 text of its PNG (lossless: the server scores exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class HttpReward:
    """reward = the scores a reward server returns for the images and prompts (the server answers
    scores only, so terms and details are empty).

    Args:
        url: the server's base address, e.g. http://10.0.0.5:8765.
        timeout: seconds to wait for one request.
        retries: further attempts after a failed request (connection error, timeout, 408, 5xx), with
            backoff * 2^k seconds between them; other 4xx answers (a bad request) are not retried.
        batch_size: images per request.
        token: sent as `Authorization: Bearer <token>`; None reads RLFUSE_REWARD_TOKEN, and sends
            nothing if that is unset too.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0, batch_size: int = 16,
                 token: str | None = None):
        if batch_size < 1 or retries < 0 or timeout <= 0:
            raise ValueError(f"batch_size={batch_size}, retries={retries}, timeout={timeout}: need batch_size >= 1, "
                             f"retries >= 0, timeout > 0")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.headers = {"Content-Type": "application/json"}
        if token is None and os.environ.get(TOKEN_ENV):
            token = check_token(os.environ[TOKEN_ENV], TOKEN_ENV)
        elif token is not None:
            token = check_token(str(token), "reward.fn.token")
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"

    def check_ready(self) -> None:
        """Before the run: the server answers /health (ValueError, one line, if not)."""
        request = urllib.request.Request(f"{self.url}/health", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10)) as answer:
                json.loads(answer.read())
        except urllib.error.HTTPError as error:
            if error.code == 401:
                raise ValueError(f"reward.fn.url={self.url!r}: the server wants a token (HTTP 401: {_error_text(error)}); "
                                 f"set {TOKEN_ENV} (or reward.fn.token) to the server's token") from None
            raise ValueError(f"reward.fn.url={self.url!r}: GET /health answered HTTP {error.code} "
                             f"({_error_text(error)}); is this a reward server?") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise ValueError(f"reward.fn.url={self.url!r}: no reward server answers ({reason}); start one with "
                             f"`python -m rlfuse.reward_server reward=<name> --port <port>` or fix the address") from None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """scores: (B,) float32 on the CPU."""
        pixels = to_uint8(images)
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            body = {"prompts": prompts[chunk], "images": [encode_png(image) for image in pixels[chunk]]}
            rewards = self._post(body)
            if len(rewards) != len(body["prompts"]):
                raise RuntimeError(f"reward server {self.url} returned {len(rewards)} rewards for "
                                   f"{len(body['prompts'])} images")
            scores += rewards
        return RewardOutput(torch.tensor(scores, dtype=torch.float32))

    def _post(self, body: dict) -> list[float]:
        data = json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.url}/score", data=data, method="POST", headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    payload = json.loads(answer.read())
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code}: {_error_text(error)}"
                if error.code < 500 and error.code != 408:  # 408: the upload was too slow, which may pass
                    break  # the request itself is wrong: retrying will not help
                continue
            except (urllib.error.URLError, OSError) as error:
                last_error = str(getattr(error, "reason", error))
                continue
            except ValueError:
                raise RuntimeError(f"reward server {self.url} answered with malformed JSON") from None
            rewards = payload.get("rewards") if isinstance(payload, dict) else None
            if not isinstance(rewards, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                        for r in rewards):
                raise RuntimeError(f"reward server {self.url} answered without a list of numbers under 'rewards'")
            return [float(r) for r in rewards]
        raise RuntimeError(f"reward server {self.url} failed after {attempt + 1} attempt(s): {last_error}")


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", "")
    except (ValueError, AttributeError, OSError):
        return error.reason
