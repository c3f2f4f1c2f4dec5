"""Helpers for the annotator's tests: dataset folders as rlfuse.sample writes them, an HTTP client."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rlfuse.toy.world import render, scene_for_prompt

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
WRONG = ["a blue square", "two green triangles", "a yellow circle to the left of a red square"]
COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (230, 200, 40), (150, 60, 170), (30, 30, 30), (240, 240, 240)]


def write_dataset(root: Path, prompts: list[str] = PROMPTS, k_images: int = 4, shapes: bool = False) -> Path:
    """A dataset folder: K small PNGs per prompt (a coloured square on grey, one colour per image)
    and a manifest in the contract's format, with keys the annotator must ignore. With shapes, the
    images are scenes of the toy shapes world at 64 px, every other one of a wrong caption."""
    (root / "images").mkdir(parents=True)
    groups = []
    for g, prompt in enumerate(prompts):
        images = []
        for k in range(k_images):
            if shapes:
                caption = prompt if k % 2 == 0 else WRONG[(g + k) % len(WRONG)]
                image = Image.fromarray(render(scene_for_prompt(caption, np.random.default_rng(10 * g + k), 64)))
            else:
                image = Image.new("RGB", (32, 32), (128, 128, 128))
                image.paste(COLOURS[k % len(COLOURS)], (4 + g, 4 + g, 28, 28))
            name = f"images/{g:04d}-{k}.png"
            image.save(root / name)
            sha = hashlib.sha256((root / name).read_bytes()).hexdigest()
            images.append({"id": f"{g:04d}-{k}", "file": name, "sha256": sha})
        groups.append({"index": g, "prompt": prompt, "seed": 100 + g, "images": images})
    manifest = {"format": "rlfuse-feedback", "version": 1, "images_per_prompt": k_images, "groups": groups,
                "files": {}, "model": "toy", "sampler": {"steps": 20, "eta": 1.0}, "created": "2025-01-01T00:00:00Z"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


class Client:
    """A tiny HTTP client: request() -> (status, parsed JSON or raw bytes)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, object]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            headers = {"Content-Type": "application/json"} if headers is None and data is not None else headers
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(payload)
        return response.status, payload

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: object):
        return self.request("POST", path, body=body)


def start_server_process(folder: Path, task: str = "best") -> tuple[subprocess.Popen, Client]:
    """`python -m rlfuse.annotate folder --port 0` as a subprocess; returns it once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "rlfuse.annotate", str(folder), "--task", task, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "annotating ...: open http://127.0.0.1:PORT/"
    match = re.search(r"http://([\d.]+):(\d+)/", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r} {process.stderr.read()!r}")
    return process, Client(match.group(1), int(match.group(2)))
