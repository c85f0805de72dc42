"""A real HTTP receiver on 127.0.0.1 for tests: a ``ThreadingHTTPServer`` in a thread that
records every request it gets and answers each path with the statuses a test scripts for it
(200 once the script is used up)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["LoopbackServer", "Received", "Receiver", "receiver"]


class LoopbackServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1, serving in a daemon thread from the moment it
    is made, with the handler class ``_handler`` returns; ``url`` is its base URL. A subclass
    sets what its handler reads before calling ``__init__``."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError


@dataclass(frozen=True)
class Received:
    """One request as the receiver read it; header names in lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class _Script:
    statuses: list[int]
    delay: float
    headers: dict[str, str]


class Receiver:
    """Records requests and answers them as scripted; ``url(path)`` is where to send them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._scripts: dict[str, _Script] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def script(
        self,
        path: str,
        statuses: list[int],
        *,
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next requests to ``path`` with ``statuses`` in turn, each after
        ``delay`` seconds, with ``headers``; then 200 at once."""
        with self._lock:
            self._scripts[path] = _Script(list(statuses), delay, dict(headers or {}))

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def wait_for(self, path: str, count: int, timeout: float) -> list[Received]:
        """The first ``count`` requests to ``path``, once they have come."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(path)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} requests to {path} in {timeout}s")
            time.sleep(0.05)

    def _answer(self, path: str) -> tuple[int, float, dict[str, str]]:
        with self._lock:
            script = self._scripts.get(path)
            if script is None or not script.statuses:
                return 200, 0.0, {}
            return script.statuses.pop(0), script.delay, script.headers

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver._record(Received(self.command, self.path, headers, body, time.time()))
                status, delay, extra = receiver._answer(self.path)
                time.sleep(delay)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the test reads what was received instead

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A running receiver, stopped after the block."""
    running = Receiver()
    running.start()
    try:
        yield running
    finally:
        running.stop()
