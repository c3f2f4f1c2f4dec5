"""An HTTP/1.1 server with bounds, for the reward server and the annotation server.

http.server alone serves each connection on a thread of its own with no cap, waits for a slow
client as long as it keeps sending a byte now and then, and answers malformed requests with HTML.
BoundedHTTPServer and JsonRequestHandler add:

- at most `max_connections` connections served at once; one more is answered 503 and closed;
- a connection idle between requests is closed after `idle_timeout` seconds;
- a request, from its first byte to the end of its body, must arrive within `request_timeout`
  seconds: a watcher then shuts the connection's reading side, the blocked read returns, and the
  handler answers 408;
- a body is read only after the headers passed every check (`content_length`, `read_body`); a body
  refused unread is never read in full: after the answer at most `max_body` bytes of it are
  discarded for LINGER_SECONDS, so that a client still sending a body of reasonable size reads the
  answer instead of a connection reset;
- every error, http.server's own included, is one line of JSON: {"error": "..."}.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("rlfuse.http")
LINGER_SECONDS = 2.0
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
_DIGITS = re.compile(r"[0-9]{1,18}")


class BadRequest(Exception):
    """A request refused with a 4xx (400 unless told) and a one-line message."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def is_loopback(host: str) -> bool:
    """True for the addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReadDeadlines:
    """A watcher thread that shuts the reading side of each connection whose request is overdue.

    A read blocked on that connection then returns what has arrived (end of file), so one thread
    bounds every request's total read time, however slowly its client trickles bytes.
    """

    def __init__(self, tick: float = 0.05):
        self._due: dict[socket.socket, float] = {}
        self._expired: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, args=(tick,), daemon=True, name="read-deadlines").start()

    def start(self, connection: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[connection] = time.monotonic() + seconds

    def stop(self, connection: socket.socket) -> bool:
        """Forget the connection; True if its deadline had passed."""
        with self._lock:
            self._due.pop(connection, None)
            expired = connection in self._expired
            self._expired.discard(connection)
        return expired

    def expired(self, connection: socket.socket) -> bool:
        with self._lock:
            return connection in self._expired

    def close(self) -> None:
        self._stopped.set()

    def _watch(self, tick: float) -> None:
        while not self._stopped.wait(tick):
            now = time.monotonic()
            # Under the lock: a handler closes its socket only after stop(), so no descriptor here can
            # have been closed and reused by another connection.
            with self._lock:
                late = [connection for connection, due in self._due.items() if due <= now]
                for connection in late:
                    del self._due[connection]
                    self._expired.add(connection)
                    try:
                        connection.shutdown(socket.SHUT_RD)
                    except OSError:  # the client is gone already
                        pass


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections and deadlines on reads (see the module docstring)."""

    daemon_threads = True
    request_queue_size = 128  # many clients may connect at once; the cap applies once they are accepted

    def __init__(self, address: tuple[str, int], handler: type[JsonRequestHandler], max_connections: int,
                 idle_timeout: float, request_timeout: float):
        if max_connections < 1 or idle_timeout <= 0 or request_timeout <= 0:
            raise ValueError(f"max_connections={max_connections}, idle_timeout={idle_timeout}, "
                             f"request_timeout={request_timeout}: need at least 1 connection and timeouts > 0")
        self.max_connections, self.idle_timeout, self.request_timeout = max_connections, idle_timeout, request_timeout
        self.loopback_only = is_loopback(address[0])
        self.deadlines = ReadDeadlines()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        """Answer 503 from the accepting thread without reading: a fresh socket's send buffer takes
        the few bytes at once, so this never blocks."""
        body = json.dumps({"error": f"the server is busy ({self.max_connections} connections open); "
                                    f"retry in a moment"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                f"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.5)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: socket.socket, client_address) -> None:
        """A connection that failed outside the handlers' own answers: a client that vanished is
        routine (debug); anything else is logged with its traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
        else:
            log.exception("connection from %s failed", client_address)

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.close()


class JsonRequestHandler(BaseHTTPRequestHandler):
    """A request handler whose answers are JSON and whose reads keep to the server's bounds.

    Subclasses set `max_body` and write do_GET / do_POST with `send_json`, `check_host`,
    `content_length` and `read_body`; a BadRequest raised there becomes its one-line answer
    through `answer_error`.
    """

    server: BoundedHTTPServer
    max_body = 2**16

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # every read on the socket, idle waits included
        self.body_unread = False  # a body was refused unread: discard a little of it before closing
        super().setup()

    def handle_one_request(self) -> None:
        try:
            if not self.rfile.peek(1):  # wait for the next request; the client closed the connection
                self.close_connection = True
                return
        except (TimeoutError, OSError):  # idle for idle_timeout seconds
            self.close_connection = True
            return
        self.server.deadlines.start(self.connection, self.server.request_timeout)
        try:
            super().handle_one_request()
        finally:
            if self.server.deadlines.stop(self.connection) or self.body_unread:
                self.close_connection = True

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.server.deadlines.expired(self.connection):  # the headers were cut short by the deadline
            self.send_error(408)
            return False
        return True

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.body_unread:
                self._linger()

    def _linger(self) -> None:
        """After answering, discard at most max_body bytes of a refused body for LINGER_SECONDS, then
        let the connection close: closing with unread bytes would reset it, and the client, still
        sending, would see the reset instead of the answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            end, left = time.monotonic() + LINGER_SECONDS, self.max_body
            while left > 0 and time.monotonic() < end:
                chunk = self.connection.recv(min(2**16, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    # -- answers ---------------------------------------------------------------------------------

    def send_json(self, code: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self.send_body(code, json.dumps(payload).encode(), "application/json", headers)

    def send_body(self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client left
            self.close_connection = True

    def answer_error(self, error: BadRequest, headers: dict[str, str] | None = None) -> None:
        self.send_json(error.code, {"error": str(error)}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long, ...) as one-line JSON."""
        self.close_connection = True
        self.body_unread = True
        reason = message or self.responses.get(code, ("error",))[0]
        if code == 408 or self.server.deadlines.expired(self.connection):  # a request cut short by its deadline
            code, reason = 408, f"the request did not arrive within {self.server.request_timeout:g} s; send it at once"
        try:
            self.send_json(code, {"error": reason})
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's naming)
        log.debug(format, *args)

    # -- checks and reads ------------------------------------------------------------------------

    def check_host(self) -> None:
        """On a loopback address, answer only requests addressed to it: a web page whose own name was
        re-pointed at 127.0.0.1 (DNS rebinding) must not reach the server through the browser."""
        host = self.headers.get("Host")
        if not self.server.loopback_only or host is None:
            return
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:  # e.g. an unclosed [ipv6
            name = None
        if name not in _LOOPBACK_NAMES:
            self.refuse_body()
            port = self.server.server_address[1]
            raise BadRequest(f"Host {host!r} is not this server; use http://127.0.0.1:{port}/", 403)

    def check_json_body(self) -> None:
        """415 unless the body is declared application/json: another site's page can post text/plain
        here without asking, while application/json needs a CORS preflight, which is refused."""
        if self.headers.get_content_type() != "application/json":
            self.refuse_body()
            raise BadRequest("send the body as Content-Type: application/json", 415)

    def content_length(self, required: bool = True) -> int:
        """The declared body length: 411 if missing (when required), malformed, negative or chunked;
        400 if given twice; 413 over max_body (the body is not read)."""
        if self.headers.get("Transfer-Encoding"):
            self.refuse_body()
            raise BadRequest("chunked bodies are not supported; send a Content-Length", 411)
        values = self.headers.get_all("Content-Length") or []
        if len(values) > 1:
            self.refuse_body()
            raise BadRequest("Content-Length given more than once; send it once", 400)
        if not values and not required:
            return 0
        if not values or not _DIGITS.fullmatch(values[0].strip()):
            self.refuse_body()
            raise BadRequest("a Content-Length header (a byte count) is required", 411)
        length = int(values[0])
        if length > self.max_body:
            self.refuse_body()
            raise BadRequest(f"body of {length} bytes is over the limit of {self.max_body}", 413)
        return length

    def refuse_body(self) -> None:
        """The body (if any) will not be read: close the connection after the answer."""
        self.close_connection = True
        self.body_unread = True

    def read_body(self, length: int) -> bytes:
        """Read exactly `length` bytes within the request's deadline; 408 if the client is too slow,
        400 if it closed early."""
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body, timed_out = b"", True
        else:
            timed_out = self.server.deadlines.expired(self.connection)
        if len(body) == length:
            return body
        self.close_connection = True
        if timed_out:
            raise BadRequest(f"the body did not arrive within {self.server.request_timeout:g} s (Content-Length "
                             f"{length}); send the whole body at once", 408)
        raise BadRequest(f"the body ended after {len(body)} of {length} bytes (Content-Length); "
                         f"send as many bytes as declared")
