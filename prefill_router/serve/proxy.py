"""The OpenAI-compatible part of the gateway: route, then proxy.

    POST /v1/chat/completions   route, then proxy to the chosen upstream (stream passthrough included)
    POST /v1/route              the routing decision only
    GET  /v1/models             router aliases and targets
    GET  /health                encoder loaded, upstreams configured
    GET  /metrics               Prometheus

An upstream's own 4xx reply (other than 408/429) is passed through unchanged; see `upstream.py` for the rules.
Every routed or pinned chat reply carries `x-router-request-id`, the id that POST /v1/feedback takes (the
upstream's OpenAI `id` of a plain reply works too).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from prefill_router.data.prompt import Message
from prefill_router.errors import EncoderError
from prefill_router.serve.auth import Caller, CallerDep
from prefill_router.serve.engine import BadMessages, Routed, RoutingEngine, SessionMode, routing_messages
from prefill_router.serve.errors import GatewayError, error_body, error_response
from prefill_router.serve.jsonbody import read_json
from prefill_router.serve.models import (
    BadRouterOptions,
    ModelChoice,
    RouterOptions,
    UnknownModel,
    apply_options,
    model_ids,
    parse_router_options,
    preset_policy,
    resolve_model,
)
from prefill_router.serve.spend import StreamFacts, reply_facts
from prefill_router.serve.state import Gateway, GatewayDep
from prefill_router.serve.upstream import AllUpstreamsFailed, UpstreamReply, relayed_headers

log = logging.getLogger("prefill_router.serve")

T = TypeVar("T")

router = APIRouter()


class UpstreamStream(Response):
    """Relays an open upstream SSE response byte for byte.

    The upstream response is closed when the stream ends, fails, or the client disconnects; closing it drops
    the upstream connection, which cancels the generation there. `on_end(facts)` gets the stream's id and usage
    (what was seen of them) once it is over, however it ended.
    """

    def __init__(self, upstream: httpx.Response, headers: dict[str, str], on_disconnect: Callable[[], None],
                 on_error: Callable[[Exception], None], on_end: Callable[[StreamFacts], None]):
        # Not Response.__init__: that would declare a Content-Length for an empty body.
        self.status_code = upstream.status_code
        self.background = None
        self.init_headers(headers)
        self.upstream = upstream
        self.on_disconnect = on_disconnect
        self.on_error = on_error
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False  # after the last byte, the server reports the closed cycle as a disconnect too
        facts = StreamFacts()

        async def relay(cancel: anyio.CancelScope) -> None:
            nonlocal finished
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.upstream.aiter_raw():
                    facts.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                # Too late to fall back: tell the client in the stream's own format, then end it.
                self.on_error(exc)
                event = error_body(f"upstream stream failed: {type(exc).__name__}", "upstream_error",
                                   "upstream_stream_failed")
                await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(),
                            "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            cancel.cancel()

        async def watch(cancel: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished:
                        self.on_disconnect()
                    cancel.cancel()
                    return

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(relay, group.cancel_scope)
                group.start_soon(watch, group.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_end(facts)


async def unless_client_leaves(receive: Receive, call: Awaitable[T]) -> T | None:
    """Await `call`, or cancel it as soon as the client disconnects (then None): a request nobody waits for
    must not go on retrying and falling back. Call once the body has been read."""
    outcome: list = []  # [result] or [None, exception] once `call` has finished

    async def watch(cancel: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        cancel.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            outcome.append(await call)
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside the group (which would wrap it)
            outcome += [None, exc]
        group.cancel_scope.cancel()
    if len(outcome) == 2:
        raise outcome[1]
    return outcome[0] if outcome else None


# --- reading a request ---------------------------------------------------------------------------------------
def finish_stream(gw: Gateway, entry: dict, request_id: str, decision: Routed | None, facts: StreamFacts) -> None:
    """A relayed stream is over: account its usage, and let feedback name it by its OpenAI id."""
    shared = gw.account(entry, facts.usage)
    if decision is not None and facts.id and gw.journal is not None:
        gw.journal.add_alias(request_id, facts.id)
        shared += gw.alias_commands(request_id, facts.id)
    gw.finish_soon(shared)


def choose_model(gw: Gateway, body: dict, who: Caller, default: str | None = None) -> ModelChoice:
    """The request's model, read with the key's own trade-off for plain "router" and checked against the
    key's allowed targets."""
    config = gw.config
    tenant = who.tenant
    policy, lam = config.router.policy, config.router.lam
    if tenant is not None and tenant.preset is not None:
        _, policy, lam = preset_policy(config.presets[tenant.preset], policy, lam)
    elif tenant is not None and tenant.lam is not None:
        lam = tenant.lam
    try:
        choice = resolve_model(body.get("model", default), [t.name for t in config.targets], config.presets,
                               default_policy=policy, default_lam=lam)
    except UnknownModel as exc:
        raise GatewayError(400, str(exc), code=exc.code, param="model") from None
    if tenant is not None and tenant.models is not None and choice.pinned is not None and \
            choice.pinned not in tenant.models:
        raise GatewayError(403, f"key '{tenant.alias}' may not use model '{choice.pinned}'; it may use "
                           f"{', '.join(tenant.models)} or 'router'", code="model_not_allowed", param="model")
    return choice


