"""State that replicas share through Redis (`state.redis_url`), with this process's own state behind it.

What lives here, under the config's key prefix (default "prefill-router:"):

    pin:<session>              sticky-session pin (target name), expires ttl_s after its last use
    routed:<id>, alias:<id>    the routed request behind feedback (its journal line: features included), so
                               feedback posted to any replica finds it; expires after feedback.retention_s
    feedback:<id>              set once: feedback de-duplication across replicas
    spend (hash)               spend counters (per target, routed totals, per key alias)
    budget:<alias>:<period>    a key's USD for one day or month (budgets)
    rate:<alias>:<minute>      a key's requests in one minute (rate limits)
    decision:<id>, decisions[:<alias>]   the recent decisions (newest first), all and per key alias

Every call has a short timeout. When Redis cannot be reached the gateway goes on with its local state (pins,
journal, ledger, decisions of this process): the first failure is logged once and counted
(`prefill_router_state_outages_total`), writes are kept in a bounded backlog, and a background probe replays
the backlog once Redis answers again, so the shared counters catch up. No request fails because of Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from prefill_router.serve.metrics import GatewayMetrics

log = logging.getLogger("prefill_router.serve")

T = TypeVar("T")
Command = tuple[Any, ...]  # ("HINCRBYFLOAT", key, field, amount): a Redis command and its arguments
BACKLOG_MAX = 100_000  # writes kept while Redis is away; the oldest go first beyond this (counted)
APPLIED_TTL_S = 3600  # how long a write's id is remembered, so a write retried after a timeout counts once
# One write (one request's commands) applied at most once: a write whose reply timed out may still have run in
# Redis (a hung server runs it when it wakes), and it is retried from the backlog with the same id.
APPLY_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  for _, command in ipairs(cjson.decode(ARGV[1])) do redis.call(unpack(command)) end
  return 1
end
return 0
"""


class SharedState:
    """A Redis connection that never fails a request: `read` and `write` return a fallback / queue on failure."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float, retry_s: float, metrics: GatewayMetrics):
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.retry_s = retry_s
        self.metrics = metrics
        self.client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                        decode_responses=True, health_check_interval=0)
        self.up = True
        self.backlog: deque[tuple[str, str]] = deque(maxlen=BACKLOG_MAX)  # (write id, its commands as JSON)
        self._probe: asyncio.Task | None = None
        metrics.state_up.set(1)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- calls ------------------------------------------------------------------------------------------
    async def read(self, call: Callable[[Any], Awaitable[T]], fallback: T) -> T:
        """`await call(client)`, or `fallback` while Redis is away (and on the failure that finds it away)."""
        if not self.up:
            return fallback
        try:
            return await call(self.client)
        except Exception as exc:  # noqa: BLE001 - any client failure means local state from here on
            self._went_away(exc)
            return fallback

    async def write(self, commands: Sequence[Command]) -> bool:
        """Run `commands` (one request's) in one round trip, at most once. While Redis is away they join the
        backlog, which is replayed when it returns. True when they reached Redis now."""
        if not commands:
            return True
        write = (uuid.uuid4().hex, json.dumps([[str(a) for a in c] for c in commands], separators=(",", ":")))
        if not self.up:
            self._keep([write])
            return False
        try:
            await self._run([write])
            return True
        except Exception as exc:  # noqa: BLE001
            self._went_away(exc)
            self._keep([write])
            return False

    def write_soon(self, commands: Sequence[Command]) -> None:
        """`write` from synchronous code (a stream's end): scheduled on the running event loop."""
        task = asyncio.get_running_loop().create_task(self.write(commands))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self, writes: Sequence[tuple[str, str]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for write_id, commands in writes:
                pipe.eval(APPLY_ONCE, 1, self.key("applied", write_id), commands, APPLIED_TTL_S)
            await pipe.execute()

    def _keep(self, writes: Sequence[tuple[str, str]]) -> None:
        dropped = max(0, len(self.backlog) + len(writes) - BACKLOG_MAX)
        if dropped:
            self.metrics.state_backlog_dropped.inc(dropped)
        self.backlog.extend(writes)
        self.metrics.state_backlog.set(len(self.backlog))

    def _went_away(self, exc: Exception) -> None:
        if not self.up:
            return
        self.up = False
        self.metrics.state_up.set(0)
        self.metrics.state_outages.inc()
        log.error("shared state: Redis at %s is unreachable (%s: %s); serving on this replica's local state and "
                  "retrying every %gs", self.safe_url, type(exc).__name__, exc, self.retry_s)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                await self.client.ping()
                while self.backlog:  # replay in order, in pipelines of up to 1000 writes
                    chunk = [self.backlog.popleft() for _ in range(min(1000, len(self.backlog)))]
                    try:
                        await self._run(chunk)
                    except Exception:
                        self.backlog.extendleft(reversed(chunk))
                        raise
                    self.metrics.state_backlog.set(len(self.backlog))
            except Exception:  # noqa: BLE001 - still away; try again later
                continue
            self.up = True
            self.metrics.state_up.set(1)
            log.warning("shared state: Redis at %s is back; the backlog was replayed", self.safe_url)
            return

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        head, at, tail = self.url.rpartition("@")
        return f"{head.split('://')[0]}://***@{tail}" if at else self.url

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.client.aclose()


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def utc_periods(now: datetime | None = None) -> tuple[str, str, datetime, datetime]:
    """(day, month, start of the next UTC day, start of the next UTC month): the periods budgets count in."""
    now = now or datetime.now(UTC)
    next_day = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m"), next_day, next_month
