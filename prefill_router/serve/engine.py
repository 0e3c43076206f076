"""The gateway's routing step: P per target for a prompt (micro-batched, cached), then the request's policy.

The cache keeps what the encoder and the MLP computed, P and C per target, keyed by a hash of the messages;
the policy and lambda are applied per request, so `router:cheap` and `router:best` share cache entries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from prefill_router.router.decision import RouteDecision
from prefill_router.serve.batching import LRUCache, MicroBatcher
from prefill_router.serve.metrics import GatewayMetrics


class BadMessages(ValueError):
    """The request's messages cannot be routed (empty, wrong shape, no text)."""


@dataclass(frozen=True)
class Scores:
    P: np.ndarray  # [K] P(correct) per target, in the scorer's target order
    C: np.ndarray  # [K] estimated USD per target for this prompt
    truncated: bool = False


class Scorer(Protocol):
    """What the gateway needs from a router: its targets, P/C for a batch, and a policy applied to P/C."""

    targets: list[str]

    def score_batch(self, prompts: list[list[dict]]) -> list[Scores]: ...

    def choose(self, scores: Scores, policy: str | None, lam: float | None) -> int: ...


def routing_messages(messages: Any) -> list[dict]:
    """Validate OpenAI chat messages and reduce them to [{"role", "content": str}] for the encoder.

    Content given as parts keeps only its text parts (joined by newlines); images and audio do not reach
    the encoder. Raises BadMessages naming the offending message.
    """
    if not isinstance(messages, list) or not messages:
        raise BadMessages("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadMessages(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadMessages(f"messages[{i}].role must be a non-empty string")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise BadMessages(f"messages[{i}].content[{j}] must be an object")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise BadMessages(f"messages[{i}].content[{j}].text must be a string")
                    parts.append(part["text"])
            text = "\n".join(parts)
        else:
            raise BadMessages(f"messages[{i}].content must be a string, a list of parts, or null")
        if text:
            out.append({"role": role, "content": text})
    if not any(m["content"].strip() for m in out):
        raise BadMessages("messages contain no text to route on")
    return out


def messages_key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RoutingEngine:
    def __init__(self, scorer: Scorer, *, max_batch_size: int = 16, max_wait_ms: float = 5.0,
                 cache_size: int = 4096, metrics: GatewayMetrics | None = None):
        self.scorer = scorer
        self.metrics = metrics
        self.cache: LRUCache[str, Scores] = LRUCache(cache_size)
        self._inflight: dict[str, asyncio.Task] = {}
        on_batch = metrics.batch_size.observe if metrics is not None else None
        self.batcher: MicroBatcher[list[dict], Scores] = MicroBatcher(
            scorer.score_batch, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, on_batch=on_batch)

    @property
    def targets(self) -> list[str]:
        return list(self.scorer.targets)

    async def close(self) -> None:
        await self.batcher.close()

    async def scores(self, messages: list[dict]) -> tuple[Scores, str]:
        """P and C for already-validated routing messages, and where they came from: "hit" (the cache),
        "shared" (an identical prompt being scored right now) or "miss" (a new forward pass)."""
        key = messages_key(messages)
        hit = self.cache.get(key)
        if hit is not None:
            self._count_cache("hit")
            return hit, "hit"
        task = self._inflight.get(key)
        source = "shared"
        if task is None:
            source = "miss"
            task = asyncio.get_running_loop().create_task(self._compute(key, messages))
            # Retrieve the exception even when every waiter has gone, so none is reported as lost.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._inflight[key] = task
        self._count_cache(source)
        # shield: a client that disconnects does not cancel a forward pass others may share.
        return await asyncio.shield(task), source

    async def _compute(self, key: str, messages: list[dict]) -> Scores:
        try:
            result = await self.batcher.submit(messages)
        finally:
            self._inflight.pop(key, None)
        self.cache.put(key, result)
        return result

    async def decide(self, messages: list[dict], *, policy: str | None = None,
                     lam: float | None = None) -> tuple[RouteDecision, str]:
        start = time.perf_counter()
        scores, source = await self.scores(messages)
        index = self.scorer.choose(scores, policy, lam)
        latency_ms = (time.perf_counter() - start) * 1000
        if self.metrics is not None:
            self.metrics.routing_latency.observe(latency_ms / 1000)
        targets = self.scorer.targets
        decision = RouteDecision(
            target=targets[index],
            probabilities={t: float(p) for t, p in zip(targets, scores.P)},
            estimated_cost={t: float(c) for t, c in zip(targets, scores.C)},
            latency_ms=latency_ms,
            truncated=scores.truncated,
        )
        return decision, source

    def _count_cache(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.cache.labels(result=result).inc()


class RouterScorer:
    """A trained `prefill_router.router.Router` seen through the `Scorer` interface."""

    def __init__(self, router):
        self.router = router
        self.targets = list(router.targets)

    def warm_up(self) -> None:
        """Load the encoder now (the router loads it lazily) and run one forward, so the first request is fast."""
        self.router.predict_batch([[{"role": "user", "content": "warm up"}]])

    @property
    def encoder_loaded(self) -> bool:
        return getattr(self.router, "encoder", None) is not None

    @property
    def encoder_info(self) -> dict | None:
        return getattr(self.router, "encoder_identity", None)

    def check_policy(self, policy: str | None, lam: float | None) -> None:
        """Raise ConfigError now for a policy/lambda the router cannot apply, rather than at a request."""
        self.router.resolve_policy(policy, lam)

    def score_batch(self, prompts: list[list[dict]]) -> list[Scores]:
        P, C, truncated = self.router.predict_batch(prompts)
        return [Scores(np.asarray(P[i], dtype=np.float64), np.asarray(C[i], dtype=np.float64), bool(truncated[i]))
                for i in range(len(prompts))]

    def choose(self, scores: Scores, policy: str | None, lam: float | None) -> int:
        return int(self.router.choose(scores.P[None, :], scores.C[None, :], policy=policy, lam=lam)[0])