def messages_of(body: dict) -> list[Message]:
    try:
        return routing_messages(body.get("messages"))
    except BadMessages as exc:
        raise GatewayError(400, str(exc), code="invalid_messages", param="messages") from None


def router_options(engine: RoutingEngine, body: dict, choice: ModelChoice,
                   who: Caller) -> tuple[RouterOptions, ModelChoice]:
    """The request's `router` object (serve/models.py) and the model choice it adjusts; a key's allowed targets
    bind its allow-list."""
    try:
        options = parse_router_options(body.get("router"), engine.targets)
        choice = apply_options(choice, options)
    except BadRouterOptions as exc:
        raise GatewayError(400, str(exc), code="invalid_router_options", param="router") from None
    allowed = who.tenant.models if who.tenant is not None else None
    if allowed is not None and choice.pinned is None:
        models = [t for t in (options.models or engine.targets) if t in allowed]
        if not models:
            raise GatewayError(403, f"key '{who.alias}' may use none of the targets asked for; it may use "
                               f"{', '.join(allowed)}", code="model_not_allowed", param="router.models")
        options = options.model_copy(update={"models": models})
    return options, choice


async def decide(gw: Gateway, engine: RoutingEngine, choice: ModelChoice, messages: list[Message],
                 options: RouterOptions, request: Request, body: dict) -> Routed:
    # router.session asks for a sticky session explicitly; the header and `user` pin in sticky mode only.
    session = options.session
    mode: SessionMode | None = "sticky" if options.session else None
    if session is None and gw.config.sessions.mode == "sticky":
        session = request.headers.get("x-session-id") or (body["user"] if isinstance(body.get("user"), str)
                                                          and body["user"] else None)
        if session is not None and len(session) > 256:
            raise GatewayError(400, "x-session-id / user: a session id is at most 256 characters",
                               code="invalid_session")
    try:
        return await engine.decide(messages, policy=choice.policy, lam=choice.lam, allowed=options.models,
                                   session=session, mode=mode)
    except (EncoderError, ValueError) as exc:
        raise GatewayError(400, f"cannot route this prompt: {exc}", code="routing_failed") from None


def routing_headers(decision: Routed | None, chosen: str) -> dict[str, str]:
    headers = {"x-router-chosen": chosen}
    if decision is None:
        headers["x-router-latency-ms"] = "0"
        return headers
    if decision.probabilities is not None:
        headers["x-router-probabilities"] = json.dumps(
            {t: round(p, 6) for t, p in decision.probabilities.items()}, separators=(",", ":"))
    headers["x-router-latency-ms"] = f"{decision.latency_ms:.3f}"
    if decision.cache is not None:
        headers["x-router-cache"] = decision.cache
    if decision.truncated is not None:  # None: nothing was read (a missed deadline, a pinned session)
        headers["x-router-truncated"] = "true" if decision.truncated else "false"
    headers["x-router-deadline"] = "exceeded" if decision.deadline_exceeded else "met"
    headers["x-router-decided-by"] = decision.decided_by
    if decision.session is not None:
        headers["x-router-session"] = decision.session
    return headers


