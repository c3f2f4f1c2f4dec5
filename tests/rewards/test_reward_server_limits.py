"""The reward server against bad and hostile requests: decompression bombs refused before decoding,
only PNG and JPEG read, pixel limits, malformed lengths, slow and idle clients released, cross-site
posts and foreign Host names refused, tokens, deep JSON; and a bounded load test."""

from __future__ import annotations

import argparse
import base64
import hmac
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from rlfuse.errors import UserError
from rlfuse.reward_server import check_args, serve
from rlfuse.rewards.http import TOKEN_ENV, HttpReward, encode_png, to_uint8
from rlfuse.rewards.jpeg import JpegReward
from tests import raw_http

# -- helpers ---------------------------------------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit grey PNG declaring width x height that carries a single row of pixels (77 bytes at
    12000 x 12000): a decoder that trusts the header allocates the whole image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row, 9))
            + chunk(b"IEND", b""))


def image_file(size: tuple[int, int], kind: str, seed: int = 0) -> bytes:
    pixels = torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(buffer, format=kind)
    return buffer.getvalue()


def score_body(files: list[bytes]) -> bytes:
    return json.dumps({"prompts": ["p"] * len(files), "images": [base64.b64encode(f).decode() for f in files]}).encode()


def post(url: str, body: bytes, headers: dict | None = None, method: str = "POST", path: str = "/score"):
    headers = {"Content-Type": "application/json"} if headers is None else headers
    request = urllib.request.Request(url + path, data=body if method == "POST" else None, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, json.loads(answer.read()), answer.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send bytes to the server on loopback, read the answer until it closes: (status, JSON body)."""
    return raw_http.raw_exchange("127.0.0.1", port, request, timeout)


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (VmHWM and VmRSS in kB, Threads)."""
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))


