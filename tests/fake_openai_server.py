"""A real HTTP server speaking the OpenAI chat-completions protocol, for tests.

It listens on 127.0.0.1 at a free port (stdlib ``http.server`` in a thread) and answers
``POST /v1/chat/completions`` with scripted replies. The official ``openai`` client talks to it
over HTTP; nothing is patched.

What it answers, per request, in this order:

1. the next action queued with :meth:`FakeOpenAIServer.enqueue` (FIFO, shared by all requests);
2. else ``responder(body, index)`` if one is set (``body`` = the request JSON, ``index`` = 0-based
   request number); it returns an action or a plain string (= a normal reply);
3. else a normal reply ``"echo: <content of the last message>"``.

Actions: :class:`Reply` (normal answer), :class:`Status` (an HTTP error such as 429 or 500, or 401
with a message that may echo the caller's key: ``{api_key}`` in it is replaced by the bearer token sent),
:class:`Slow` (sleep, then another action; use it to exceed the client timeout) and :class:`Raw`
(any body, e.g. malformed JSON or JSON without ``choices``).

Every request is recorded (path, headers, parsed body) in :attr:`FakeOpenAIServer.requests`, so a
test can check e.g. that the ``Authorization`` header arrived.

Run alone (``python tests/fake_openai_server.py --delay 0.3``) it serves until killed and prints its
base URL; the responder then echoes.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    content: str
    finish_reason: str = "stop"
    prompt_tokens: int = 11
    completion_tokens: int | None = None  # default: number of words in content


@dataclass
class Status:
    code: int
    message: str = "scripted error"
    headers: dict = field(default_factory=dict)


@dataclass
class Slow:
    seconds: float
    then: object = None  # an action; None = the default reply


@dataclass
class Raw:
    body: str
    status: int = 200
    content_type: str = "application/json"


@dataclass
class RecordedRequest:
    path: str
    headers: dict
    body: object
    received_at: float


class FakeOpenAIServer:
    def __init__(self, responder=None, delay: float = 0.0):
        self.responder = responder
        self.delay = delay
        """Seconds to sleep before every answer (makes runs slow enough to kill mid-way)."""
        self.requests: list[RecordedRequest] = []
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------
    def enqueue(self, *actions) -> None:
        with self._lock:
            self._queue.extend(actions)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                with server._lock:
                    index = len(server.requests)
                    server.requests.append(RecordedRequest(self.path, dict(self.headers.items()), body, time.time()))
                    action = server._queue.popleft() if server._queue else None
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"unknown path {self.path}", "type": "not_found"}})
                if action is None and server.responder is not None:
                    action = server.responder(body, index)
                if action is None:
                    last = (body or {}).get("messages", [{}])[-1].get("content", "") if isinstance(body, dict) else ""
                    action = Reply(f"echo: {last}")
                if server.delay:
                    time.sleep(server.delay)
                self._act(action, body)

            def _bearer(self) -> str:
                return (self.headers.get("Authorization") or "").removeprefix("Bearer ")

            def _act(self, action, body):
                if isinstance(action, str):
                    action = Reply(action)
                if isinstance(action, Slow):
                    time.sleep(action.seconds)
                    last = body.get("messages", [{}])[-1].get("content", "") if isinstance(body, dict) else ""
                    return self._act(action.then if action.then is not None else Reply(f"echo: {last}"), body)
                if isinstance(action, Status):
                    kind = {429: "rate_limit_exceeded", 401: "invalid_api_key", 403: "permission_denied"}.get(
                        action.code, "server_error")
                    message = action.message.replace("{api_key}", self._bearer())
                    return self._send(action.code, {"error": {"message": message, "type": kind}}, action.headers)
                if isinstance(action, Raw):
                    return self._send_bytes(action.status, action.body.encode("utf-8"), action.content_type)
                if isinstance(action, Reply):
                    completion_tokens = action.completion_tokens
                    if completion_tokens is None:
                        completion_tokens = len(action.content.split())
                    model = body.get("model", "fake-model") if isinstance(body, dict) else "fake-model"
                    return self._send(
                        200,
                        {
                            "id": f"chatcmpl-fake-{int(time.time() * 1e6)}",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": model,
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": action.content},
                                    "finish_reason": action.finish_reason,
                                }
                            ],
                            "usage": {
                                "prompt_tokens": action.prompt_tokens,
                                "completion_tokens": completion_tokens,
                                "total_tokens": action.prompt_tokens + completion_tokens,
                            },
                        },
                    )
                raise TypeError(f"unknown fake-server action {action!r}")

            def _send(self, status, obj, headers=None):
                self._send_bytes(status, json.dumps(obj).encode("utf-8"), "application/json", headers)

            def _send_bytes(self, status, payload, content_type, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- inspection ------------------------------------------------------------------------------
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.rstrip("/").endswith("/chat/completions")]

    def last_user_contents(self) -> list[str]:
        return [r.body["messages"][-1]["content"] for r in self.chat_requests() if isinstance(r.body, dict)]


def main():
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI chat-completions endpoint.")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAIServer(delay=args.delay).start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
