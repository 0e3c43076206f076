"""Prometheus metrics of one gateway app. Each app has its own registry, so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "prefill_router"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Chat requests answered, by the target that answered and "
                                "the HTTP status it returned", ["target", "status"], registry=r)
        self.upstream_errors = Counter(f"{PREFIX}_upstream_errors", "Failed upstream attempts (timeouts, "
                                       "connection errors, 408/429/5xx), retries included", ["target"], registry=r)
        self.fallbacks = Counter(f"{PREFIX}_fallbacks", "Requests that left a target for the next one in its "
                                 "fallback chain, by the target given up on", ["target"], registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Requests the gateway answered with an error of its own, by "
                              "HTTP status and error code", ["status", "code"], registry=r)
        self.routing_latency = Histogram(f"{PREFIX}_routing_latency_seconds", "Time to a routing decision "
                                         "(queueing, encoder prefill, MLP, policy)", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Prompts per encoder forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.cache = Counter(f"{PREFIX}_cache_lookups", "Routing cache lookups, by result", ["result"], registry=r)
        self.stream_disconnects = Counter(f"{PREFIX}_stream_disconnects", "Streams the client closed before the "
                                          "end (the upstream call is cancelled)", ["target"], registry=r)
        self.deadline_exceeded = Counter(f"{PREFIX}_routing_deadline_exceeded", "Routed requests whose routing "
                                         "deadline passed before the prefill router answered, by where they went "
                                         "(the fast fallback scorer: 'fallback', else the default target)",
                                         ["target"], registry=r)
        self.session_decisions = Counter(f"{PREFIX}_session_decisions", "Sticky-session routing decisions, by "
                                         "outcome (new pin, pinned, escalated)", ["outcome"], registry=r)
        # Spend (serve/spend.py): from each reply's `usage` and the config's prices.
        self.answered = Counter(f"{PREFIX}_answered_requests", "Requests an upstream answered, by target and "
                                "whether the router chose it (routed) or the caller named it", ["target", "routed"],
                                registry=r)
        self.tokens = Counter(f"{PREFIX}_upstream_tokens", "Tokens the upstreams reported in `usage`, by target and "
                              "kind (prompt, completion)", ["target", "kind"], registry=r)
        self.spend = Counter(f"{PREFIX}_spend_usd", "USD spent, from `usage` and the config's prices, by target "
                             "and routed", ["target", "routed"], registry=r)
        self.always_best = Counter(f"{PREFIX}_always_best_usd", "What the routed requests would have cost at the "
                                   "best target (same token counts)", registry=r)
        self.usage_missing = Counter(f"{PREFIX}_usage_missing", "Replies without `usage` (not counted in spend)",
                                     ["target"], registry=r)
        # Feedback and reloads (serve/journal.py, serve/admin.py).
        self.feedback = Counter(f"{PREFIX}_feedback", "Feedback posts, by outcome (recorded, unknown_id, "
                                "duplicate, unknown_target)", ["outcome"], registry=r)
        self.journal_dropped = Counter(f"{PREFIX}_journal_dropped", "Routed requests whose features were not "
                                       "stored because the journal's queue was full", registry=r)
        self.reloads = Counter(f"{PREFIX}_reloads", "Router reloads, by outcome (ok, refused, failed)",
                               ["outcome"], registry=r)
        # Keys (serve/auth.py, serve/limits.py) and shared state (serve/shared.py).
        self.key_requests = Counter(f"{PREFIX}_key_requests", "Requests an upstream answered, by client key "
                                    "alias", ["key"], registry=r)
        self.key_spend = Counter(f"{PREFIX}_key_spend_usd", "USD spent, by client key alias", ["key"], registry=r)
        self.limited = Counter(f"{PREFIX}_key_limited", "Requests refused with 429, by key alias and reason "
                               "(rate, budget)", ["key", "reason"], registry=r)
        self.state_up = Gauge(f"{PREFIX}_state_redis_up", "1 while the shared state (Redis) answers, 0 while this "
                              "replica runs on local state", registry=r)
        self.state_outages = Counter(f"{PREFIX}_state_outages", "Times Redis became unreachable", registry=r)
        self.state_backlog = Gauge(f"{PREFIX}_state_backlog", "Writes waiting for Redis to return", registry=r)
        self.state_backlog_dropped = Counter(f"{PREFIX}_state_backlog_dropped", "Writes dropped because the "
                                             "backlog was full during a Redis outage", registry=r)
        # Which scorer decided each routed request: the prefill router, the fast fallback scorer, the default
        # target (both failed or missed the deadline), or a sticky-session pin.
        self.decided_by = Counter(f"{PREFIX}_decisions", "Routing decisions, by what decided them (prefill, "
                                  "fallback, default, pinned)", ["scorer"], registry=r)
        self.admission_fallbacks = Counter(f"{PREFIX}_admission_fallbacks", "Requests decided by the fallback "
                                           "scorer at arrival, because the encoder queue could not score them "
                                           "before the routing deadline", registry=r)
        self.router_info = Gauge(f"{PREFIX}_router_loaded_unix", "When the router now serving was loaded",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