def with_decision(content: bytes, decision: Routed | None, chosen: str, reply: UpstreamReply,
                  request_id: str) -> bytes:
    """A JSON reply with the routing decision added as "router_decision" (other replies unchanged)."""
    try:
        payload = json.loads(content)
    except ValueError:
        return content
    if not isinstance(payload, dict):
        return content
    routed = decision.to_dict() if decision is not None else {"target": chosen, "policy": "pinned"}
    payload["router_decision"] = {**routed, "answered_by": reply.target, "fallbacks": reply.fallbacks,
                                  "request_id": request_id}
    return json.dumps(payload).encode()


# --- endpoints ---------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request, gw: GatewayDep, who: CallerDep) -> Response:
    await gw.limits.admit(who)
    body = await read_json(request, gw.config.max_body_bytes)
    # Taken once, after the body, and held to the end: a reload mid-request neither mixes two routers in one
    # decision nor closes the engine under it.
    with gw.engine.in_use() as engine:
        return await _chat(request, gw, who, engine, body)


async def _chat(request: Request, gw: GatewayDep, who: Caller, engine: RoutingEngine, body: dict) -> Response:
    metrics = gw.metrics
    choice = choose_model(gw, body, who)
    messages = messages_of(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(400, f"'stream' must be a boolean (true or false), got {json.dumps(stream)[:40]}",
                           code="invalid_stream", param="stream")
    stream = bool(stream)
    options, choice = router_options(engine, body, choice, who)
    body = {k: v for k, v in body.items() if k != "router"}  # the gateway's own field, never forwarded
    decision: Routed | None = None
    if choice.pinned is not None:
        chosen = choice.pinned
    else:
        decision = await decide(gw, engine, choice, messages, options, request, body)
        chosen = decision.target
    # A pinned target is what the caller asked for by name: retried, never silently replaced.
    chain = [chosen] if choice.pinned else gw.config.fallback_chain(chosen)
    if options.models:  # an allow-list binds the fallbacks too: no target outside it answers
        chain = [t for t in chain if t == chosen or t in options.models]
    headers = routing_headers(decision, chosen)
    try:
        reply: UpstreamReply | None = await unless_client_leaves(request.receive, gw.pool.chat(chain, body,
                                                                                                stream=stream))
    except AllUpstreamsFailed as exc:
        failed = list(dict.fromkeys(a.target for a in exc.attempts))
        for name in failed[:-1]:  # the last had no next target to fall back to (a pinned one never has)
            metrics.fallbacks.labels(target=name).inc()
        headers["x-router-fallbacks"] = json.dumps(failed)
        raise GatewayError(502, str(exc), "upstream_error", "all_upstreams_failed", headers) from None
    if reply is None:  # nobody to answer: the attempt in flight and the rest of the chain were cancelled
        return error_response(metrics, 499, "the client closed the request", "invalid_request_error",
                              "client_disconnected")
    for name in reply.fallbacks:
        metrics.fallbacks.labels(target=name).inc()
    metrics.requests.labels(target=reply.target, status=str(reply.response.status_code)).inc()
    request_id = f"rr-{uuid.uuid4().hex}"
    headers["x-router-request-id"] = request_id
    headers["x-router-target"] = reply.target
    headers["x-router-fallbacks"] = json.dumps(reply.fallbacks)
    headers["x-router-upstream-ms"] = f"{reply.upstream_ms:.3f}"
    for key, value in relayed_headers(reply.response.headers).items():
        if not key.lower().startswith("x-router-"):
            headers.setdefault(key, value)
    if reply.response.status_code >= 400:  # the upstream's refusal, passed through (nothing to account)
        return Response(content=reply.response.content, status_code=reply.response.status_code, headers=headers)
    entry = gw.note_decision(request_id, choice.requested, decision, chosen, reply.target, messages, stream,
                             who.alias)
    if stream:
        target = reply.target

        def on_disconnect() -> None:
            metrics.stream_disconnects.labels(target=target).inc()

        def on_error(exc: Exception) -> None:
            metrics.upstream_errors.labels(target=target).inc()
            log.warning("stream from %s failed mid-way: %r", target, exc)

        if decision is not None:
            await gw.publish(gw.record_features(engine, request_id, None, decision, reply.target, who.alias))
        return UpstreamStream(reply.response, headers, on_disconnect, on_error,
                              lambda facts: finish_stream(gw, entry, request_id, decision, facts))
    content = reply.response.content
    reply_id, usage = reply_facts(content)
    shared = gw.account(entry, usage)
    if decision is not None:
        shared += gw.record_features(engine, request_id, reply_id, decision, reply.target, who.alias)
    await gw.publish(shared)  # one round trip to Redis, before the reply: another replica then knows it
    if options.return_decision:  # streams carry the decision in headers only
        content = with_decision(content, decision, chosen, reply, request_id)
    return Response(content=content, status_code=reply.response.status_code, headers=headers)


@router.post("/v1/route")
async def route(request: Request, gw: GatewayDep, who: CallerDep) -> JSONResponse:
    await gw.limits.admit(who)
    body = await read_json(request, gw.config.max_body_bytes)
    with gw.engine.in_use() as engine:
        choice = choose_model(gw, body, who, default="router")
        messages = messages_of(body)
        if choice.pinned is not None:
            raise GatewayError(400, f"model '{choice.pinned}' is a target, not a router alias; /v1/route needs "
                               "'router', 'router:<lambda>' or 'router:<preset>'", code="invalid_value",
                               param="model")
        options, choice = router_options(engine, body, choice, who)
        decision = await decide(gw, engine, choice, messages, options, request, body)
        # The caller sends the request upstream itself (a LiteLLM plugin, say); the id lets it post feedback on
        # this decision later, as for a chat reply.
        request_id = f"rr-{uuid.uuid4().hex}"
        await gw.publish(gw.record_features(engine, request_id, None, decision, decision.target, who.alias))
    return JSONResponse({**decision.to_dict(), "model": choice.requested, "request_id": request_id,
                         "fallback_chain": gw.config.fallback_chain(decision.target)})


@router.get("/v1/models")
async def models(gw: GatewayDep, who: CallerDep) -> JSONResponse:
    allowed = who.tenant.models if who.tenant is not None else None
    target_names = [t.name for t in gw.config.targets if allowed is None or t.name in allowed]
    routed_targets = gw.routed_targets
    data: list[dict[str, Any]] = []
    for model_id in model_ids(target_names, gw.config.presets):
        is_target = model_id in target_names
        entry = {"id": model_id, "object": "model", "created": 0,
                 "owned_by": "upstream" if is_target else "prefill-router"}
        if is_target:
            entry["routed"] = model_id in routed_targets  # False: reachable by name or as a fallback only
        data.append(entry)
    return JSONResponse({"object": "list", "data": data})


@router.get("/health")
async def health(gw: GatewayDep) -> JSONResponse:
    routed_targets = gw.routed_targets
    scorer = gw.engine.scorer
    upstreams = {}
    for t in gw.config.targets:
        if not t.api_key_env:
            key = "not needed"
        else:
            key = "set" if os.environ.get(t.api_key_env) else f"missing ({t.api_key_env})"
        upstreams[t.name] = {"base_url": t.base_url, "model": t.upstream_model, "api_key": key,
                             "routed": t.name in routed_targets}
    ready = all(v["api_key"] != f"missing ({t.api_key_env})" for t, v in zip(gw.config.targets,
                                                                              upstreams.values()))
    return JSONResponse({"status": "ok" if ready else "degraded",
                         "encoder_loaded": bool(getattr(scorer, "encoder_loaded", True)),
                         "encoder": gw.encoder_info or getattr(scorer, "encoder_info", None),
                         "window": getattr(scorer, "window_info", None),
                         "runtime": getattr(scorer, "runtime_info", None),
                         "checkpoint": gw.checkpoint, "loaded_unix": gw.loaded_unix,
                         "targets": routed_targets, "upstreams": upstreams})


@router.get("/metrics")
async def prometheus(gw: GatewayDep) -> Response:
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)
