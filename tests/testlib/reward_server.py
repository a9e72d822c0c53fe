"""A real local HTTP reward endpoint for tests of ``reward.remote_url``, scripted per request.

    with RewardServer() as server:
        server.script = [fail(500)]        # the first request gets a 500, later ones are scored
        RemoteRewardScorer(server.url)(prompts, responses, samples)

Scored requests get ``score(response) = len(response) / 10`` for every response; each
such reply is kept in ``server.replies``, each request body in ``server.requests``.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Reply = tuple[int, bytes]  # (HTTP status, body)
Behaviour = Callable[[dict], Reply]


def score(response: str) -> float:
    return len(response) / 10


def fail(status: int, text: str = "backend overloaded") -> Behaviour:
    return lambda body: (status, text.encode())


def hang(seconds: float) -> Behaviour:
    """Answer only after ``seconds`` (longer than the client's timeout: the client has given up)."""
    def behave(body: dict) -> Reply:
        time.sleep(seconds)
        return 503, b"too late"
    return behave


def raw(payload: bytes) -> Behaviour:
    return lambda body: (200, payload)


def reply(obj) -> Behaviour:
    return lambda body: (200, json.dumps(obj).encode())


class RewardServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (free port) serving POST in a daemon thread."""

    def __init__(self):
        self.requests: list[dict] = []  # every request body, in arrival order
        self.replies: list[list[float]] = []  # the rewards of every scored (200) reply, in order
        self.script: list[Behaviour] = []  # how the next requests are answered; then they are scored
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    behave = server.script.pop(0) if server.script else server._score
                status, payload = behave(body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_port}/score"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _score(self, body: dict) -> Reply:
        rewards = [score(r) for r in body["responses"]]
        with self._lock:
            self.replies.append(rewards)
        return 200, json.dumps(rewards).encode()

    def stop(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.stop()
