"""The OpenAI-compatible routing gateway (FastAPI).

    POST /v1/chat/completions   route, then proxy to the chosen upstream (stream passthrough included)
    POST /v1/route              the routing decision only
    GET  /v1/models             router aliases and targets
    GET  /health                encoder loaded, upstreams configured
    GET  /metrics               Prometheus

Every error the gateway itself produces has OpenAI's shape {"error": {"message", "type", "code"}}.
An upstream's own 4xx reply (other than 408/429) is passed through unchanged; see `upstream.py` for the rules.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features.encoder import set_cpu_threads
from prefill_router.serve.config import GatewayConfig
from prefill_router.serve.engine import BadMessages, Routed, RouterScorer, RoutingEngine, Scorer, routing_messages
from prefill_router.serve.jsonbody import BadBody, parse_json_body
from prefill_router.serve.metrics import GatewayMetrics
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
from prefill_router.serve.upstream import AllUpstreamsFailed, Attempt, UpstreamPool, UpstreamReply, relayed_headers

log = logging.getLogger("prefill_router.serve")

T = TypeVar("T")


class GatewayError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


class UpstreamStream(Response):
    """Relays an open upstream SSE response byte for byte.

    The upstream response is closed when the stream ends, fails, or the client disconnects; closing it drops
    the upstream connection, which cancels the generation there.
    """

    def __init__(self, upstream: httpx.Response, headers: dict[str, str], on_disconnect, on_error):
        # Not Response.__init__: that would declare a Content-Length for an empty body.
        self.status_code = upstream.status_code
        self.background = None
        self.init_headers(headers)
        self.upstream = upstream
        self.on_disconnect = on_disconnect
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False  # after the last byte, the server reports the closed cycle as a disconnect too

        async def relay(cancel: anyio.CancelScope) -> None:
            nonlocal finished
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.upstream.aiter_raw():
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


def create_app(config: GatewayConfig, scorer: Scorer, *, encoder_info: dict | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The gateway for `config`, routing with `scorer` (see `RouterScorer` for a trained `Router`)."""
    missing = [t for t in scorer.targets if t not in {c.name for c in config.targets}]
    if missing:
        raise ConfigError(f"targets: the router predicts for {missing}, which have no upstream entry in the config")
    check_policy = getattr(scorer, "check_policy", None)
    if check_policy is not None:  # a policy the router cannot apply fails at start, not at a request
        for where, policy, lam in [("router.policy/router.lam", config.router.policy, config.router.lam)] + [
                (f"presets.{name}", *preset_policy(p, config.router.policy, config.router.lam)[1:])
                for name, p in config.presets.items()]:
            try:
                check_policy(policy, lam)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    metrics = GatewayMetrics()
    client_keys = config.auth.all_keys()
    target_names = [t.name for t in config.targets]
    routed_targets = list(scorer.targets)

    def on_attempt_failed(attempt: Attempt) -> None:
        metrics.upstream_errors.labels(target=attempt.target).inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await app.state.engine.close()
        await app.state.pool.aclose()

    app = FastAPI(title="prefill-router gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.metrics = metrics
    app.state.engine = RoutingEngine(scorer, max_batch_size=config.batching.max_batch_size,
                                     max_wait_ms=config.batching.max_wait_ms, cache_size=config.cache_size,
                                     metrics=metrics, length_buckets=config.batching.length_buckets,
                                     deadline_ms=config.router.deadline_ms,
                                     default_target=config.router.default_target,
                                     session_mode=config.sessions.mode, session_ttl_s=config.sessions.ttl_s,
                                     max_sessions=config.sessions.max_sessions,
                                     escalate_only=config.sessions.escalate_only,
                                     strength=config.strength_order())
    app.state.pool = UpstreamPool(config.targets, retries=config.retries, on_attempt_failed=on_attempt_failed,
                                  transport=transport, request_timeout_s=config.request_timeout_s,
                                  max_retry_after_s=config.max_retry_after_s,
                                  max_body_bytes=config.max_upstream_body_bytes)

    def fail(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(status=str(status), code=code or "").inc()
        return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return fail(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return fail(exc.status_code, str(exc.detail), "invalid_request_error", code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return fail(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")

    def check_auth(request: Request) -> None:
        if not client_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(401, "missing bearer key: send 'Authorization: Bearer <key>'",
                               "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in client_keys):
            raise GatewayError(401, "invalid bearer key", "invalid_request_error", "invalid_api_key",
                               {"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = GatewayError(413, f"request body is larger than max_body_bytes={limit}", "invalid_request_error",
                               "request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise too_big
        except ClientDisconnect:  # it left, or was cut off for sending too slowly (listen.read_timeout_s)
            raise GatewayError(400, "the client disconnected before sending the whole body",
                               code="client_disconnected") from None
        try:
            return parse_json_body(bytes(raw))
        except BadBody as exc:
            raise GatewayError(400, str(exc), code="invalid_json") from None

    def choose_model(body: dict, default: str | None = None) -> ModelChoice:
        try:
            return resolve_model(body.get("model", default), target_names, config.presets,
                                 default_policy=config.router.policy, default_lam=config.router.lam)
        except UnknownModel as exc:
            raise GatewayError(400, str(exc), code="model_not_found") from None

    def messages_of(body: dict) -> list[dict]:
        try:
            return routing_messages(body.get("messages"))
        except BadMessages as exc:
            raise GatewayError(400, str(exc), code="invalid_messages") from None

    def router_options(body: dict, choice: ModelChoice) -> tuple[RouterOptions, ModelChoice]:
        """The request's `router` object (serve/models.py) and the model choice it adjusts."""
        try:
            options = parse_router_options(body.get("router"), routed_targets)
            return options, apply_options(choice, options)
        except BadRouterOptions as exc:
            raise GatewayError(400, str(exc), code="invalid_router_options") from None

    async def decide(choice: ModelChoice, messages: list[dict], options: RouterOptions, request: Request,
                     body: dict) -> Routed | None:
        if choice.pinned is not None:
            return None
        # router.session asks for a sticky session explicitly; the header and `user` pin in sticky mode only.
        session, mode = options.session, ("sticky" if options.session else None)
        if session is None and config.sessions.mode == "sticky":
            session = request.headers.get("x-session-id") or (body["user"] if isinstance(body.get("user"), str)
                                                              and body["user"] else None)
            if session is not None and len(session) > 256:
                raise GatewayError(400, "x-session-id / user: a session id is at most 256 characters",
                                   code="invalid_session")
        try:
            return await app.state.engine.decide(messages, policy=choice.policy, lam=choice.lam,
                                                 allowed=options.models, session=session, mode=mode)
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
        headers["x-router-truncated"] = "true" if decision.truncated else "false"
        headers["x-router-deadline"] = "exceeded" if decision.deadline_exceeded else "met"
        if decision.session is not None:
            headers["x-router-session"] = decision.session
        return headers

    def with_decision(content: bytes, decision: Routed | None, chosen: str, reply: UpstreamReply) -> bytes:
        """A JSON reply with the routing decision added as "router_decision" (other replies unchanged)."""
        try:
            payload = json.loads(content)
        except ValueError:
            return content
        if not isinstance(payload, dict):
            return content
        routed = decision.to_dict() if decision is not None else {"target": chosen, "policy": "pinned"}
        payload["router_decision"] = {**routed, "answered_by": reply.target, "fallbacks": reply.fallbacks}
        return json.dumps(payload).encode()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request)
        choice = choose_model(body)
        messages = messages_of(body)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise GatewayError(400, f"'stream' must be a boolean (true or false), got {json.dumps(stream)[:40]}",
                               code="invalid_stream")
        stream = bool(stream)
        options, choice = router_options(body, choice)
        body = {k: v for k, v in body.items() if k != "router"}  # the gateway's own field, never forwarded
        decision = await decide(choice, messages, options, request, body)
        chosen = choice.pinned or decision.target
        # A pinned target is what the caller asked for by name: retried, never silently replaced.
        chain = [chosen] if choice.pinned else config.fallback_chain(chosen)
        headers = routing_headers(decision, chosen)
        try:
            reply: UpstreamReply | None = await unless_client_leaves(
                request.receive, app.state.pool.chat(chain, body, stream=stream))
        except AllUpstreamsFailed as exc:
            for name in dict.fromkeys(a.target for a in exc.attempts):
                metrics.fallbacks.labels(target=name).inc()
            headers["x-router-fallbacks"] = json.dumps(list(dict.fromkeys(a.target for a in exc.attempts)))
            raise GatewayError(502, str(exc), "upstream_error", "all_upstreams_failed", headers) from None
        if reply is None:  # nobody to answer: the attempt in flight and the rest of the chain were cancelled
            return fail(499, "the client closed the request", "invalid_request_error", "client_disconnected")
        for name in reply.fallbacks:
            metrics.fallbacks.labels(target=name).inc()
        metrics.requests.labels(target=reply.target, status=str(reply.response.status_code)).inc()
        headers["x-router-target"] = reply.target
        headers["x-router-fallbacks"] = json.dumps(reply.fallbacks)
        headers["x-router-upstream-ms"] = f"{reply.upstream_ms:.3f}"
        for key, value in relayed_headers(reply.response.headers).items():
            if not key.lower().startswith("x-router-"):
                headers.setdefault(key, value)
        if stream and reply.response.status_code < 400:
            target = reply.target

            def on_disconnect() -> None:
                metrics.stream_disconnects.labels(target=target).inc()

            def on_error(exc: Exception) -> None:
                metrics.upstream_errors.labels(target=target).inc()
                log.warning("stream from %s failed mid-way: %r", target, exc)

            return UpstreamStream(reply.response, headers, on_disconnect, on_error)
        content = reply.response.content
        if options.return_decision and reply.response.status_code < 400:  # streams carry it in headers only
            content = with_decision(content, decision, chosen, reply)
        return Response(content=content, status_code=reply.response.status_code, headers=headers)

    @app.post("/v1/route")
    async def route(request: Request) -> JSONResponse:
        check_auth(request)
        body = await read_json(request)
        choice = choose_model(body, default="router")
        messages = messages_of(body)
        if choice.pinned is not None:
            raise GatewayError(400, f"model '{choice.pinned}' is a target, not a router alias; /v1/route needs "
                               "'router', 'router:<lambda>' or 'router:<preset>'", code="model_not_found")
        options, choice = router_options(body, choice)
        decision = await decide(choice, messages, options, request, body)
        return JSONResponse({**decision.to_dict(), "model": choice.requested,
                             "fallback_chain": config.fallback_chain(decision.target)})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        data: list[dict[str, Any]] = []
        for model_id in model_ids(target_names, config.presets):
            is_target = model_id in target_names
            entry = {"id": model_id, "object": "model", "created": 0,
                     "owned_by": "upstream" if is_target else "prefill-router"}
            if is_target:
                entry["routed"] = model_id in routed_targets  # False: reachable by name or as a fallback only
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        upstreams = {}
        for t in config.targets:
            if not t.api_key_env:
                key = "not needed"
            else:
                key = "set" if os.environ.get(t.api_key_env) else f"missing ({t.api_key_env})"
            upstreams[t.name] = {"base_url": t.base_url, "model": t.upstream_model, "api_key": key,
                                 "routed": t.name in routed_targets}
        ready = all(v["api_key"] != f"missing ({t.api_key_env})" for t, v in zip(config.targets,
                                                                                  upstreams.values()))
        return JSONResponse({"status": "ok" if ready else "degraded",
                             "encoder_loaded": bool(getattr(scorer, "encoder_loaded", True)),
                             "encoder": encoder_info or getattr(scorer, "encoder_info", None),
                             "window": getattr(scorer, "window_info", None),
                             "targets": routed_targets, "upstreams": upstreams})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def load_router(config: GatewayConfig):
    """The Router named by `router.checkpoint` (with `router.encoder` instead of the checkpoint's, if given)."""
    from prefill_router.router import Router

    if config.router.checkpoint is None:
        raise ConfigError("router.checkpoint: required (the folder `prefill-router train --out` wrote)")
    encoder = None
    if config.router.encoder:
        from prefill_router.features import load_encoder

        encoder = load_encoder(config.router.encoder)
    return Router.load(config.router.checkpoint, encoder=encoder)


def build_gateway(config: GatewayConfig, router=None) -> FastAPI:
    """Load the router (unless given), load its encoder and warm it up, and build the app."""
    set_cpu_threads(config.router.threads)
    scorer = RouterScorer(router if router is not None else load_router(config), config.router.max_route_tokens,
                          config.router.prefix_cache_mb)
    scorer.warm_up()
    return create_app(config, scorer)
