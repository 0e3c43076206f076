"""A tenant's request rate and budgets, checked when a request arrives (before any routing or upstream call).

    rpm                    requests in the current UTC minute; beyond it: 429 rate_limit_exceeded, Retry-After
                           the seconds left in that minute
    budget_usd_per_day     USD spent in the current UTC day / month (from the upstreams' `usage` and the
    budget_usd_per_month   config's prices); once reached: 429 budget_exceeded naming the key alias and when it
                           resets. A request in flight may take a key past its budget; the next one is refused.

With Redis (`state.redis_url`) the counts are shared, so a limit holds across replicas; while Redis is away each
replica counts on its own (serve/shared.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from typing import Any

from prefill_router.serve.auth import Caller
from prefill_router.serve.errors import GatewayError
from prefill_router.serve.metrics import GatewayMetrics
from prefill_router.serve.shared import Command, SharedState, utc_periods

RATE_TTL_S = 120
DAY_TTL_S = 3 * 86400
MONTH_TTL_S = 40 * 86400


class Limits:
    def __init__(self, metrics: GatewayMetrics, shared: SharedState | None = None):
        self.metrics = metrics
        self.shared = shared
        # "rate:<alias>:<minute>" -> requests, "budget:<alias>:<day or month>" -> USD
        self._local: defaultdict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    async def admit(self, who: Caller) -> None:
        """Count this request against its key's rate, and refuse it (429) over the rate or a budget."""
        tenant = who.tenant
        if tenant is None or (tenant.rpm is None and tenant.budget_usd_per_day is None
                              and tenant.budget_usd_per_month is None):
            return
        now = time.time()
        minute = int(now // 60)
        day, month, next_day, next_month = utc_periods()
        rate_key = f"rate:{tenant.alias}:{minute}"
        budget_keys = [f"budget:{tenant.alias}:{day}", f"budget:{tenant.alias}:{month}"]
        with self._lock:
            self._local[rate_key] += 1
            local = [self._local[rate_key], *(self._local[k] for k in budget_keys)]
        counts = local
        if self.shared is not None:
            s = self.shared

            async def shared_counts(client: Any) -> list:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.incr(s.key(rate_key))
                    pipe.expire(s.key(rate_key), RATE_TTL_S)
                    pipe.mget([s.key(k) for k in budget_keys])
                    rate, _, spent = await pipe.execute()
                return [int(rate), *(float(v or 0) for v in spent)]

            counts = await s.read(shared_counts, local)
        rate, spent_day, spent_month = counts
        if tenant.rpm is not None and rate > tenant.rpm:
            retry = max(1, math.ceil(60 - now % 60))
            self.metrics.limited.labels(key=tenant.alias, reason="rate").inc()
            raise GatewayError(429, f"key '{tenant.alias}' is over its rate limit of {tenant.rpm} requests per "
                               f"minute; retry in {retry} s", code="rate_limit_exceeded",
                               headers={"Retry-After": str(retry)})
        for spent, budget, period, resets in ((spent_day, tenant.budget_usd_per_day, "daily", next_day),
                                              (spent_month, tenant.budget_usd_per_month, "monthly", next_month)):
            if budget is not None and spent >= budget:
                self.metrics.limited.labels(key=tenant.alias, reason="budget").inc()
                retry = max(1, math.ceil(resets.timestamp() - now))
                raise GatewayError(429, f"key '{tenant.alias}' has spent ${spent:.4f} of its {period} budget of "
                                   f"${budget:g}; it resets at {resets.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                                   code="budget_exceeded", headers={"Retry-After": str(retry)})

    def charge(self, alias: str | None, usd: float) -> list[Command]:
        """Add `usd` to the key's day and month; the Redis commands that do the same (for the caller's write)."""
        if alias is None or usd <= 0:
            return []
        day, month, _, _ = utc_periods()
        keys = [(f"budget:{alias}:{day}", DAY_TTL_S), (f"budget:{alias}:{month}", MONTH_TTL_S)]
        with self._lock:
            for key, _ in keys:
                self._local[key] += usd
            for stale in [k for k in self._local if k.startswith("rate:") and
                          int(k.rsplit(":", 1)[1]) < int(time.time() // 60) - 1]:
                del self._local[stale]  # old minutes: keeps the local table small
        if self.shared is None:
            return []
        return [c for key, ttl in keys for c in (("INCRBYFLOAT", self.shared.key(key), usd),
                                                  ("EXPIRE", self.shared.key(key), ttl))]
