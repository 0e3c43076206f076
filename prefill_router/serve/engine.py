"""The gateway's routing step: which part of the conversation is read, P per target for it (length-bucketed
micro-batches, cached), a deadline, the session rules, then the request's policy.

Per request (`RoutingEngine.decide`):
1. the session mode picks the conversation to route on: `per_turn` the whole request, `first_turn` the
   conversation up to its first user message (every turn of a conversation then reads the same window, on
   every replica, with no shared state), `sticky` a pinned target when the session has one;
2. the routing window (`features/window.py`: the first system message and the last user message) is taken;
   the encoder cuts it to `max_route_tokens` tokens. The cache key is the window, so turns that share it share
   one forward pass;
3. P and C come from the cache, from an identical prompt being scored, or from a forward pass in the window's
   length bucket (a long prompt never holds a short one);
4. when the routing deadline passes first, the request goes to the default target (counted and flagged);
   the forward pass goes on and fills the cache if it had started, and is dropped if nobody waits for it;
5. the policy (with lambda, or tolerance) is applied among the allowed targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from prefill_router.data.prompt import Message, check_prompt, prompt_hash, unknown_role
from prefill_router.errors import DataError, PrefillRouterError
from prefill_router.features.window import first_turn, window_messages
from prefill_router.serve.batching import LengthBuckets, LRUCache
from prefill_router.serve.metrics import GatewayMetrics
from prefill_router.serve.shared import SharedState

if TYPE_CHECKING:
    from prefill_router.router import Router

SessionMode = Literal["per_turn", "first_turn", "sticky"]
# Serving window for a checkpoint that records none (trained on whole prompts): the p97 of MMLU-Pro's
# templated lengths, so nearly every single-turn prompt of that kind is read exactly as in training.
logger = logging.getLogger(__name__)
DEFAULT_MAX_ROUTE_TOKENS = 512
CHARS_PER_TOKEN = 4  # to estimate the input tokens the router did not read, for the cost estimate only
PROMPT_OVERHEAD_CHARS = 64  # a prompt's fixed share of a forward pass (template, call), in characters of work
# Admission sends a prompt to the encoder only when its estimated wait is within this share of the deadline: the
# drain rate is an average, and a prompt admitted on an optimistic estimate waits the whole deadline out.
ADMISSION_MARGIN = 0.8


class BadMessages(DataError):
    """The request's messages cannot be routed (empty, wrong shape, no text)."""


@dataclass(frozen=True)
class Scores:
    P: np.ndarray  # [K] P(correct) per target, in the scorer's target order
    C: np.ndarray  # [K] estimated USD per target for the prompt the router read
    truncated: bool = False
    tokens: float = 0.0  # templated input tokens the router read (before truncation)
    # [hidden states, hidden] pooled features the router read: kept so feedback can retrain without re-encoding
    features: np.ndarray | None = field(default=None, repr=False)
    scorer: str = "prefill"  # which scorer made P: "prefill" (the encoder) or "fallback" (the fast scorer)


class Scorer(Protocol):
    """What the gateway needs from a router: its targets, P/C for a batch, and a policy applied to P/C (the
    policy of the scorer that made them: `Scores.scorer`).

    Optional, looked up with getattr: `score_fallback(prompts) -> list[Scores]`, a fast scorer (well under a
    millisecond, no encoder forward) for when the prefill cannot answer in time, with `has_fallback`;
    `estimate_costs`, `policy_spec`, `check_policy`, `max_route_tokens`, `seconds_per_char` and
    `preferred_batch_size` (a capacity measurement)."""

    targets: list[str]

    def score_batch(self, prompts: list[list[Message]]) -> list[Scores]: ...

    def choose(self, scores: Scores, policy: str | None, lam: float | None) -> int: ...


@dataclass
class Routed:
    """One request's routing outcome."""

    target: str                                  # where the request goes first
    probabilities: dict[str, float] | None       # None: no scores (a pinned session, a missed deadline)
    estimated_cost: dict[str, float] | None
    latency_ms: float
    truncated: bool | None = False               # None: unknown, the router did not read the prompt
    cache: str | None = None                     # hit | miss | shared (None: no lookup)
    policy: str | None = None
    deadline_exceeded: bool = False
    session: str | None = None                   # new | pinned | escalated (sticky sessions only)
    features: np.ndarray | None = field(default=None, repr=False)  # what the router read (Scores.features)
    decided_by: str = "prefill"                  # prefill | fallback | default | pinned

    def to_dict(self) -> dict:
        return {"target": self.target, "decided_by": self.decided_by, "probabilities": self.probabilities,
                "estimated_cost": self.estimated_cost, "policy": self.policy, "latency_ms": self.latency_ms,
                "truncated": self.truncated, "cache": self.cache, "deadline_exceeded": self.deadline_exceeded,
                "session": self.session}


