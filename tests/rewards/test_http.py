"""reward=http against the reference server on loopback: same scores as in-process, clear errors when
the server is down or misbehaves, and the server refuses bad requests without storing anything."""

import base64
import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlfuse.reward_server import serve
from rlfuse.rewards.http import HttpReward, encode_png, to_uint8
from rlfuse.rewards.jpeg import JpegReward
from rlfuse.rewards.shapes import ShapesReward


@pytest.fixture
def jpeg_server():
    server = serve(JpegReward(), "jpeg", port=0, max_body=2**20)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_server(answers: list[tuple[int, bytes]]):
    """A server answering POSTs with the given (status, body) in turn, the last one forever."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answers[min(len(calls), len(answers) - 1)]
            calls.append(status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


def test_scores_over_http_equal_the_reward_in_process_across_batches(jpeg_server):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = [f"p{i}" for i in range(5)]
    client = HttpReward(jpeg_server, batch_size=2)  # 3 requests
    client.check_ready()
    torch.testing.assert_close(client(images, prompts).scores, JpegReward()(images, prompts).scores)


def test_server_down_fails_at_start_up_and_mid_run_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="no reward server answers"):
        HttpReward(url).check_ready()
    with pytest.raises(RuntimeError, match="failed after 3 attempt"):
        HttpReward(url, retries=2, backoff=0.01)(torch.rand(1, 3, 8, 8), ["p"])


@pytest.mark.parametrize("status", [503, 408])
def test_a_server_error_or_a_timed_out_upload_is_retried_and_the_answer_used(status):
    server, calls = fake_server([(status, b'{"error": "busy"}'), (200, b'{"rewards": [0.25]}')])
    try:
        reward = HttpReward(f"http://127.0.0.1:{server.server_address[1]}", retries=2, backoff=0.01)
        assert reward(torch.rand(1, 3, 8, 8), ["p"]).scores.tolist() == [0.25]
        assert calls == [status, 200]
    finally:
        server.shutdown()


@pytest.mark.parametrize("status, body, message", [
    (200, b"not json", "malformed JSON"),
    (200, b'{"scores": [1]}', "list of numbers under 'rewards'"),
    (200, b'{"rewards": ["high"]}', "list of numbers under 'rewards'"),
    (200, b'{"rewards": [1, 2]}', "returned 2 rewards for 1 images"),
    (400, b'{"error": "bad prompt"}', "HTTP 400: bad prompt"),
    (413, b'{"error": "images[0] is 12000x12000"}', "HTTP 413: images"),
])
def test_malformed_answers_are_clear_errors(status, body, message):
    server, calls = fake_server([(status, body)])
    try:
        with pytest.raises(RuntimeError, match=message):
            HttpReward(f"http://127.0.0.1:{server.server_address[1]}", retries=2, backoff=0.01)(
                torch.rand(1, 3, 8, 8), ["p"])
        assert len(calls) == 1, "a malformed answer or a 4xx is not retried"
    finally:
        server.shutdown()


def post(url: str, body: bytes, path: str = "/score") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png() -> str:
    return encode_png(to_uint8(torch.rand(1, 3, 8, 8))[0])


@pytest.mark.parametrize("body, status, message", [
    (b"{nope", 400, "not JSON"),
    (json.dumps({"prompts": ["a"]}).encode(), 400, "expected"),
    (json.dumps({"prompts": ["a", "b"], "images": ["x"]}).encode(), 400, "one prompt per image"),
    (json.dumps({"prompts": [1], "images": ["x"]}).encode(), 400, "must be a string"),
    (json.dumps({"prompts": ["a"], "images": ["%%%"]}).encode(), 400, "images[0] is not base64"),
    (json.dumps({"prompts": ["a"], "images": [3]}).encode(), 400, "every image must be a base64 string"),
    (json.dumps({"prompts": ["a"], "images": [base64.b64encode(b"text").decode()]}).encode(), 400, "images[0]"),
    (b"x" * (2**20 + 1), 413, "over the limit"),
])
def test_the_server_refuses_bad_requests(jpeg_server, body, status, message):
    code, answer = post(jpeg_server, body)
    assert code == status and message in answer["error"]


def test_the_server_answers_unknown_paths_and_reward_refusals_with_4xx():
    server = serve(ShapesReward(), "shapes", port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, answer = post(url, json.dumps({"prompts": ["a cat"], "images": [png()]}).encode())
        assert code == 422 and "outside the shapes grammar" in answer["error"]
        code, answer = post(url, b"{}", path="/../../etc/passwd")
        assert code == 404
        code, answer = post(url, json.dumps({"prompts": ["a red circle"], "images": [png()]}).encode())
        assert code == 200 and len(answer["rewards"]) == 1
    finally:
        server.shutdown()


def test_the_server_command_serves_a_reward_and_refuses_bad_arguments_in_one_line():
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "-m", "rlfuse.reward_server", "seed=3"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "only reward=<name> and reward.* overrides" in bad.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rlfuse.reward_server", "reward=jpeg", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reward = HttpReward(f"http://127.0.0.1:{port}")
        for _ in range(120):  # wait for it to listen (imports take a few seconds)
            try:
                reward.check_ready()
                break
            except ValueError:
                time.sleep(0.5)
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(reward(images, ["a", "b"]).scores, JpegReward()(images, ["a", "b"]).scores)
    finally:
        server.terminate()
        server.wait(timeout=30)
