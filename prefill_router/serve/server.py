"""Running the gateway: in the foreground (the CLI) or in a background thread (tests, benchmarks, notebooks).

Client connections are bounded with uvicorn's own options where it has them, from the config's `listen`
section: `keep_alive_s` (timeout_keep_alive: idle keep-alive connections), `max_connections`
(limit_concurrency: 503 beyond it), and h11's default 16 KiB cap on a request head. uvicorn has no timeout
for *receiving* a request (its keep-alive timer restarts on every byte, and ASGI code only runs once the
headers are complete), so a stalled or trickling client used to hold its connection, and a file descriptor,
forever. `RequestDeadline` adds one: each request, headers and body, must arrive within
`listen.read_timeout_s` of the connection opening or of the previous reply, or the connection is closed.
The same approach as uvicorn issue #157's proposed --timeout-request-start/-complete.

Logging: query strings never reach the access log (a client may put its key there), and asyncio's
"socket.accept() out of system resource" error, logged with a traceback for every pending connection on
every loop tick once the process is out of file descriptors, is let through once per 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any, Self

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("prefill_router.serve")


# uvicorn binds AutoHTTPProtocol at import time (h11's or httptools' class), so it is no static base class.
class RequestDeadline(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
    """uvicorn's HTTP protocol (h11 or httptools) plus a deadline for receiving each whole request.

    The deadline runs while the connection waits for a request or its body: from the connection opening, or
    from the end of the previous reply (keep-alive). It stops once the request is fully received, so a long
    answer (a stream) is never cut off by it.
    """

    read_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._update_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _receiving(self) -> bool:
        cycle = self.cycle  # the current request's cycle; None before the first request head is complete
        return cycle is None or cycle.response_complete or cycle.more_body

    def _update_deadline(self) -> None:
        if not self._receiving():
            self._cancel_deadline()
        elif self._deadline is None:  # armed once per request: bytes trickling in do not extend it
            self._deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._receiving() and not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request within %gs", self.read_timeout_s)
            self.transport.close()


class _NoQueryString(logging.Filter):
    """Drops the query string from uvicorn's access log lines: a client may send its key as ?api_key=..."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


class _ThrottleAcceptErrors(logging.Filter):
    """Out of file descriptors, asyncio logs "socket.accept() out of system resource" with a traceback for
    every pending connection on every loop tick, and schedules a retry for each; at shutdown every such retry
    then fails with "Exception in callback ..._start_serving". Each kind gets through once per `interval_s`,
    without the traceback, saying how many were dropped."""

    KINDS = ("socket.accept() out of system resource", "Exception in callback BaseSelectorEventLoop._start_serving")

    def __init__(self, interval_s: float = 10.0):
        super().__init__()
        self.interval_s = interval_s
        self._last = dict.fromkeys(self.KINDS, -interval_s)
        self._dropped = dict.fromkeys(self.KINDS, 0)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = next((k for k in self.KINDS if str(record.msg).startswith(k)), None)
        if kind is None:
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._last[kind] < self.interval_s:
                self._dropped[kind] += 1
                return False
            self._last[kind], dropped, self._dropped[kind] = now, self._dropped[kind], 0
        error = record.exc_info[1] if record.exc_info else None
        hint = "; new connections wait: raise the open file limit (ulimit -n)" if kind == self.KINDS[0] else ""
        record.msg = f"{kind} ({type(error).__name__}: {error}){hint} ({dropped} similar lines dropped since the last)"
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _install_log_filters() -> None:
    """Idempotent: uvicorn re-applies its logging config per server, which keeps existing logger filters."""
    for name, kind in (("uvicorn.access", _NoQueryString), ("asyncio", _ThrottleAcceptErrors)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def uvicorn_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "info",
                   **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for the gateway, with client limits from the app's `listen` section (if it has one)."""
    listen = getattr(getattr(app.state, "config", None), "listen", None)
    read_timeout_s = getattr(listen, "read_timeout_s", RequestDeadline.read_timeout_s)
    protocol = type("RequestDeadline", (RequestDeadline,), {"read_timeout_s": read_timeout_s})
    # loop "asyncio", not uvicorn's "auto": uvloop, when some other package installs it (LiteLLM's proxy extra
    # does), handles running out of file descriptors and slow clients differently from what is built and tested
    # here (_ThrottleAcceptErrors, RequestDeadline).
    kwargs.setdefault("loop", "asyncio")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                            timeout_keep_alive=getattr(listen, "keep_alive_s", 5),
                            limit_concurrency=getattr(listen, "max_connections", None), **kwargs)
    _install_log_filters()
    return config


class BackgroundServer:
    """Serve an ASGI app with uvicorn from a daemon thread on 127.0.0.1 (port 0: a free one).

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="prefill-router-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _raise_open_file_limit() -> None:
    """Each client connection holds a file descriptor; the common default soft limit (1,024) is low for a
    gateway, so use the hard limit the system allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):  # not on this platform, or not allowed: keep the limit
        pass


def serve_forever(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run the gateway in the foreground until interrupted."""
    _raise_open_file_limit()
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=5)).run()