def routed_window(messages: list[Message], mode: SessionMode) -> list[Message]:
    """What the router reads of validated messages: in `first_turn` mode the conversation up to its first user
    turn, otherwise all of it, then the routing window (features/window.py)."""
    return window_messages(first_turn(messages) if mode == "first_turn" else messages)


def routing_messages(messages: Any) -> list[Message]:
    """Validate OpenAI chat messages and reduce them to [{"role", "content": str}] for the encoder
    (`data.prompt.check_prompt`: text parts kept, images and audio dropped), leaving out messages with no
    text. Raises BadMessages naming the offending message."""
    if not isinstance(messages, list) or not messages:
        raise BadMessages("'messages' must be a non-empty list")
    try:
        normal = check_prompt(messages)
    except DataError as exc:
        raise BadMessages(str(exc)) from None
    assert not isinstance(normal, str)  # a list stays a list
    problem = unknown_role(normal)  # the messages go upstream as sent: an unknown role would fail there
    if problem:
        raise BadMessages(problem)
    return [m for m in normal if m["content"]]


def messages_key(messages: list[Message]) -> str:
    """The score cache's key (in memory only): the prompt's one hash."""
    return prompt_hash(messages)


def _chars(messages: list[Message]) -> int:
    return sum(len(m["content"]) for m in messages)


class SessionPins:
    """session id -> pinned target, forgotten `ttl_s` after its last use, at most `max_size` kept (LRU)."""

    def __init__(self, ttl_s: float, max_size: int):
        self.ttl_s = ttl_s
        self._pins: LRUCache[str, tuple[str, float]] = LRUCache(max_size)

    def get(self, session: str) -> str | None:
        entry = self._pins.get(session)
        if entry is None or entry[1] < time.monotonic():
            return None
        self.set(session, entry[0])  # sliding expiry: an active conversation keeps its pin
        return entry[0]

    def set(self, session: str, target: str) -> None:
        self._pins.put(session, (target, time.monotonic() + self.ttl_s))

    def __len__(self) -> int:
        return len(self._pins)


class SharedPins:
    """Session pins as the engine reads them: in Redis when the gateway shares state (so a conversation keeps its
    target whichever replica serves its next turn), always also here, which answers while Redis is away."""

    def __init__(self, local: SessionPins, shared: SharedState | None = None):
        self.local = local
        self.shared = shared

    async def get(self, session: str) -> str | None:
        here = self.local.get(session)
        s = self.shared
        if s is None:
            return here
        key, ttl = s.key("pin", session), max(1, int(self.local.ttl_s))
        found = await s.read(lambda client: client.getex(key, ex=ttl), here)  # sliding expiry, as here
        if found is not None and found != here:
            self.local.set(session, found)
        return found

    async def set(self, session: str, target: str) -> None:
        self.local.set(session, target)
        if self.shared is not None:
            ttl = max(1, int(self.local.ttl_s))
            await self.shared.write([("SET", self.shared.key("pin", session), target, "EX", ttl)])

    def __len__(self) -> int:
        return len(self.local)


@dataclass
class _Inflight:
    task: asyncio.Task[Scores] | None = None
    waiters: int = 0


