"""A raw HTTP exchange for the server tests: bytes exactly as given (malformed requests included)."""

from __future__ import annotations

import json
import socket


def raw_exchange(host: str, port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send bytes, read the answer until the server closes: (status, JSON body)."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)
