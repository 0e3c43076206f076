"""One chat-completion call to an OpenAI-compatible endpoint: rate limited, retried, never raising.

A call either returns the answer with its token usage, or a `ChatResult` whose `error` says why it failed.
408, 409, 429, 5xx, timeouts and connection errors are retried with exponential backoff (a server's
Retry-After wins when given); other 4xx answers are the caller's mistake and are not retried.

The retry rule (`is_retryable_status`, `is_endpoint_failure`, `parse_retry_after`, `RetryPolicy`) is shared
with the gateway (`prefill_router.serve.upstream`), which also fails over to another target.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from prefill_router.errors import ConfigError
from prefill_router.targets import TargetConfig

Sleep = Callable[[float], Awaitable[None]]

_JITTER = random.Random()

# The same call may work a little later: retry it (after Retry-After or a backoff).
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES


def is_endpoint_failure(status: int) -> bool:
    """The endpoint, not the request, is at fault and will stay so: a redirect (the base_url moved), a refused
    key (401 revoked, 403 forbidden, 407 proxy). Retrying the same endpoint cannot help; another one may."""
    return 300 <= status < 400 or status in (401, 403, 407)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6        # first try included
    backoff_s: float = 1.0       # wait before the 2nd try; doubles each time, with jitter
    max_backoff_s: float = 60.0  # cap for computed waits (a server's Retry-After is honoured even if longer)
    # A Retry-After longer than this is not waited for: wait_s returns None (give up, or try another target).
    max_retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("backoff_s and max_backoff_s must be >= 0")

    def wait_s(self, attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float | None:
        """Seconds to wait after failed try number `attempt` (1-based); None: a Retry-After over the cap."""
        if retry_after is not None:
            if self.max_retry_after_s is not None and retry_after > self.max_retry_after_s:
                return None
            return retry_after
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        # Jitter spreads retries of many concurrent workers that failed together.
        return base * (rng or _JITTER).uniform(0.5, 1.0)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds ("2", "0.5") or an HTTP date. None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Bucket:
    """A token bucket that may go into debt: a reservation returns how long to wait before using it."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float]):
        self.rate, self.capacity, self.clock = rate_per_s, capacity, clock
        self.level = capacity
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def reserve(self, amount: float) -> float:
        self._refill()
        # A single request larger than the whole bucket waits for a full bucket rather than forever.
        self.level -= min(amount, self.capacity)
        return max(0.0, -self.level / self.rate)

    def adjust(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level - amount)


class RateLimiter:
    """Requests per second and tokens per minute for one target; either may be None (unlimited).

    Token use is reserved from an estimate before the call and corrected with the API's reported usage after.
    Reservations are made in call order, so waiting callers are served first come, first served.
    """

    def __init__(self, requests_per_second: float | None = None, tokens_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.requests = _Bucket(requests_per_second, max(1.0, requests_per_second), clock) \
            if requests_per_second else None
        self.tokens = _Bucket(tokens_per_minute / 60.0, tokens_per_minute, clock) if tokens_per_minute else None

    def reserve(self, tokens: int) -> float:
        """Book one request of about `tokens` tokens; returns the seconds to wait before sending it."""
        wait = 0.0
        if self.requests:
            wait = max(wait, self.requests.reserve(1))
        if self.tokens:
            wait = max(wait, self.tokens.reserve(tokens))
        return wait

    def settle(self, estimated: int, actual: int | None) -> None:
        """Correct the token booking once the real usage is known."""
        if self.tokens and actual is not None:
            self.tokens.adjust(actual - min(estimated, self.tokens.capacity))


@dataclass
class ChatResult:
    text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float | None = None   # of the successful try, without rate-limit or backoff waits
    attempts: int = 0
    error: str | None = None         # why the call failed, None when it succeeded
    status: int | None = None        # last HTTP status seen

    @property
    def ok(self) -> bool:
        return self.error is None


def _unsendable(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return (f"the body holds {exc.object[exc.start]!r}, a lone surrogate, which is not valid Unicode text")
    return f"the body is not valid JSON ({exc})"  # e.g. a NaN parameter


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        if message:
            return str(message)[:300]
    except ValueError:
        pass
    return response.text[:300].strip() or response.reason_phrase


def _parse_completion(body: object) -> ChatResult:
    """The answer and usage from a chat.completion body; a ChatResult with `error` when malformed."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ChatResult(error=f"malformed response: no choices[0].message.content in {str(body)[:200]!r}")
    if text is None:
        text = ""  # e.g. a refusal or a tool call: an empty answer, judged like any other
    usage = body.get("usage") if isinstance(body, dict) else None
    usage = usage if isinstance(usage, dict) else {}

    def count(key: str) -> int | None:
        value = usage.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return ChatResult(text=str(text), input_tokens=count("prompt_tokens"), output_tokens=count("completion_tokens"),
                      finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None)


async def chat_completion(client: httpx.AsyncClient, target: TargetConfig, messages: list[dict], *,
                          params: dict | None = None, limiter: RateLimiter | None = None,
                          estimated_tokens: int = 0, retry: RetryPolicy | None = None,
                          sleep: Sleep = asyncio.sleep) -> ChatResult:
    """POST {base_url}/chat/completions for `target`, retrying transient failures. Never raises for HTTP errors."""
    retry = retry or RetryPolicy()
    url = f"{target.base_url}/chat/completions"
    body = {"model": target.upstream_model, "messages": messages, **(params or {})}
    try:  # as httpx's json= does, but a body JSON cannot carry is a failed call, not an exception
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError) as exc:
        return ChatResult(error=f"request not sent: {_unsendable(exc)}")
    headers = {"Content-Type": "application/json"}
    key = target.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    result = ChatResult()
    for attempt in range(1, retry.max_attempts + 1):
        if limiter is not None:
            wait = limiter.reserve(estimated_tokens)
            if wait > 0:
                await sleep(wait)
        result.attempts = attempt
        retry_after = None
        started = time.perf_counter()
        try:
            response = await client.post(url, content=content, headers=headers, timeout=target.timeout_s)
        except httpx.TimeoutException:
            result.error, result.status = f"timeout after {target.timeout_s:g}s", None
        except httpx.TransportError as exc:
            result.error, result.status = f"connection error: {type(exc).__name__}: {exc}"[:300], None
        else:
            result.status = response.status_code
            if response.status_code == 200:
                try:
                    parsed = _parse_completion(response.json())
                except ValueError:
                    parsed = ChatResult(error=f"malformed response: not JSON: {response.text[:200]!r}")
                parsed.attempts, parsed.status = attempt, 200
                parsed.latency_s = time.perf_counter() - started
                if limiter is not None:
                    used = None if parsed.input_tokens is None else parsed.input_tokens + (parsed.output_tokens or 0)
                    limiter.settle(estimated_tokens, used)
                # A malformed 200 was paid for and would likely repeat: not retried here (--retry-failed can).
                return parsed
            result.error = f"HTTP {response.status_code}: {_error_detail(response)}"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        if limiter is not None:
            limiter.settle(estimated_tokens, 0)  # nothing was processed: give the tokens back
        if result.status is not None and not is_retryable_status(result.status):
            return result  # the request itself is wrong, or the endpoint refuses it: trying again cannot help
        if attempt < retry.max_attempts:
            wait = retry.wait_s(attempt, retry_after)
            if wait is None:
                result.error = f"{result.error} (Retry-After {retry_after:g}s is over the cap)"
                return result
            await sleep(wait)
    result.error = f"{result.error} (gave up after {result.attempts} attempts)"
    return result