class RoutingEngine:
    def __init__(self, scorer: Scorer, *, max_batch_size: int | None = 16, max_wait_ms: float = 5.0,
                 cache_size: int = 4096, metrics: GatewayMetrics | None = None,
                 length_buckets: Sequence[int] = (2000,), deadline_ms: float | None = None,
                 default_target: str | None = None, session_mode: SessionMode = "per_turn",
                 session_ttl_s: float = 3600.0, max_sessions: int = 100_000, escalate_only: bool = False,
                 strength: Sequence[str] | None = None, shared: SharedState | None = None):
        self.scorer = scorer
        self.metrics = metrics
        self.cache: LRUCache[str, Scores] = LRUCache(cache_size)
        self._inflight: dict[str, _Inflight] = {}
        on_batch = metrics.batch_size.observe if metrics is not None else None
        # The encoder reads at most the routing window: a longer prompt costs what the window costs.
        window_chars = CHARS_PER_TOKEN * int(getattr(scorer, "max_route_tokens", DEFAULT_MAX_ROUTE_TOKENS))

        def work(messages: list[Message]) -> float:
            return PROMPT_OVERHEAD_CHARS + min(_chars(messages), window_chars)

        # max_batch_size None: what the scorer measured to route more tokens per second than one at a time.
        batch = max_batch_size if max_batch_size is not None else int(getattr(scorer, "preferred_batch_size", 1))
        # The bucket of a prompt is the length of its window's text (characters: known before tokenizing).
        self.batcher: LengthBuckets[list[Message], Scores] = LengthBuckets(
            scorer.score_batch, length_buckets, _chars, max_batch_size=batch, max_wait_ms=max_wait_ms,
            on_batch=on_batch, cost=work, seconds_per_unit=getattr(scorer, "seconds_per_char", None))
        self.deadline_s = None if deadline_ms is None else deadline_ms / 1000
        targets = list(scorer.targets)
        # weakest -> strongest; the default and the escalate-only rule read it
        self.strength = [t for t in (strength or targets) if t in targets] + \
            [t for t in targets if t not in (strength or targets)]
        self.default_target = default_target if default_target in targets else self.strength[-1]
        self.session_mode = session_mode
        self.escalate_only = escalate_only
        self.sessions = SharedPins(SessionPins(session_ttl_s, max_sessions), shared)
        self.deadline_counter = None if metrics is None else metrics.deadline_exceeded
        self.session_counter = None if metrics is None else metrics.session_decisions
        self.active = 0  # requests holding this engine (`in_use`): a replaced engine closes once none do

    @property
    def targets(self) -> list[str]:
        return list(self.scorer.targets)

    async def close(self) -> None:
        await self.batcher.close()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[RoutingEngine]:
        """Hold this engine for one request, from taking it to its last use: a reload then waits for the request
        before it closes the engine (taking it and counting it happen with no await between)."""
        self.active += 1
        try:
            yield self
        finally:
            self.active -= 1

    async def retire(self, grace_s: float = 300.0) -> None:
        """Close once the decisions in progress have finished (this engine was replaced by a reload)."""
        waited = 0.0
        while self.active and waited < grace_s:
            await asyncio.sleep(0.05)
            waited += 0.05
        await self.close()

    async def scores(self, messages: list[Message]) -> tuple[Scores, str]:
        """P and C for a routing window, and where they came from: "hit" (the cache), "shared" (an identical
        window being scored right now) or "miss" (a new forward pass)."""
        key = messages_key(messages)
        hit = self.cache.get(key)
        if hit is not None:
            self._count_cache("hit")
            return hit, "hit"
        entry = self._inflight.get(key)
        source = "shared"
        if entry is None:
            source = "miss"
            entry = self._inflight[key] = _Inflight()
            # Queued now, not when the task first runs: the next arrival's admission must see this prompt's work.
            queued = self.batcher.enqueue(messages, wanted=lambda: entry.waiters > 0, deadline_s=self.deadline_s)
            entry.task = asyncio.get_running_loop().create_task(self._compute(key, queued))
            # Retrieve the exception even when every waiter has gone, so none is reported as lost.
            entry.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._count_cache(source)
        assert entry.task is not None  # set when the entry was made
        entry.waiters += 1
        try:
            # shield: a caller that gives up does not cancel a forward pass others may share; one that nobody
            # waits for any more is dropped before it starts (see `wanted` in `_compute`).
            return await asyncio.shield(entry.task), source
        finally:
            entry.waiters -= 1

    async def _compute(self, key: str, queued: asyncio.Future[Scores]) -> Scores:
        try:
            result = await queued
        finally:
            self._inflight.pop(key, None)
        if key not in self.cache:  # a fallback decision made meanwhile stays: the conversation keeps its target
            self.cache.put(key, result)
        return result

    async def decide(self, messages: list[Message], *, policy: str | None = None, lam: float | None = None,
                     allowed: Sequence[str] | None = None, session: str | None = None,
                     mode: SessionMode | None = None) -> Routed:
        """Route already-validated routing messages (see the module docstring for the steps).

        allowed: the targets this request may go to (None: all); session: a sticky session id (used in
        `sticky` mode, or whenever `mode` is given as sticky); mode: the session mode (default: the engine's).
        """
        with self.in_use():
            return await self._decide(messages, policy, lam, allowed, session, mode)

    async def _decide(self, messages: list[Message], policy: str | None, lam: float | None,
                      allowed: Sequence[str] | None, session: str | None, mode: SessionMode | None) -> Routed:
        start = time.perf_counter()
        mode = mode or self.session_mode
        allowed = list(self.scorer.targets) if allowed is None else [t for t in self.scorer.targets if t in allowed]
        if mode == "sticky" and session is None:
            mode = "first_turn"  # no session id: the stateless way to keep a conversation on one target
        sticky = session if mode == "sticky" else None  # the session whose pin applies
        pinned = await self.sessions.get(sticky) if sticky is not None else None
        if pinned is not None and pinned not in allowed:
            pinned = None  # this request may not go there: route it afresh, and leave the pin alone
        if pinned is not None and not self.escalate_only:
            self._count_session("pinned")
            self._count_decision("pinned")
            return Routed(pinned, None, None, (time.perf_counter() - start) * 1000, truncated=None, session="pinned",
                          decided_by="pinned")

        routed = await self._route(routed_window(messages, mode), messages, policy, lam, allowed, start)
        if sticky is None or routed.deadline_exceeded:
            return routed  # a deadline's default target is not pinned: the next turn routes again
        if pinned is None or self.strength.index(routed.target) > self.strength.index(pinned):
            await self.sessions.set(sticky, routed.target)
            outcome = routed.session = "new" if pinned is None else "escalated"
        else:
            outcome = "pinned"
            routed = replace(routed, target=pinned, session=outcome)
        self._count_session(outcome)
        return routed

    async def _route(self, window: list[Message], messages: list[Message], policy: str | None, lam: float | None,
                     allowed: list[str], start: float) -> Routed:
        fast = getattr(self.scorer, "score_fallback", None) if getattr(self.scorer, "has_fallback", False) else None
        scores: Scores | None = None
        source: str | None = None
        exceeded = False
        key = messages_key(window)
        if fast is not None and self.deadline_s is not None and key not in self.cache and \
                key not in self._inflight and \
                self.batcher.estimated_wait(window) > ADMISSION_MARGIN * self.deadline_s:
            # Admission control: the queue ahead cannot be scored in time, so decide now rather than wait the
            # deadline out (the prompt is not queued: nobody would wait for it).
            if self.metrics is not None:
                self.metrics.admission_fallbacks.inc()
        else:
            try:
                scores, source = await asyncio.wait_for(self.scores(window), self.deadline_s)
            except TimeoutError:
                exceeded = True
        if scores is None and fast is not None:
            try:
                scores = fast([window])[0]
                # Cached like the prefill's: the next turn of a `first_turn` conversation (the same window) then
                # goes where this one went, even once the encoder has caught up.
                self.cache.put(key, scores)
            except Exception:  # noqa: BLE001 - the default target is the last resort; the cause is logged
                logger.exception("fallback scorer failed; routing to the default target")
        if scores is None:
            target = self.default_target if self.default_target in allowed else \
                next(t for t in reversed(self.strength) if t in allowed)
            if exceeded and self.deadline_counter is not None:
                self.deadline_counter.labels(target=target).inc()
            self._count_decision("default")
            return Routed(target, None, None, (time.perf_counter() - start) * 1000, truncated=None,
                          deadline_exceeded=exceeded, decided_by="default")
        if exceeded and self.deadline_counter is not None:
            self.deadline_counter.labels(target="fallback").inc()
        unread = _chars(messages) - _chars(window)
        estimate = getattr(self.scorer, "estimate_costs", None)
        if unread > 0 and estimate is not None:
            # The whole conversation goes upstream, so the cost counts the tokens the router did not read too.
            scores = replace(scores, C=np.asarray(estimate(scores.tokens + unread / CHARS_PER_TOKEN), np.float64))
        targets = list(self.scorer.targets)
        # Targets this request may not use get no P, so no policy picks them (indices stay the router's own,
        # which a "fixed:<k>" policy names); a fixed target outside the allow-list yields to the best allowed.
        barred = np.array([t not in allowed for t in targets])
        masked = np.where(barred, np.nan, scores.P)
        target = targets[self.scorer.choose(replace(scores, P=masked), policy, lam)]
        if target not in allowed:
            target = allowed[int(np.nanargmax(masked[[targets.index(t) for t in allowed]]))]
        latency_ms = (time.perf_counter() - start) * 1000
        if self.metrics is not None:
            self.metrics.routing_latency.observe(latency_ms / 1000)
        self._count_decision(scores.scorer)
        describe = getattr(self.scorer, "policy_spec", None)
        spec = policy if describe is None else (describe(policy, lam) if scores.scorer == "prefill" else
                                                describe(policy, lam, scorer=scores.scorer))
        return Routed(target, {t: float(p) for t, p in zip(targets, scores.P)},
                      {t: float(c) for t, c in zip(targets, scores.C)}, latency_ms, scores.truncated, source,
                      spec, deadline_exceeded=exceeded, features=scores.features, decided_by=scores.scorer)

    def _count_decision(self, scorer: str) -> None:
        if self.metrics is not None:
            self.metrics.decided_by.labels(scorer=scorer).inc()

    def _count_cache(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.cache.labels(result=result).inc()

    def _count_session(self, outcome: str) -> None:
        if self.session_counter is not None:
            self.session_counter.labels(outcome=outcome).inc()


class RouterScorer:
    """A trained `prefill_router.router.Router` seen through the `Scorer` interface.

    max_route_tokens: the routing window. A checkpoint trained on windowed features serves with its own window
    (a different number is refused). A checkpoint trained on whole prompts is served with this window (default
    DEFAULT_MAX_ROUTE_TOKENS) so that a long prompt costs bounded time; `window_source` says which applies.
    prefix_cache_mb: prefix reuse in the encoder (features/prefix_cache.py); 0 turns it off.
    dtype: the encoder's number format on a CPU (`router.dtype`: auto, fp32, bf16 or int8; features/formats.py);
    None serves the encoder as it is. `quantize="int8"` is the deprecated name of dtype="int8".
    """

    def __init__(self, router: Router, max_route_tokens: int | None = None, prefix_cache_mb: float = 0,
                 dtype: str | None = None, *, quantize: str | None = None):
        from prefill_router.errors import ConfigError

        # A shallow copy: the serving window's encoder (see _apply_window) is set on this copy only.
        self.router = copy.copy(router)
        self.targets = list(router.targets)
        trained = (router.encoder_identity or {}).get("max_route_tokens")
        if trained is not None and max_route_tokens is not None and max_route_tokens != trained:
            raise ConfigError(f"router.max_route_tokens: {max_route_tokens}, but the checkpoint was trained on a "
                              f"routing window of {trained} tokens; use {trained} (or leave it unset)")
        self.max_route_tokens = trained or max_route_tokens or DEFAULT_MAX_ROUTE_TOKENS
        self.window_source = "checkpoint" if trained else "serving"
        self.prefix_cache_mb = prefix_cache_mb
        self.dtype = dtype or quantize
        self.dtype_reason: str | None = None  # why the encoder serves in its format, once _apply_dtype decided
        self.fallback_unusable: str | None = None  # why the fallback scorer cannot run (found at warm-up)
        # Set from a capacity measurement (serve/capacity.py) when the gateway measures one at start.
        self.preferred_batch_size = 1
        self.seconds_per_char: float | None = None
        self.capacity: dict | None = None

    def warm_up(self) -> None:
        """Load the encoder now (the router loads it lazily) and run one forward, so the first request is fast."""
        self.router.predict_batch([[{"role": "user", "content": "warm up"}]])
        self._apply_window()
        self._apply_dtype()
        use_prefix_cache = getattr(self.router.encoder, "use_prefix_cache", None)
        if use_prefix_cache is not None:  # local encoders only; a remote one has its own
            use_prefix_cache(self.prefix_cache_mb)
        if self.has_fallback:  # its first call copies the tokenizer and reads the embedding table
            try:
                self.score_fallback([[{"role": "user", "content": "warm up"}]])
            except PrefillRouterError as exc:  # a remote encoder has no embedding table to read
                self.fallback_unusable = str(exc)
                logger.warning("the checkpoint's fallback scorer cannot run here (%s); a request the prefill router "
                               "cannot decide in time goes to the default target", exc)

    def _apply_dtype(self) -> None:
        """Serve with the encoder in the number format `router.dtype` resolves to on this CPU: the same model
        loaded again in that format (its identity unchanged: the format is not part of it), so a router handed in
        keeps its own encoder. Only a local encoder on the CPU, loaded from files, and not trained on int8
        features, can change; otherwise it serves as it is, and `runtime_info` says why."""
        from prefill_router.features.encoder import Encoder, load_encoder
        from prefill_router.features.formats import resolve_format

        encoder = getattr(self.router, "encoder", None)
        if self.dtype is None or not isinstance(encoder, Encoder):
            return
        if encoder.device.type != "cpu" or encoder._resolved is None or encoder.spec.quantize is not None:
            self.dtype_reason = (f"router.dtype applies to an encoder on the CPU loaded from files and trained "
                                 f"without quantize; serving {encoder} as it is")
            logger.info(self.dtype_reason)
            return
        number_format, self.dtype_reason = resolve_format(self.dtype, "cpu")
        if number_format == encoder.number_format:
            return
        served = load_encoder(encoder.spec.model_copy(update={"dtype": number_format}))
        self.router.features_of(served, ["warm up"])
        self.router.encoder = served

    @property
    def runtime_info(self) -> dict:
        """How routing runs: the encoder's number format (and why), prefix reuse, encoder layers run, torch
        threads, and whether the checkpoint has a fallback scorer."""
        import torch

        encoder = getattr(self.router, "encoder", None)
        cache = getattr(encoder, "prefix_cache", None)
        return {"dtype": getattr(encoder, "number_format", None), "dtype_requested": self.dtype,
                "dtype_reason": self.dtype_reason or getattr(encoder, "format_reason", None),
                "trained_quantize": (self.router.encoder_identity or {}).get("quantize"),
                "fallback_scorer": self.has_fallback, "capacity": self.capacity,
                "layers_run": getattr(self.router, "layers_run", None), "torch_threads": torch.get_num_threads(),
                "prefix_cache": cache.stats() if cache is not None else None}

    def _apply_window(self) -> None:
        """Give a router trained on whole prompts an encoder that reads the serving window: the same model and
        tokenizer, with `max_route_tokens` set. (A windowed checkpoint's encoder already has it.)"""
        from prefill_router.features.encoder import Encoder

        encoder = getattr(self.router, "encoder", None)
        if self.window_source != "serving" or not isinstance(encoder, Encoder) or \
                encoder.spec.max_route_tokens == self.max_route_tokens:
            return
        self.router.encoder = encoder.with_route_window(self.max_route_tokens)

    @property
    def encoder_loaded(self) -> bool:
        return getattr(self.router, "encoder", None) is not None

    @property
    def encoder_info(self) -> dict | None:
        return getattr(self.router, "encoder_identity", None)

    @property
    def window_info(self) -> dict:
        return {"max_route_tokens": self.max_route_tokens, "source": self.window_source}

    def check_policy(self, policy: str | None, lam: float | None) -> None:
        """Raise ConfigError now for a policy/lambda the router cannot apply, rather than at a request."""
        self.router.resolve_policy(policy, lam)

    def policy_spec(self, policy: str | None, lam: float | None, scorer: str = "prefill") -> str:
        return str(self.router.describe_policy(policy, lam, scorer=_kind(scorer)))

    def score_batch(self, prompts: list[list[Message]]) -> list[Scores]:
        self._apply_window()  # no-op after warm_up; here for a router whose encoder was attached later
        X, tokens, truncated, _ = self.router.encode(prompts)
        P, C = self.router.predict_proba_features(X), self.router.estimate_costs(tokens)
        return [Scores(np.asarray(P[i], dtype=np.float64), np.asarray(C[i], dtype=np.float64), bool(truncated[i]),
                       float(tokens[i]), np.asarray(X[i], dtype=np.float32)) for i in range(len(prompts))]

    def estimate_costs(self, tokens: float) -> np.ndarray:
        return np.asarray(self.router.estimate_costs(np.array([tokens], dtype=np.float64))[0], dtype=np.float64)

    @property
    def has_fallback(self) -> bool:
        """Whether the checkpoint holds a fast fallback scorer (older ones do not) that can run here."""
        return getattr(self.router, "fallback", None) is not None and self.fallback_unusable is None

    def score_fallback(self, prompts: list[list[Message]]) -> list[Scores]:
        """P and C from the checkpoint's fast scorer: no encoder forward, so it answers in well under a
        millisecond, on the event loop, however busy the encoder is."""
        P, tokens = self.router.predict_fallback(prompts)
        C = self.router.estimate_costs(tokens)
        return [Scores(np.asarray(P[i], np.float64), np.asarray(C[i], np.float64),
                       bool(tokens[i] > self.max_route_tokens), float(tokens[i]), None, scorer="fallback")
                for i in range(len(prompts))]

    def choose(self, scores: Scores, policy: str | None, lam: float | None) -> int:
        return int(self.router.choose(scores.P[None, :], scores.C[None, :], policy=policy, lam=lam,
                                      scorer=_kind(scores.scorer))[0])


def _kind(scorer: str) -> Literal["prefill", "fallback"]:
    return "fallback" if scorer == "fallback" else "prefill"
