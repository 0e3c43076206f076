"""Spend tracking: tokens and USD per target from each upstream reply's `usage`, what the routed requests would
have cost at the best target, and each target's share of the traffic.

The prices are the config's `usd_per_m_input` / `usd_per_m_output`. "Always best" prices a routed request's
own token counts at the best target (the engine's default target: `router.default_target`, else the
strongest); the best target's answer may have been longer or shorter, so the savings are an estimate.
A streamed reply reports usage only when the request asks for it (`stream_options.include_usage`); replies
without usage are counted in `usage_missing`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prefill_router.serve.metrics import GatewayMetrics
from prefill_router.targets import TargetConfig


@dataclass
class TargetSpend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    usage_missing: int = 0


@dataclass
class SpendLedger:
    """Running totals (for GET /v1/stats) kept in step with the Prometheus counters (for /metrics)."""

    targets: Sequence[TargetConfig]
    metrics: GatewayMetrics
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._prices = {t.name: (t.usd_per_m_input, t.usd_per_m_output) for t in self.targets}
        self._by_target = {t.name: TargetSpend() for t in self.targets}
        self._routed = {"requests": 0, "usd": 0.0, "always_best_usd": 0.0}
        self._lock = threading.Lock()

    def cost(self, target: str, prompt_tokens: int, completion_tokens: int) -> float:
        usd_in, usd_out = self._prices[target]
        return (prompt_tokens * usd_in + completion_tokens * usd_out) / 1e6

    def record(self, target: str, usage: dict | None, *, routed: bool, best: str) -> float | None:
        """Count one answered request; returns its USD (None without usage)."""
        m = self.metrics
        tokens = _tokens(usage)
        with self._lock:
            spend = self._by_target[target]
            spend.requests += 1
            m.answered.labels(target=target, routed=str(routed).lower()).inc()
            if tokens is None:
                spend.usage_missing += 1
                m.usage_missing.labels(target=target).inc()
                return None
            prompt, completion = tokens
            usd = self.cost(target, prompt, completion)
            spend.prompt_tokens += prompt
            spend.completion_tokens += completion
            spend.usd += usd
            m.tokens.labels(target=target, kind="prompt").inc(prompt)
            m.tokens.labels(target=target, kind="completion").inc(completion)
            m.spend.labels(target=target, routed=str(routed).lower()).inc(usd)
            if routed:
                best_usd = self.cost(best, prompt, completion)
                self._routed["requests"] += 1
                self._routed["usd"] += usd
                self._routed["always_best_usd"] += best_usd
                m.always_best.inc(best_usd)
            return usd

    def snapshot(self, best: str) -> dict:
        with self._lock:
            answered = sum(s.requests for s in self._by_target.values())
            targets = {name: {"requests": s.requests, "share": s.requests / answered if answered else 0.0,
                              "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                              "usd": s.usd, "usage_missing": s.usage_missing}
                       for name, s in self._by_target.items()}
            routed = dict(self._routed)
        saved = routed["always_best_usd"] - routed["usd"]
        return {
            "since_unix": self.started, "best_target": best, "requests": answered, "targets": targets,
            "total": {"prompt_tokens": sum(t["prompt_tokens"] for t in targets.values()),
                      "completion_tokens": sum(t["completion_tokens"] for t in targets.values()),
                      "usd": sum(t["usd"] for t in targets.values()),
                      "usage_missing": sum(t["usage_missing"] for t in targets.values())},
            "routed": {**routed, "savings_usd": saved,
                       "savings_share": saved / routed["always_best_usd"] if routed["always_best_usd"] else 0.0},
        }


def _tokens(usage: object) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def reply_facts(content: bytes) -> tuple[str | None, dict | None]:
    """(OpenAI `id`, `usage`) of a plain JSON chat reply (None where absent or not JSON)."""
    try:
        payload = json.loads(content)
    except ValueError:
        return None, None
    if not isinstance(payload, dict):
        return None, None
    reply_id = payload.get("id")
    return reply_id if isinstance(reply_id, str) else None, payload.get("usage")


class StreamFacts:
    """Reads the `id` and the `usage` of an SSE chat stream from the bytes relayed, in whatever pieces they
    arrive. Only events that mention them are parsed, so relaying stays cheap."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.usage: dict | None = None
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        events = (self._tail + chunk).split(b"\n\n")
        self._tail = events.pop()
        if len(self._tail) > 1 << 20:  # not SSE after all: stop buffering
            self._tail = b""
        for event in events:
            if (self.id is None and b'"id"' in event) or b'"usage"' in event:
                self._read(event)

    def _read(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                data = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if self.id is None and isinstance(data.get("id"), str):
                self.id = data["id"]
            if isinstance(data.get("usage"), dict):
                self.usage = data["usage"]
