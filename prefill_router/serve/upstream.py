"""Calling the chosen upstream, with one retry and fallback to the next target. Shared by the gateway and `Client`.

Failure rules (the same for streaming and plain requests):
- timeout, connection error, HTTP 408, 429 and 5xx are *transient*: the same target is retried `retries`
  times at once, then the next target in the fallback chain is tried;
- any other 4xx is the *request's* fault (bad parameters, context too long, content policy) and would fail
  the same way everywhere, so it is passed back to the caller unchanged, without retry or fallback;
- when every target in the chain fails, `AllUpstreamsFailed` lists every attempt.
A stream can only fall back before its first byte reaches the client: once the upstream has answered 200,
the response is handed over and later failures end the stream.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from prefill_router.errors import ConfigError
from prefill_router.targets import TargetConfig

TRANSIENT_STATUS = frozenset({408, 429})


def is_transient_status(status: int) -> bool:
    return status in TRANSIENT_STATUS or status >= 500


@dataclass
class Attempt:
    """One failed call: which target, and why (an HTTP status or an exception name)."""

    target: str
    reason: str
    status: int | None = None

    def __str__(self) -> str:
        return f"{self.target}: {self.reason}"


@dataclass
class UpstreamReply:
    """The upstream that answered. For a stream, `response` is open and must be closed by the reader."""

    target: str
    response: httpx.Response
    failed: list[Attempt] = field(default_factory=list)  # earlier attempts that failed, retries included
    upstream_ms: float = 0.0  # time to the full body (plain) or to the response headers (stream)

    @property
    def fallbacks(self) -> list[str]:
        """Targets given up on before the one that answered, in order."""
        seen: list[str] = []
        for a in self.failed:
            if a.target != self.target and a.target not in seen:
                seen.append(a.target)
        return seen


class AllUpstreamsFailed(Exception):
    def __init__(self, attempts: list[Attempt]):
        self.attempts = attempts
        super().__init__("all targets failed: " + "; ".join(str(a) for a in attempts))


class UpstreamPool:
    """Async HTTP calls to OpenAI-compatible targets, one shared connection pool."""

    def __init__(self, targets: Sequence[TargetConfig], *, retries: int = 1,
                 on_attempt_failed: Callable[[Attempt], None] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.targets = {t.name: t for t in targets}
        self.retries = retries
        self.on_attempt_failed = on_attempt_failed
        # No pool-wide limit below the OS's: concurrency is bounded by the gateway's callers.
        self._client = httpx.AsyncClient(transport=transport, limits=httpx.Limits(max_connections=None,
                                                                                    max_keepalive_connections=64))

    async def aclose(self) -> None:
        await self._client.aclose()

    def _request(self, target: TargetConfig, body: dict) -> httpx.Request:
        # identity: the reply's bytes are relayed unchanged, so they must not arrive compressed.
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   "Accept": "text/event-stream" if body.get("stream") else "application/json"}
        key = target.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        payload = {**body, "model": target.upstream_model}
        return self._client.build_request("POST", f"{target.base_url}/chat/completions", json=payload,
                                          headers=headers, timeout=httpx.Timeout(target.timeout_s))

    def _failed(self, failed: list[Attempt], attempt: Attempt) -> None:
        failed.append(attempt)
        if self.on_attempt_failed is not None:
            self.on_attempt_failed(attempt)

    async def chat(self, chain: Sequence[str], body: dict, *, stream: bool = False) -> UpstreamReply:
        """Send `body` to the first target of `chain` that answers, with its `model` rewritten.

        Returns the first reply that is not a transient failure (a 2xx, or a 4xx passed through).
        With stream=True the reply's response is open (headers read, body not); close it when done.
        """
        failed: list[Attempt] = []
        for name in chain:
            target = self.targets[name]
            try:
                request = self._request(target, body)
            except ConfigError as exc:  # e.g. its API key variable is unset: no point retrying this target
                self._failed(failed, Attempt(name, str(exc)))
                continue
            for _ in range(1 + self.retries):
                start = time.perf_counter()
                response = None
                try:
                    response = await self._client.send(request, stream=True)
                    if is_transient_status(response.status_code):
                        await response.aread()
                        await response.aclose()
                        self._failed(failed, Attempt(name, f"HTTP {response.status_code}", response.status_code))
                        continue
                    if not stream or response.status_code >= 400:
                        await response.aread()  # a plain reply's body timing out counts as a failure too
                        await response.aclose()
                    return UpstreamReply(name, response, failed, (time.perf_counter() - start) * 1000)
                except httpx.TimeoutException as exc:
                    reason = f"timeout after {target.timeout_s:g}s ({type(exc).__name__})"
                except httpx.TransportError as exc:
                    reason = f"connection error ({type(exc).__name__}: {exc})" if str(exc) else \
                        f"connection error ({type(exc).__name__})"
                if response is not None:
                    await response.aclose()
                self._failed(failed, Attempt(name, reason))
        raise AllUpstreamsFailed(failed)


T = TypeVar("T")


class EventLoopThread:
    """A private event loop in a daemon thread, so synchronous code (the `Client`) can drive the async pool.

    Works even when the caller's own thread already runs an event loop (a notebook, an async app).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="prefill-router-client", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[Any]) -> Iterator[Any]:
        """Yield the items of an async iterator from this loop; closing the iterator closes the source."""
        try:
            while True:
                try:
                    yield self.run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self.run(aclose())

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()
