"""Calling the chosen upstream, with retries and fallback to the next target. Shared by the gateway and `Client`.

Failure rules (the same for streaming and plain requests; the status classes are collect's, see
`prefill_router.collect.openai_api`):
- a timeout, a connection error, HTTP 408, 409, 429 and 5xx are *transient*: the same target is retried
  `retries` times, after the reply's Retry-After when it gives one (over `max_retry_after_s`: no retry, the
  next target is tried at once), then the next target in the fallback chain is tried;
- a redirect (3xx) or a refused key (401, 403, 407) is the *endpoint's* fault (a moved base_url, a revoked
  upstream key): it would fail the same way again, so the next target is tried at once. Its body is never
  read: an upstream error may echo the upstream key, and a 401 must not reach the client looking like a bad
  gateway key;
- a reply body over `max_body_bytes` is a failure of that target too;
- any other 4xx is the *request's* fault (bad parameters, context too long, content policy) and would fail
  the same way everywhere, so it is passed back to the caller unchanged, without retry or fallback;
- when every target in the chain fails, `AllUpstreamsFailed` lists every attempt, by status or exception
  name only.

Deadlines: each attempt has a total deadline of its target's `timeout_s` (connect, headers and, for a plain
request, the whole body; a body dripped slowly is cut off like a stalled one), and the whole chain has
`request_timeout_s`. A stream's deadline ends at its headers; after that each read waits at most `timeout_s`
(time to first byte and between chunks), since a long answer may stream for minutes.

A stream can only fall back before its first byte reaches the client: once the upstream has answered 200,
the response is handed over and later failures end the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import httpx

from prefill_router.collect.openai_api import (
    RetryPolicy,
    is_endpoint_failure,
    is_retryable_status,
    parse_retry_after,
)
from prefill_router.errors import ConfigError, PrefillRouterError
from prefill_router.targets import TargetConfig

# Not relayed from an upstream reply: hop-by-hop headers (RFC 9110 7.6.1), framing and encoding that the
# gateway redoes for its own reply, and cookies an upstream sets for itself (they would land on the client).
DROPPED_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                             "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                             "content-length", "content-encoding", "date", "server", "set-cookie", "set-cookie2"})


def relayed_headers(headers: httpx.Headers) -> dict[str, str]:
    """The upstream reply headers worth passing on to the client (see DROPPED_HEADERS)."""
    also = {t.strip().lower() for t in headers.get("connection", "").split(",")}  # named hop-by-hop headers
    return {k: v for k, v in headers.items() if k.lower() not in DROPPED_HEADERS and k.lower() not in also}


@dataclass
class Attempt:
    """One failed call: which target, and why (an HTTP status or an exception name)."""

    target: str
    reason: str
    status: int | None = None
    retry_after: float | None = None  # seconds, from the reply's Retry-After header

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


class AllUpstreamsFailed(PrefillRouterError):
    """Every target of the fallback chain failed; `attempts` lists each attempt and why."""

    def __init__(self, attempts: list[Attempt]):
        self.attempts = attempts
        super().__init__("all targets failed: " + "; ".join(str(a) for a in attempts))


class _TooLarge(Exception):
    pass


class UpstreamPool:
    """Async HTTP calls to OpenAI-compatible targets, one shared connection pool.

    request_timeout_s: the whole chain (attempts, Retry-After waits, fallbacks), None for no bound beyond the
    attempts' own; max_retry_after_s: the longest Retry-After honoured; max_body_bytes: the largest plain
    reply body read (a stream is relayed chunk by chunk, never buffered).
    """

    def __init__(self, targets: Sequence[TargetConfig], *, retries: int = 1,
                 on_attempt_failed: Callable[[Attempt], None] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, request_timeout_s: float | None = 180.0,
                 max_retry_after_s: float = 5.0, max_body_bytes: int = 16_000_000):
        self.targets = {t.name: t for t in targets}
        self.retries = retries
        self.on_attempt_failed = on_attempt_failed
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        # No backoff without a Retry-After: the gateway has a fallback chain and a client waiting.
        self.retry = RetryPolicy(max_attempts=1 + retries, backoff_s=0.0, max_retry_after_s=max_retry_after_s)
        # No pool-wide limit below the OS's: concurrency is bounded by the gateway's callers.
        # Redirects are not followed (httpx's default, kept explicit): a 3xx is an endpoint failure.
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

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

        Returns the first reply that is not a failure (a 2xx, or a 4xx passed through).
        With stream=True the reply's response is open (headers read, body not); close it when done.
        Cancelling the call (e.g. the client went away) cancels the attempt in flight and every later one.
        """
        failed: list[Attempt] = []
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        for name in chain:
            target = self.targets[name]
            try:
                request = self._request(target, body)
            except ConfigError as exc:  # e.g. its API key variable is unset: no point retrying this target
                self._failed(failed, Attempt(name, str(exc)))
                continue
            for attempt in range(1, self.retry.max_attempts + 1):
                budget = target.timeout_s
                if deadline is not None:
                    budget = min(budget, deadline - time.monotonic())
                    if budget <= 0:
                        self._failed(failed, Attempt(name, f"request deadline of {self.request_timeout_s:g}s "
                                                           "passed"))
                        raise AllUpstreamsFailed(failed)
                start = time.perf_counter()
                outcome = await self._attempt(name, target, request, stream, budget)
                if isinstance(outcome, httpx.Response):
                    return UpstreamReply(name, outcome, failed, (time.perf_counter() - start) * 1000)
                self._failed(failed, outcome)
                if outcome.status is not None and is_endpoint_failure(outcome.status):
                    break  # the same endpoint would refuse again: next target
                if attempt == self.retry.max_attempts:
                    break
                wait = self.retry.wait_s(attempt, outcome.retry_after)
                if wait is None or (deadline is not None and time.monotonic() + wait >= deadline):
                    break  # told to come back later than we can wait: next target
                if wait > 0:
                    await anyio.sleep(wait)
        raise AllUpstreamsFailed(failed)

    async def _attempt(self, name: str, target: TargetConfig, request: httpx.Request, stream: bool,
                       budget: float) -> httpx.Response | Attempt:
        """One call with a total deadline of `budget` seconds: the reply (plain) or its headers (stream),
        or the Attempt that says why it failed."""
        response = None
        try:
            with anyio.fail_after(budget):
                response = await self._client.send(request, stream=True)
                status = response.status_code
                if is_retryable_status(status) or is_endpoint_failure(status):
                    await response.aclose()  # unread: never relayed, and it may echo our key
                    return Attempt(name, f"HTTP {status}", status,
                                   parse_retry_after(response.headers.get("retry-after")))
                if stream and status < 400:
                    return response
                return await self._read_capped(response)
        except TimeoutError:
            reason = f"timeout: no complete reply within {budget:g}s"
        except httpx.TimeoutException as exc:
            reason = f"timeout after {target.timeout_s:g}s ({type(exc).__name__})"
        except httpx.TransportError as exc:
            reason = f"connection error ({type(exc).__name__}: {exc})" if str(exc) else \
                f"connection error ({type(exc).__name__})"
        except _TooLarge:
            reason = f"reply body larger than max_upstream_body_bytes={self.max_body_bytes}"
        except BaseException:  # cancelled (the client left): drop the connection, and the generation with it
            if response is not None:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            raise
        if response is not None:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        return Attempt(name, reason)

    async def _read_capped(self, response: httpx.Response) -> httpx.Response:
        """The whole body, as a closed response of its own; _TooLarge past max_body_bytes."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _TooLarge
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > self.max_body_bytes:
                raise _TooLarge
        await response.aclose()
        # Decoded bytes: the framing and encoding headers described the wire, not these bytes.
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")]
        return httpx.Response(response.status_code, headers=headers, content=bytes(data), request=response.request)