def reset_peak_memory(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m rlfuse.reward_server reward=jpeg --port 0 ARGS` as a subprocess, once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "rlfuse.reward_server", "reward=jpeg", "--port", "0", *args],
                               env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()  # "serving reward=jpeg on http://127.0.0.1:PORT ..."
    match = re.search(r"http://[\d.]+:(\d+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, f"http://127.0.0.1:{match.group(1)}"


@pytest.fixture(scope="module")
def limited_server():
    """A server process with a 1 s read timeout and at most 8 connections: (process, url)."""
    process, url = start_server("--read-timeout", "1", "--max-connections", "8")
    yield process, url
    process.kill()
    process.wait()


@pytest.fixture
def jpeg_server():
    servers = []

    def start(**kwargs) -> str:
        server = serve(JpegReward(), "jpeg", port=0, **kwargs)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- images ----------------------------------------------------------------------------------------

def test_a_77_byte_png_declaring_12000x12000_is_refused_with_the_server_growing_under_100_mb(limited_server):
    process, url = limited_server
    assert post(url, score_body([image_file((64, 64), "PNG")]))[0] == 200  # decoding and scoring warmed up
    bomb = png_bomb(12000, 12000)
    assert len(bomb) == 77
    reset_peak_memory(process.pid)
    before = proc_status(process.pid, "VmHWM")
    for file in (bomb, png_bomb(8000, 8000)):  # Pillow warns about the first; the second is under its limit
        status, answer, _ = post(url, score_body([file]))
        assert status == 413 and "--max-pixels" in answer["error"], answer
    growth_mb = (proc_status(process.pid, "VmHWM") - before) / 1024
    print(f"\npeak memory growth under the PNG bombs: {growth_mb:.1f} MB")
    assert growth_mb < 100
    assert post(url, b"", method="GET", path="/health")[0] == 200


@pytest.mark.parametrize("kind", ["GIF", "TIFF", "BMP", "PCX", "ICO"])
def test_only_png_and_jpeg_are_decoded(jpeg_server, kind):
    url = jpeg_server()
    status, answer, _ = post(url, score_body([image_file((32, 32), kind)]))
    assert status == 400 and "only these two formats" in answer["error"]
    jpeg = image_file((32, 32), "JPEG")
    status, answer, _ = post(url, score_body([jpeg]))
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)))).permute(2, 0, 1) / 255
    assert status == 200 and answer["rewards"] == pytest.approx(JpegReward()(pixels[None], ["p"]).scores.tolist())


def test_pixel_limits_per_image_and_per_request_and_the_aspect_ratio(jpeg_server):
    url = jpeg_server(max_pixels=64 * 64, max_request_pixels=3 * 64 * 64)
    cases = [
        ([image_file((65, 64), "PNG")], 413, "images[0] is 65x64, over --max-pixels 4096"),
        ([image_file((64, 64), "PNG", seed) for seed in range(4)], 413, "--max-request-pixels"),
        ([image_file((8, 40), "PNG")], 400, "the longer side may be at most 4 times the shorter"),
        ([image_file((32, 32), "PNG")[:-40]], 400, "images[0] does not decode as PNG"),  # truncated
        ([image_file((32, 32), "PNG"), image_file((16, 16), "PNG")], 400, "the same size"),
    ]
    for files, code, words in cases:
        status, answer, _ = post(url, score_body(files))
        assert status == code and words in answer["error"], (words, answer)
    assert post(url, score_body([image_file((64, 64), "PNG", seed) for seed in range(3)]))[0] == 200


# -- HTTP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", ["-1", "abc", "+5", "1e3", "0x10", ""])
def test_a_negative_or_malformed_content_length_is_411(limited_server, length):
    _, url = limited_server
    body = score_body([image_file((16, 16), "PNG")])
    request = (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {length}\r\n\r\n").encode() + body
    status, answer = raw_exchange(port_of(url), request)
    assert status == 411 and "Content-Length" in answer["error"]


def test_two_content_lengths_are_400(limited_server):
    _, url = limited_server
    request = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}")
    status, answer = raw_exchange(port_of(url), request)
    assert status == 400 and "more than once" in answer["error"]


def test_a_body_shorter_than_its_length_is_408_from_a_silent_client_and_400_from_one_that_closed(limited_server):
    _, url = limited_server
    head = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"prompts\"")
    start = time.monotonic()
    status, answer = raw_exchange(port_of(url), head)  # then silent, connection open
    assert status == 408 and "within 1 s" in answer["error"] and time.monotonic() - start < 3
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as connection:
        connection.sendall(head)
        connection.shutdown(socket.SHUT_WR)  # the client gives up mid-body
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400") and b"ended after 10 of 1000 bytes" in reply


def test_idle_and_trickling_connections_are_released_within_the_timeout_and_the_cap_holds(limited_server):
    process, url = limited_server
    port = port_of(url)
    time.sleep(0.3)  # earlier tests' connections finish
    baseline = proc_status(process.pid, "Threads")
    trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    for connection in trickling:  # accepted first: these six take slots
        connection.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]  # two slots left for these
    stop = threading.Event()

    def trickle() -> None:  # a header byte every 0.2 s: each read is quick, the request never ends
        while not stop.wait(0.2):
            for connection in trickling:
                try:
                    connection.sendall(b"x")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        time.sleep(0.4)
        held = proc_status(process.pid, "Threads") - baseline
        assert 0 < held <= 8, f"{held} threads for 12 connections with --max-connections 8"
        for connection in idle + trickling:
            connection.settimeout(4)
        answers = [connection.recv(65536) for connection in trickling + idle]  # all within the timeout
        codes = [int(answer.split()[1]) if answer else "closed" for answer in answers]
        assert codes == [408] * 6 + ["closed"] * 2 + [503] * 4, codes  # beyond the cap: 503 at once
        deadline = time.monotonic() + 3
        while proc_status(process.pid, "Threads") > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc_status(process.pid, "Threads") <= baseline
    finally:
        stop.set()
        for connection in idle + trickling:
            connection.close()
    assert post(url, b"", method="GET", path="/health")[0] == 200


def test_a_cross_site_form_post_is_415_and_a_foreign_host_on_loopback_403(jpeg_server):
    url = jpeg_server()
    body = score_body([image_file((16, 16), "PNG")])
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, answer, _ = post(url, body, {"Content-Type": kind})
        assert status == 415 and "Content-Type: application/json" in answer["error"]
    status, answer, _ = post(url, body, {"Content-Type": "application/json", "Host": "evil.example"})
    assert status == 403 and "is not this server" in answer["error"]
    status, answer, _ = post(url, b"", {"Host": f"attacker.example:{port_of(url)}"}, method="GET", path="/health")
    assert status == 403
    assert post(url, body, {"Content-Type": "application/json", "Host": f"localhost:{port_of(url)}"})[0] == 200


def test_deeply_nested_json_is_400(jpeg_server):
    url = jpeg_server()
    for body in (b"[" * 100_000, b'{"prompts": ' + b"[" * 50_000 + b"]" * 50_000 + b', "images": []}'):
        status, answer, _ = post(url, body)
        assert status == 400 and "nested too deep" in answer["error"]


# -- tokens ----------------------------------------------------------------------------------------

def test_with_a_token_every_request_carries_it_compared_in_constant_time(jpeg_server, monkeypatch):
    compared = []
    constant_time = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or constant_time(a, b))
    url = jpeg_server(token="s3cret-token")
    body = score_body([image_file((16, 16), "PNG")])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Bearer s3cret-token "}):
        status, answer, reply_headers = post(url, body, {"Content-Type": "application/json", **headers})
        assert status == 401 and TOKEN_ENV in answer["error"] and reply_headers["WWW-Authenticate"] == "Bearer"
    assert post(url, b"", {}, method="GET", path="/health")[0] == 401
    assert len(compared) == 5
    right = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-token"}
    assert post(url, body, right)[0] == 200
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = JpegReward()(images, ["a"] * 3).scores
    with pytest.raises(ValueError, match="wants a token"):
        HttpReward(url).check_ready()
    torch.testing.assert_close(HttpReward(url, token="s3cret-token")(images, ["a"] * 3).scores, expected)
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    HttpReward(url).check_ready()
    torch.testing.assert_close(HttpReward(url)(images, ["a"] * 3).scores, expected)
    with pytest.raises(ValueError, match="printable ASCII"):
        HttpReward(url, token="two words")


def test_reward_http_sends_reward_fn_token_and_a_missing_one_stops_the_start_up(jpeg_server, monkeypatch):
    from rlfuse.cli import check_overrides
    from rlfuse.config import build_reward

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    url = jpeg_server(token="s3cret-token")
    cfg = check_overrides("train", ["reward=http", f"reward.fn.url={url}", "reward.fn.token=s3cret-token"])
    reward = build_reward(cfg.reward.fn, "reward.fn", "reward=http")  # checks /health with the token
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(reward(images, ["a", "b"]).scores, JpegReward()(images, ["a", "b"]).scores)
    cfg = check_overrides("train", ["reward=http", f"reward.fn.url={url}"])
    assert cfg.reward.fn.token is None
    with pytest.raises(UserError, match=f"reward=http: .* wants a token .* set {TOKEN_ENV}"):
        build_reward(cfg.reward.fn, "reward.fn", "reward=http")


def server_args(**changes) -> argparse.Namespace:
    defaults = {"host": "127.0.0.1", "token": None, "no_auth": False, "max_pixels": 100, "max_request_pixels": 100,
                "max_body_mb": 1.0, "max_connections": 1, "read_timeout": 1.0}
    return argparse.Namespace(**{**defaults, **changes})


def test_listening_beyond_loopback_needs_a_token_or_no_auth(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match=f"--host 0.0.0.0: .* set {TOKEN_ENV} .* or pass --no-auth"):
        check_args(server_args(host="0.0.0.0"))
    assert check_args(server_args(host="0.0.0.0", no_auth=True)) is None
    assert check_args(server_args(host="0.0.0.0", token="abc")) == "abc"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert check_args(server_args(host="10.0.0.5")) == "from-env"
    with pytest.raises(UserError, match="drop one"):
        check_args(server_args(no_auth=True))
    with pytest.raises(UserError, match="printable ASCII"):
        check_args(server_args(token="héllo"))
    with pytest.raises(UserError, match="--max-pixels"):
        check_args(server_args(max_pixels=200))


def test_the_command_refuses_to_listen_beyond_loopback_without_a_token_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    result = subprocess.run([sys.executable, "-m", "rlfuse.reward_server", "reward=jpeg", "--host", "0.0.0.0"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--no-auth" in result.stderr and TOKEN_ENV in result.stderr


# -- load ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sixteen_clients_fifty_requests_each_all_answered_correctly():
    process, url = start_server(env={TOKEN_ENV: "load-test"})
    clients, requests = 16, 50
    batches = [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    expected = [JpegReward()(batch, ["p"] * 4).scores for batch in batches]
    bodies = [json.dumps({"prompts": ["p"] * 4, "images": [encode_png(image) for image in to_uint8(batch)]}).encode()
              for batch in batches]
    headers = {"Content-Type": "application/json", "Authorization": "Bearer load-test"}

    def client(worker: int) -> list[bool]:
        correct = []
        for n in range(requests):
            status, answer, _ = post(url, bodies[(worker + n) % 8], headers)
            correct.append(status == 200 and torch.allclose(torch.tensor(answer["rewards"]),
                                                            expected[(worker + n) % 8]))
        return correct

    try:
        post(url, bodies[0], headers)
        reset_peak_memory(process.pid)
        start_rss = proc_status(process.pid, "VmRSS") / 1024
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [ok for result in pool.map(client, range(clients)) for ok in result]
        seconds = time.perf_counter() - start
        peak = proc_status(process.pid, "VmHWM") / 1024
        health = post(url, b"", {"Authorization": "Bearer load-test"}, method="GET", path="/health")
    finally:
        process.kill()
        process.wait()
    total = clients * requests
    print(f"\n{total} requests ({4 * total} images of 64 px) from {clients} clients in {seconds:.2f} s: "
          f"{total / seconds:.0f} requests/s; server RSS {start_rss:.0f} MB before, peak {peak:.0f} MB")
    assert results == [True] * total
    assert health[0] == 200 and health[1] == {"status": "ok", "reward": "jpeg"}
