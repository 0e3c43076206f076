"""What one gateway holds while it runs: the config, the keys, the routing engine (swapped whole by a reload), the
upstream pool, the spend ledger, the limits, the feedback journal and the recent decisions, and the shared
state (Redis) that replicas see alike. Routers reach it with the `gateway` dependency (`app.state.gateway`).

With `state.redis_url` the spend counters, recent decisions, routed requests behind feedback, feedback
de-duplication, session pins and key limits are also kept in Redis, and read from there: every replica shows
the same figures and takes feedback on any request. This process keeps its own copy of each, which answers
while Redis is away (serve/shared.py)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Annotated, Any

import httpx
from fastapi import Depends, Request

from prefill_router.data.prompt import Message
from prefill_router.errors import ConfigError
from prefill_router.serve.auth import Caller, admin_table, key_table
from prefill_router.serve.config import GatewayConfig
from prefill_router.serve.engine import Routed, RoutingEngine, Scorer
from prefill_router.serve.journal import (
    DuplicateFeedback,
    FeedbackJournal,
    FeedbackRefused,
    UnknownRequestId,
    encode_features,
    identity_digest,
    unknown_id_message,
)
from prefill_router.serve.limits import Limits
from prefill_router.serve.metrics import GatewayMetrics
from prefill_router.serve.models import preset_policy
from prefill_router.serve.shared import Command, SharedState, dumps, loads
from prefill_router.serve.spend import SpendLedger
from prefill_router.serve.upstream import Attempt, UpstreamPool


class Gateway:
    def __init__(self, config: GatewayConfig, scorer: Scorer, *, encoder_info: dict | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.metrics = GatewayMetrics()
        self.client_keys = key_table(config)
        self.admin_keys = admin_table(config)
        url = config.state.url()
        self.shared = None if url is None else SharedState(
            url, prefix=config.state.prefix, timeout_s=config.state.timeout_ms / 1000, retry_s=config.state.retry_s,
            metrics=self.metrics)
        self.limits = Limits(self.metrics, self.shared)
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
                             strength=c.strength_order(), shared=self.shared)

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
        if self.shared is not None:
            await self.shared.close()

    # --- what a chat request leaves behind ----------------------------------------------------------------
    def note_decision(self, request_id: str, model: str, decision: Routed | None, chosen: str, answered_by: str,
                      messages: list[Message], stream: bool, key: str | None = None) -> dict:
        """An entry of the recent decisions (GET /v1/decisions, the dashboard); its usd is filled in later."""
        preview_chars = self.config.ui.prompt_preview_chars
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        entry = {"id": request_id, "unix": time.time(), "model": model, "key": key, "chosen": chosen,
                 "answered_by": answered_by, "routed": decision is not None,
                 "decided_by": None if decision is None else decision.decided_by,
                 "probabilities": None if decision is None else decision.probabilities,
                 "estimated_cost": None if decision is None else decision.estimated_cost,
                 "policy": None if decision is None else decision.policy,
                 "prompt": last_user[:preview_chars] if preview_chars else None,
                 "stream": stream, "usd": None, "feedback": None}
        self.decisions.append(entry)
        return entry

    def account(self, entry: dict, usage: dict | None) -> list[Command]:
        """Count the reply's spend (and the key's budget); the Redis commands that share it and the decision."""
        usd, deltas = self.spend.record(entry["answered_by"], usage, routed=entry["routed"], best=self.best_target,
                                        alias=entry["key"], decided_by=entry["decided_by"])
        entry["usd"] = usd
        commands = self.limits.charge(entry["key"], usd or 0.0)
        s = self.shared
        if s is None:
            return commands
        commands += [("HINCRBYFLOAT", s.key("spend"), name, amount) for name, amount in deltas.items()]
        commands.append(("HSETNX", s.key("spend"), "since", self.spend.started))
        return commands + self._decision_commands(entry, new=True)

    def _decision_commands(self, entry: dict, new: bool = False) -> list[Command]:
        s = self.shared
        if s is None or not self.config.ui.recent_decisions:
            return []
        keep = self.config.ui.recent_decisions - 1
        commands: list[Command] = [("SET", s.key("decision", entry["id"]), dumps(entry), "EX",
                                    int(self.config.feedback.retention_s))]
        if new:  # listed for operators, and for its key (an open API has none)
            listings = [s.key("decisions")] + ([s.key("decisions", entry["key"])] if entry["key"] else [])
            for listing in listings:
                commands += [("LPUSH", listing, entry["id"]), ("LTRIM", listing, 0, keep)]
        return commands

    async def publish(self, commands: list[Command]) -> None:
        if self.shared is not None:
            await self.shared.write(commands)

    def finish_soon(self, commands: list[Command]) -> None:
        if self.shared is not None and commands:
            self.shared.write_soon(commands)

    def record_features(self, engine: RoutingEngine, request_id: str, alias: str | None, decision: Routed,
                        answered_by: str, key: str | None = None) -> list[Command]:
        """Queue what feedback on this request will train on (nothing when feedback is off or no features); the
        Redis commands that let any replica find it."""
        if self.journal is None or decision.features is None or decision.probabilities is None:
            return []
        scorer = engine.scorer
        router = getattr(scorer, "router", None)
        targets = list(decision.probabilities)
        record = {"id": request_id, "aliases": [alias] if alias else [], "unix": time.time(), "key": key,
                  "targets": targets, "chosen": decision.target, "answered_by": answered_by,
                  "probabilities": [decision.probabilities[t] for t in targets],
                  "estimated_cost": [(decision.estimated_cost or {}).get(t) for t in targets],
                  "policy": decision.policy,
                  "encoder": identity_digest(getattr(scorer, "encoder_info", None)),
                  "hidden_states": getattr(router, "hidden_states", None),
                  **encode_features(decision.features)}
        if not self.journal.record_routed(record):
            self.metrics.journal_dropped.inc()
        s = self.shared
        if s is None:
            return []
        ttl = int(self.config.feedback.retention_s)
        return [("SET", s.key("routed", request_id), dumps(record), "EX", ttl)] + [
            ("SET", s.key("alias", a), request_id, "EX", ttl) for a in record["aliases"]]

    def alias_commands(self, request_id: str, alias: str) -> list[Command]:
        s = self.shared
        if s is None:
            return []
        return [("SET", s.key("alias", alias), request_id, "EX", int(self.config.feedback.retention_s))]

    # --- what a client may read ------------------------------------------------------------------------
    async def recent_decisions(self, who: Caller, limit: int) -> list[dict]:
        """The newest decisions first: every key's for an operator, a client key's own otherwise."""
        local = [e for e in reversed(self.decisions) if who.sees(e.get("key"))][:limit]
        s = self.shared
        if s is None:
            return local
        listing = s.key("decisions") if who.operator else s.key("decisions", str(who.alias))

        async def shared_entries(client: Any) -> list[dict]:
            ids = await client.lrange(listing, 0, limit - 1)
            entries = [loads(v) for v in await client.mget([s.key("decision", i) for i in ids])] if ids else []
            return [e for e in entries if isinstance(e, dict) and who.sees(e.get("key"))]

        return await s.read(shared_entries, local)

    async def stats(self, who: Caller) -> dict:
        fields = None
        if self.shared is not None:
            s = self.shared
            fields = await s.read(lambda client: client.hgetall(s.key("spend")), None)
        if not who.operator:
            return self.spend.snapshot(self.best_target, fields, alias=who.alias)
        figures = self.spend.snapshot(self.best_target, fields)
        figures["state"] = "local" if self.shared is None else ("redis" if fields is not None else
                                                                 "local (redis unreachable)")
        return figures

    async def feedback(self, who: Caller, request_id: str, score: float, target: str | None) -> dict:
        """Record feedback on a routed request this caller may see: found in this replica's journal, else (with
        Redis) in what the replica that served it stored. FeedbackRefused says why not."""
        journal = self.journal
        assert journal is not None
        s = self.shared
        try:
            record = await asyncio.wrap_future(journal.lookup(request_id))
        except UnknownRequestId:
            if s is None:
                raise
            record = await s.read(lambda client: _shared_record(client, s, request_id), None)
            if record is None:
                raise
        if not who.sees(record.get("key")):  # another key's request: as if it did not exist
            raise UnknownRequestId(unknown_id_message(request_id))
        claim = None
        if s is not None:  # one feedback per request across replicas
            claim = s.key("feedback", str(record["id"]))
            ttl = int(self.config.feedback.retention_s)
            if not await s.read(lambda client: client.set(claim, 1, nx=True, ex=ttl), True):
                raise DuplicateFeedback(f"id {request_id!r}: feedback for this request was already recorded")
        try:
            recorded: dict = await asyncio.wrap_future(journal.feedback(request_id, score, target, record=record))
        except FeedbackRefused:
            if s is not None and claim is not None:
                await s.write([("DEL", claim)])
            raise
        given = {"score": recorded["score"], "target": recorded["target"]}
        for entry in self.decisions:
            if entry["id"] == recorded["id"]:
                entry["feedback"] = given
        if s is not None:
            key = s.key("decision", recorded["id"])
            shown = loads(await s.read(lambda client: client.get(key), None))
            if isinstance(shown, dict):
                await s.write(self._decision_commands({**shown, "feedback": given}))
        return recorded


async def _shared_record(client: Any, s: SharedState, request_id: str) -> dict | None:
    """A routed request another replica stored, by its id or its OpenAI id."""
    found = await client.get(s.key("routed", request_id))
    if found is None:
        original = await client.get(s.key("alias", request_id))
        found = None if original is None else await client.get(s.key("routed", original))
    record = loads(found)
    return record if isinstance(record, dict) and isinstance(record.get("id"), str) else None


def gateway(request: Request) -> Gateway:
    """FastAPI dependency: the running gateway."""
    gw: Gateway = request.app.state.gateway
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]
