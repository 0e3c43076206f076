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
from collections import Counter
from collections.abc import Mapping, Sequence

from prefill_router.serve.metrics import GatewayMetrics
from prefill_router.targets import TargetConfig


class SpendLedger:
    """Running totals (for GET /v1/stats) kept in step with the Prometheus counters (for /metrics).

    The totals are flat counters ("t:<target>:usd", "routed:requests", "k:<alias>:usd", ...): the same fields
    this process keeps and replicas share in Redis (serve/shared.py), so one `snapshot` reads either."""

    def __init__(self, targets: Sequence[TargetConfig], metrics: GatewayMetrics):
        self.metrics = metrics
        self.started = time.time()
        self._prices = {t.name: (t.usd_per_m_input, t.usd_per_m_output) for t in targets}
        self.local: Counter[str] = Counter()
        self._lock = threading.Lock()

    def cost(self, target: str, prompt_tokens: int, completion_tokens: int) -> float:
        usd_in, usd_out = self._prices[target]
        return (prompt_tokens * usd_in + completion_tokens * usd_out) / 1e6

    def record(self, target: str, usage: dict | None, *, routed: bool, best: str, alias: str | None = None,
               decided_by: str | None = None) -> tuple[float | None, dict[str, float]]:
        """Count one answered request: (its USD or None without usage, the counter increments made)."""
        m = self.metrics
        tokens = _tokens(usage)
        routed_label = str(routed).lower()
        m.answered.labels(target=target, routed=routed_label).inc()
        deltas: dict[str, float] = {f"t:{target}:requests": 1}
        if decided_by is not None:  # which scorer decided it (prefill, fallback, default, pinned)
            deltas[f"decided:{decided_by}"] = 1
        usd = None
        if alias is not None:
            deltas[f"k:{alias}:requests"] = 1
            m.key_requests.labels(key=alias).inc()
        if tokens is None:
            deltas[f"t:{target}:usage_missing"] = 1
            m.usage_missing.labels(target=target).inc()
        else:
            prompt, completion = tokens
            usd = self.cost(target, prompt, completion)
            deltas.update({f"t:{target}:prompt_tokens": prompt, f"t:{target}:completion_tokens": completion,
                           f"t:{target}:usd": usd})
            m.tokens.labels(target=target, kind="prompt").inc(prompt)
            m.tokens.labels(target=target, kind="completion").inc(completion)
            m.spend.labels(target=target, routed=routed_label).inc(usd)
            if alias is not None:
                deltas[f"k:{alias}:usd"] = usd
                m.key_spend.labels(key=alias).inc(usd)
            if routed:
                best_usd = self.cost(best, prompt, completion)
                deltas.update({"routed:requests": 1, "routed:usd": usd, "routed:always_best_usd": best_usd})
                m.always_best.inc(best_usd)
        with self._lock:
            self.local.update(deltas)
        return usd, deltas

    def snapshot(self, best: str, fields: Mapping[str, float | str] | None = None,
                 alias: str | None = None) -> dict:
        """The figures of `fields` (default: this process's counters). With `alias`, only that key's spend."""
        with self._lock:
            counts = {k: float(v) for k, v in (self.local if fields is None else fields).items()}
        keys = sorted({k.split(":")[1] for k in counts if k.startswith("k:")})
        by_key = {a: {"requests": int(counts.get(f"k:{a}:requests", 0)), "usd": counts.get(f"k:{a}:usd", 0.0)}
                  for a in keys}
        if alias is not None:
            return {"key": alias, **by_key.get(alias, {"requests": 0, "usd": 0.0})}
        answered = sum(int(counts.get(f"t:{t}:requests", 0)) for t in self._prices)
        targets = {}
        for t in self._prices:
            requests = int(counts.get(f"t:{t}:requests", 0))
            targets[t] = {"requests": requests, "share": requests / answered if answered else 0.0,
                          "prompt_tokens": int(counts.get(f"t:{t}:prompt_tokens", 0)),
                          "completion_tokens": int(counts.get(f"t:{t}:completion_tokens", 0)),
                          "usd": counts.get(f"t:{t}:usd", 0.0),
                          "usage_missing": int(counts.get(f"t:{t}:usage_missing", 0))}
        routed = {"requests": int(counts.get("routed:requests", 0)), "usd": counts.get("routed:usd", 0.0),
                  "always_best_usd": counts.get("routed:always_best_usd", 0.0)}
        saved = routed["always_best_usd"] - routed["usd"]
        return {
            "since_unix": counts.get("since", self.started), "best_target": best, "requests": answered,
            "targets": targets,
            "total": {"prompt_tokens": sum(t["prompt_tokens"] for t in targets.values()),
                      "completion_tokens": sum(t["completion_tokens"] for t in targets.values()),
                      "usd": sum(t["usd"] for t in targets.values()),
                      "usage_missing": sum(t["usage_missing"] for t in targets.values())},
            "routed": {**routed, "savings_usd": saved,
                       "savings_share": saved / routed["always_best_usd"] if routed["always_best_usd"] else 0.0},
            "keys": by_key,
            "decided_by": {k.split(":", 1)[1]: int(v) for k, v in sorted(counts.items()) if k.startswith("decided:")},
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
