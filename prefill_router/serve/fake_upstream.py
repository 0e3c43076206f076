"""A scriptable fake OpenAI-compatible server for tests and benchmarks: a real HTTP server on 127.0.0.1.

It serves `POST /v1/chat/completions` (plain JSON or SSE streaming when the request has `"stream": true`)
and `GET /v1/models`, on an ephemeral port, from a background thread. Nothing is mocked on the client side:
whatever talks to it goes through real sockets.

Usage:

    from prefill_router.serve.fake_upstream import FakeUpstream, Answer, Fail, Stall, Drop, Raw

    with FakeUpstream() as up:                      # starts on 127.0.0.1:<free port>
        up.base_url                                 # "http://127.0.0.1:PORT/v1" -> put it in a target config
        up.default = Answer("The answer is (B).")   # what every request gets when nothing is scripted
        up.script(Fail(503), Answer("ok"))          # the next two requests, in order, for any model
        up.script(Fail(429, retry_after=1), model="gpt-x")  # only for requests whose "model" is gpt-x
        ...
        up.calls()                                  # how many chat requests arrived (all models)
        up.calls("gpt-x")                           # ... for one model
        up.requests[-1].body                        # the JSON body received (also .model, .headers, .path)
        up.disconnects                              # streams the client abandoned before the end

Behaviours (one is consumed per request; a model's own queue is used before the shared queue, then `default`):

    Answer(content, delay_s=0, chunk_delay_s=0, prompt_tokens=None, completion_tokens=None, finish_reason="stop",
           cut_after=None)
        A normal completion. `content` may be a string or a function `body -> str`, so an answer can depend
        on the prompt (e.g. right for some questions and wrong for others). `delay_s` waits before the
        response starts (simulated model latency); streaming sends one chunk per word, `chunk_delay_s` apart.
        Token counts default to len(text)//4 of the prompt and the number of words of the answer.
        `cut_after=n` makes a stream break off after n chunks (the connection is dropped mid-stream).
        `tool_calls=[{"name": ..., "arguments": "<json>"}]` answers with function calls instead of (or with) text.
    Fail(status=500, message=..., retry_after=None)
        An OpenAI-style error body {"error": {...}} with that status; `retry_after` sets the Retry-After header.
    Stall(seconds, then=None)
        Sleeps `seconds` before answering with `then` (default: `default`) — makes a client time out.
    Drop()
        Closes the connection without sending anything — the client sees a connection error.
    Raw(status=200, body="not json", content_type="text/plain")
        Sends exactly this body, for testing how a client copes with garbage (or a 302 with a Location header,
        or a huge body).
    Drip(seconds, then=None, every_s=0.25)
        Sends the status line and headers of `then` (an Answer; default: a plain one) at once, then its body
        in pieces `every_s` apart, spread over `seconds`: every read is fast, the whole reply is slow.

Answer, Fail and Raw take `headers={...}`, extra response headers (e.g. Set-Cookie, Location);
`Fail(echo_key=True)` puts the Authorization header it received into its error message, as some APIs do.

Run it by hand (to try the gateway without API keys, for curl experiments or a load test):
`prefill-router fake-upstream --port 8001 --delay 0.05`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass
class Answer:
    content: str | Callable[[dict], str] = "Hello from the fake upstream."
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"
    cut_after: int | None = None  # streaming only: drop the connection after this many chunks
    headers: dict[str, str] | None = None  # extra response headers

    # Function calls to answer with, e.g. [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]: the
    # reply then carries message.tool_calls (streamed as tool_calls deltas) and finish_reason "tool_calls".
    tool_calls: list[dict] | None = None

    def text(self, body: dict) -> str:
        return self.content(body) if callable(self.content) else self.content

    def tool_call_list(self) -> list[dict]:
        return [{"id": f"call_{i}", "type": "function",
                 "function": {"name": c["name"], "arguments": c.get("arguments", "{}")}}
                for i, c in enumerate(self.tool_calls or [])]

    def finish(self) -> str:
        return "tool_calls" if self.tool_calls and self.finish_reason == "stop" else self.finish_reason


@dataclass
class Fail:
    status: int = 500
    message: str = "fake upstream failure"
    retry_after: float | None = None
    headers: dict[str, str] | None = None
    echo_key: bool = False  # append the received Authorization header to the message


@dataclass
class Stall:
    seconds: float
    then: Behaviour | None = None


@dataclass
class Drop:
    pass


@dataclass
class Raw:
    status: int = 200
    body: str = "not json"
    content_type: str = "text/plain"
    headers: dict[str, str] | None = None


@dataclass
class Drip:
    seconds: float
    then: Answer | None = None
    every_s: float = 0.25


Behaviour = Answer | Fail | Stall | Drop | Raw | Drip


@dataclass
class Received:
    path: str
    model: str | None
    body: dict | None
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


def _prompt_chars(body: dict) -> int:
    total = 0
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # content parts
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return total


class FakeUpstream:
    """A real OpenAI-compatible HTTP server on 127.0.0.1 whose answers and failures a test scripts."""

    def __init__(self, default: Behaviour | None = None, *, port: int = 0, name: str = "fake",
                 host: str = "127.0.0.1"):
        self.default: Behaviour = default or Answer()
        self.name = name
        self.host = host
        self.requests: list[Received] = []
        self.disconnects = 0
        self.completed_streams = 0
        self._port = port
        self._lock = threading.Lock()
        self._shared: deque[Behaviour] = deque()
        self._per_model: dict[str, deque[Behaviour]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- scripting -------------------------------------------------------------------------------
    def script(self, *behaviours: Behaviour, model: str | None = None) -> FakeUpstream:
        """Queue behaviours for the next requests (for one upstream model name, or for any)."""
        with self._lock:
            queue = self._shared if model is None else self._per_model.setdefault(model, deque())
            queue.extend(behaviours)
        return self

    def reset(self) -> None:
        """Forget scripted behaviours and recorded requests (the default behaviour stays)."""
        with self._lock:
            self._shared.clear()
            self._per_model.clear()
            self.requests.clear()
            self.disconnects = 0
            self.completed_streams = 0

    def calls(self, model: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests
                       if r.path.endswith("/chat/completions") and (model is None or r.model == model))

    def _next(self, model: str | None) -> Behaviour:
        with self._lock:
            queue = self._per_model.get(model or "")
            if queue:
                return queue.popleft()
            if self._shared:
                return self._shared.popleft()
            return self.default

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        upstream: FakeUpstream = self

        class Handler(_Handler):
            owner = upstream

        self._server = ThreadingHTTPServer((self.host, self._port), Handler)
        self._server.daemon_threads = True
        # A short poll interval so stop() returns quickly.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-upstream-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real API server
    owner: FakeUpstream

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": self.owner.name, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": None}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        with self.owner._lock:
            self.owner.requests.append(Received(self.path, model, body, dict(self.headers.items())))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": None}})
            return
        if not isinstance(body, dict):
            self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error",
                                       "code": None}})
            return
        self._behave(self.owner._next(model), body)

    def _behave(self, behaviour: Behaviour, body: dict) -> None:
        if isinstance(behaviour, Stall):
            time.sleep(behaviour.seconds)
            behaviour = behaviour.then or self.owner.default
            if isinstance(behaviour, Stall):  # a stall's follow-up is never another stall
                behaviour = Answer()
        if isinstance(behaviour, Drop):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if isinstance(behaviour, Raw):
            self._send(behaviour.status, behaviour.body.encode(), behaviour.content_type, behaviour.headers)
            return
        if isinstance(behaviour, Fail):
            extra = dict(behaviour.headers or {})
            if behaviour.retry_after is not None:
                extra["Retry-After"] = str(behaviour.retry_after)
            message = behaviour.message
            if behaviour.echo_key:
                message += f" (key: {self.headers.get('Authorization', '')})"
            self._json(behaviour.status, {"error": {"message": message, "type": "upstream_error",
                                                    "code": behaviour.status}}, extra)
            return
        drip = None
        if isinstance(behaviour, Drip):
            drip = (behaviour.seconds, behaviour.every_s)
            behaviour = behaviour.then if isinstance(behaviour.then, Answer) else Answer()
        if behaviour.delay_s:
            time.sleep(behaviour.delay_s)
        text = behaviour.text(body)
        prompt_tokens = behaviour.prompt_tokens if behaviour.prompt_tokens is not None else _prompt_chars(body) // 4
        completion_tokens = (behaviour.completion_tokens if behaviour.completion_tokens is not None
                             else len(text.split()))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if body.get("stream") and drip is None:
            self._stream(body, text, behaviour, usage)
            return
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": None if behaviour.tool_calls and not text else text,
                                                 **({"tool_calls": behaviour.tool_call_list()}
                                                    if behaviour.tool_calls else {})},
                         "finish_reason": behaviour.finish()}],
            "usage": usage,
        }, behaviour.headers, drip=drip)

    def _stream(self, body: dict, text: str, behaviour: Answer, usage: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in (behaviour.headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body.get("model")}
        words = text.split(" ")
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        events += [{**base, "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w},
                                         "finish_reason": None}]} for i, w in enumerate(words)]
        if behaviour.tool_calls and not text:
            events = events[:1]  # a tool-call-only answer has no content deltas
        events += [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, **call}]},
                                         "finish_reason": None}]}
                   for i, call in enumerate(behaviour.tool_call_list())]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": behaviour.finish()}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        try:
            for i, event in enumerate(events):
                if i and behaviour.chunk_delay_s:
                    time.sleep(behaviour.chunk_delay_s)
                if behaviour.cut_after is not None and i >= behaviour.cut_after:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # no terminating chunk: a broken stream
                    return
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            with self.owner._lock:
                self.owner.disconnects += 1
            return
        with self.owner._lock:
            self.owner.completed_streams += 1

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict, headers: dict | None = None,
              drip: tuple[float, float] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers, drip)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None,
              drip: tuple[float, float] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if drip:  # headers now, then the body a piece every `every_s` until `seconds` have passed
                seconds, every_s = drip
                self.wfile.flush()
                step = max(1, -(-len(data) // max(1, int(seconds / every_s))))
                for i in range(0, len(data), step):
                    time.sleep(every_s)
                    self.wfile.write(data[i:i + step])
                    self.wfile.flush()
                return
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client gave up (e.g. timed out during a stall)
