"""What one gateway holds while it runs: the config, the routing engine (swapped whole by a reload), the
upstream pool, the spend ledger, the feedback journal and the recent decisions. Routers reach it with the
`gateway` dependency (`app.state.gateway`)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Annotated

import httpx
from fastapi import Depends, Request

from prefill_router.data.prompt import Message
from prefill_router.errors import ConfigError
from prefill_router.serve.config import GatewayConfig
from prefill_router.serve.engine import Routed, RoutingEngine, Scorer
from prefill_router.serve.journal import FeedbackJournal, encode_features, identity_digest
from prefill_router.serve.metrics import GatewayMetrics
from prefill_router.serve.models import preset_policy
from prefill_router.serve.spend import SpendLedger
from prefill_router.serve.upstream import Attempt, UpstreamPool


class Gateway:
    def __init__(self, config: GatewayConfig, scorer: Scorer, *, encoder_info: dict | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.metrics = GatewayMetrics()
        self.client_keys = config.auth.all_keys()
        self.admin_keys = config.admin.all_keys("admin")
        self.encoder_info = encoder_info
        self.check_scorer(scorer)
        self.engine = self.new_engine(scorer)
        self.checkpoint = None if config.router.checkpoint is None else str(config.router.checkpoint)
        self.loaded_unix = time.time()
        self.metrics.router_info.set(self.loaded_unix)
        self.pool = UpstreamPool(config.targets, retries=config.retries, on_attempt_failed=self._attempt_failed,
                                 transport=transport, request_timeout_s=config.request_timeout_s,
                                 max_retry_after_s=config.max_retry_after_s,
                                 max_body_bytes=config.max_upstream_body_bytes)
        self.spend = SpendLedger(config.targets, self.metrics)
        f = config.feedback
        self.journal = None if f.dir is None else FeedbackJournal(
            f.dir, retention_s=f.retention_s, max_bytes=f.max_bytes, segment_bytes=f.segment_bytes,
            queue_size=f.queue_size).start()
        self.decisions: deque[dict] = deque(maxlen=config.ui.recent_decisions)
        self._retiring: set[asyncio.Task] = set()
        self.reload_lock: asyncio.Lock | None = None  # made on the event loop, at the first reload

    @property
    def routed_targets(self) -> list[str]:
        return self.engine.targets

    @property
    def best_target(self) -> str:
        """The target "always best" means in the savings: where a missed deadline goes (router.default_target,
        else the strongest routed target)."""
        return self.engine.default_target

    def _attempt_failed(self, attempt: Attempt) -> None:
        self.metrics.upstream_errors.labels(target=attempt.target).inc()

    def check_scorer(self, scorer: Scorer) -> None:
        """ConfigError unless every target the router predicts for has an upstream entry and every configured
        policy applies to it: found at start (or at a reload), not at a request."""
        config = self.config
        missing = [t for t in scorer.targets if t not in {c.name for c in config.targets}]
        if missing:
            raise ConfigError(f"targets: the router predicts for {missing}, which have no upstream entry in the "
                              "config")
        check_policy = getattr(scorer, "check_policy", None)
        if check_policy is None:
            return
        for where, policy, lam in [("router.policy/router.lam", config.router.policy, config.router.lam)] + [
                (f"presets.{name}", *preset_policy(p, config.router.policy, config.router.lam)[1:])
                for name, p in config.presets.items()]:
            try:
                check_policy(policy, lam)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None

    def new_engine(self, scorer: Scorer) -> RoutingEngine:
        c = self.config
        return RoutingEngine(scorer, max_batch_size=c.batching.max_batch_size, max_wait_ms=c.batching.max_wait_ms,
                             cache_size=c.cache_size, metrics=self.metrics, length_buckets=c.batching.length_buckets,
                             deadline_ms=c.router.deadline_ms, default_target=c.router.default_target,
                             session_mode=c.sessions.mode, session_ttl_s=c.sessions.ttl_s,
                             max_sessions=c.sessions.max_sessions, escalate_only=c.sessions.escalate_only,
                             strength=c.strength_order())

    def swap(self, scorer: Scorer, checkpoint: str | None, encoder_info: dict | None = None) -> RoutingEngine:
        """Serve with `scorer` from now on. One assignment: a request takes the engine once, so it is routed
        wholly by the old router or wholly by the new one; the old engine closes once its decisions finish.
        Sticky-session pins carry over; the routing cache does not (its P came from the old router)."""
        old, new = self.engine, self.new_engine(scorer)
        new.sessions = old.sessions
        self.engine = new
        self.checkpoint, self.loaded_unix = checkpoint, time.time()
        if encoder_info is not None:
            self.encoder_info = encoder_info
        self.metrics.router_info.set(self.loaded_unix)
        task = asyncio.get_running_loop().create_task(old.retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return old

    async def close(self) -> None:
        for task in list(self._retiring):
            await task
        await self.engine.close()
        await self.pool.aclose()
        if self.journal is not None:
            self.journal.close()

    # --- what a chat request leaves behind ----------------------------------------------------------------
    def note_decision(self, request_id: str, model: str, decision: Routed | None, chosen: str, answered_by: str,
                      messages: list[Message], stream: bool) -> dict:
        """An entry of the recent decisions (GET /v1/decisions, the dashboard); its usd is filled in later."""
        preview_chars = self.config.ui.prompt_preview_chars
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        entry = {"id": request_id, "unix": time.time(), "model": model, "chosen": chosen,
                 "answered_by": answered_by, "routed": decision is not None,
                 "probabilities": None if decision is None else decision.probabilities,
                 "estimated_cost": None if decision is None else decision.estimated_cost,
                 "policy": None if decision is None else decision.policy,
                 "prompt": last_user[:preview_chars] if preview_chars else None,
                 "stream": stream, "usd": None, "feedback": None}
        self.decisions.append(entry)
        return entry

    def account(self, entry: dict, usage: dict | None) -> None:
        entry["usd"] = self.spend.record(entry["answered_by"], usage, routed=entry["routed"], best=self.best_target)

    def record_features(self, engine: RoutingEngine, request_id: str, alias: str | None, decision: Routed,
                        answered_by: str) -> None:
        """Queue what feedback on this request will train on (nothing when feedback is off or no features)."""
        if self.journal is None or decision.features is None or decision.probabilities is None:
            return
        scorer = engine.scorer
        router = getattr(scorer, "router", None)
        targets = list(decision.probabilities)
        record = {"id": request_id, "aliases": [alias] if alias else [], "unix": time.time(), "targets": targets,
                  "chosen": decision.target, "answered_by": answered_by,
                  "probabilities": [decision.probabilities[t] for t in targets],
                  "estimated_cost": [(decision.estimated_cost or {}).get(t) for t in targets],
                  "policy": decision.policy,
                  "encoder": identity_digest(getattr(scorer, "encoder_info", None)),
                  "hidden_states": getattr(router, "hidden_states", None),
                  **encode_features(decision.features)}
        if not self.journal.record_routed(record):
            self.metrics.journal_dropped.inc()


def gateway(request: Request) -> Gateway:
    """FastAPI dependency: the running gateway."""
    gw: Gateway = request.app.state.gateway
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]
