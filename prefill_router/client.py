"""`prefill_router.Client`: an OpenAI-style client that routes in-process, then calls the chosen upstream.

    from prefill_router import Client

    client = Client("gateway.yaml")            # the gateway's config file: targets, router checkpoint, presets
    reply = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "2+2?"}])
    print(reply.choices[0].message.content, reply.usage.prompt_tokens, reply.routing.target)

    for chunk in client.chat.completions.create(model="router:cheap", messages=..., stream=True):
        print(chunk.choices[0].delta.content or "", end="")

`model` works as in the gateway ("router", "router:<lambda>", "router:<preset>", or a target name), and so
do retries and fallback: both call upstreams through `prefill_router.serve.upstream.UpstreamPool`.

Replies read like the openai SDK's: a `ChatCompletion`, or a `Stream` of `ChatCompletionChunk`s, whose
documented fields are attributes (None when the upstream left one out, so `chunk.choices[0].delta.content`
is None on the final chunk) and whose other fields are kept as attributes too. As in the SDK, a usage-only
chunk (`stream_options={"include_usage": True}`) has empty `choices`. `reply.routing` (and `stream.routing`)
says which target answered, which were given up on, and P per target. Leaving a stream early (break, or
`close()`) closes the upstream connection, and nothing is printed at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, overload

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from prefill_router.data.prompt import Message
from prefill_router.errors import ConfigError, PrefillRouterError
from prefill_router.serve.config import GatewayConfig, load_gateway_config, parse_gateway_config
from prefill_router.serve.engine import RouterScorer, SessionMode, routed_window, routing_messages
from prefill_router.serve.models import resolve_model
from prefill_router.serve.upstream import AllUpstreamsFailed, UpstreamPool, UpstreamReply

if TYPE_CHECKING:
    from prefill_router.router.decision import RouteDecision

__all__ = ["AllUpstreamsFailed", "ChatCompletion", "ChatCompletionChunk", "Client", "Routing", "Stream",
           "UpstreamHTTPError", "UpstreamReplyError"]

CLOSE_TIMEOUT_S = 5.0  # closing a stream's connection never blocks longer than this
T = TypeVar("T")


class UpstreamHTTPError(PrefillRouterError):
    """The upstream refused the request (a 4xx other than 408/429, passed through as the gateway does)."""

    def __init__(self, target: str, status: int, body: Any):
        self.target, self.status, self.body = target, status, body
        super().__init__(f"target '{target}' answered HTTP {status}: {body}")


class UpstreamReplyError(PrefillRouterError):
    """The upstream's reply is not a chat completion, or its stream sent an error event."""

    def __init__(self, target: str, message: str, body: Any = None):
        self.target, self.body = target, body
        super().__init__(f"target '{target}': {message}")


@dataclass
class Routing:
    target: str                                   # the target that answered
    chosen: str                                   # the router's choice (or the pinned target)
    fallbacks: list[str] = field(default_factory=list)  # targets given up on, in order
    probabilities: dict[str, float] | None = None  # None when the model pinned a target
    latency_ms: float = 0.0                       # routing time
    truncated: bool = False


# --- reply objects: the openai SDK's shapes (openai.types.chat), every field optional --------------------

class APIObject(BaseModel):
    """A JSON object from the API, read like the openai SDK's objects: fields as attributes, unknown fields
    kept (as attributes too), `model_dump()`, `model_dump_json()`, `to_dict()`, `to_json()`. Also reads like
    the dict it was parsed from (`obj["choices"]`, `obj.get("usage")`, `"usage" in obj`)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def to_dict(self) -> dict:
        """The fields the server sent (as the SDK's `to_dict`: unset fields left out)."""
        return self.model_dump(exclude_unset=True)

    def to_json(self, *, indent: int | None = 2) -> str:
        return self.model_dump_json(exclude_unset=True, indent=indent)

    def _sent(self) -> set[str]:
        return set(self.model_fields_set) | set(self.model_extra or {})

    def __getitem__(self, key: str) -> Any:
        if key not in self._sent():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._sent()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._sent() else default


class FunctionCall(APIObject):
    name: Any = None
    arguments: Any = None


class ToolCall(APIObject):
    index: Any = None  # in stream deltas only
    id: Any = None
    type: Any = None
    function: FunctionCall | None = None


class ChatCompletionMessage(APIObject):
    role: Any = None
    content: Any = None
    refusal: Any = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    annotations: Any = None
    audio: Any = None


class ChoiceDelta(ChatCompletionMessage):
    """The part of a message one stream chunk adds (every field None when the chunk adds nothing)."""


class Choice(APIObject):
    index: Any = None
    message: ChatCompletionMessage = Field(default_factory=ChatCompletionMessage)
    finish_reason: Any = None
    logprobs: Any = None


class ChunkChoice(APIObject):
    index: Any = None
    delta: ChoiceDelta = Field(default_factory=ChoiceDelta)
    finish_reason: Any = None
    logprobs: Any = None


class CompletionUsage(APIObject):
    prompt_tokens: Any = None
    completion_tokens: Any = None
    total_tokens: Any = None
    prompt_tokens_details: Any = None
    completion_tokens_details: Any = None


class _Completion(APIObject):
    id: Any = None
    object: Any = None
    created: Any = None
    model: Any = None
    usage: CompletionUsage | None = None
    system_fingerprint: Any = None
    service_tier: Any = None
    _routing: Routing | None = PrivateAttr(default=None)

    @property
    def routing(self) -> Routing | None:
        """The routing decision (not part of the upstream's JSON, so not in `model_dump()`)."""
        return self._routing


class ChatCompletion(_Completion):
    choices: list[Choice] = Field(default_factory=list)


class ChatCompletionChunk(_Completion):
    choices: list[ChunkChoice] = Field(default_factory=list)  # empty on a usage-only chunk


CompletionT = TypeVar("CompletionT", bound=_Completion)


def _parse(cls: type[CompletionT], data: Any, target: str, routing: Routing) -> CompletionT:
    if not isinstance(data, dict):
        raise UpstreamReplyError(target, f"expected a JSON object, got {type(data).__name__}", data)
    try:
        obj = cls.model_validate(data)
    except ValidationError as exc:
        raise UpstreamReplyError(target, f"not a chat completion: {exc.errors()[0]['loc']}: "
                                         f"{exc.errors()[0]['msg']}", data) from None
    obj._routing = routing
    return obj


# --- streaming -----------------------------------------------------------------------------------------

class Stream:
    """The chunks of a streamed completion, as the SDK's `Stream`: iterate it, or use it as a context manager.
    Closing it (explicitly, by leaving a `with` block, by breaking out of a for loop over the call, or at
    exit) closes the upstream connection."""

    def __init__(self, client: Client, reply: UpstreamReply, routing: Routing):
        self._client, self._reply, self.routing = client, reply, routing
        self.response = reply.response  # the upstream's httpx.Response (status, headers)
        self._lines = reply.response.aiter_lines()
        self._closed = False
        client._streams.add(self)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> ChatCompletionChunk:
        while not self._closed:
            try:
                line = self._client._loop.run(self._next_line())
            except StopAsyncIteration:
                break
            except BaseException:
                self.close()
                raise
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                self.close()
                raise UpstreamReplyError(self.routing.target, f"stream event is not JSON: {data[:200]!r}") from None
            if isinstance(event, dict) and event.get("error"):
                self.close()
                error = event["error"]
                message = error.get("message", error) if isinstance(error, dict) else error
                raise UpstreamReplyError(self.routing.target, f"stream ended with an error: {message}", event)
            try:
                return _parse(ChatCompletionChunk, event, self.routing.target, self.routing)
            except UpstreamReplyError:
                self.close()
                raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Close the upstream connection (safe to call twice, and at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        self._client._streams.discard(self)
        self._client._loop.finish(self._aclose())

    async def _next_line(self) -> str:
        return await anext(self._lines)

    async def _aclose(self) -> None:
        try:
            # httpx types aiter_lines() as an AsyncIterator; it is an async generator, closed here so the read
            # it is suspended in ends now rather than at garbage collection.
            if isinstance(self._lines, AsyncGenerator):
                await self._lines.aclose()
        finally:
            await self._reply.response.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


# --- the client ----------------------------------------------------------------------------------------

class _Completions:
    def __init__(self, client: Client):
        self._client = client

    @overload
    def create(self, *, model: str, messages: list[dict], stream: Literal[False] = ...,
               **params: Any) -> ChatCompletion: ...

    @overload
    def create(self, *, model: str, messages: list[dict], stream: Literal[True], **params: Any) -> Stream: ...

    @overload
    def create(self, *, model: str, messages: list[dict], stream: bool, **params: Any) -> ChatCompletion | Stream: ...

    def create(self, *, model: str, messages: list[dict], stream: bool = False,
               **params: Any) -> ChatCompletion | Stream:
        """Route `messages` and send them to the chosen target. Extra keyword arguments (temperature,
        max_tokens, stream_options, ...) go to the upstream unchanged. Returns a ChatCompletion, or a Stream
        of ChatCompletionChunks with stream=True."""
        return self._client._create(model=model, messages=messages, stream=stream, **params)


class _Chat:
    def __init__(self, client: Client):
        self.completions = _Completions(client)


class _LoopThread:
    """A private event loop in a daemon thread, so synchronous code can drive the async upstream pool. Works
    even when the caller's own thread already runs an event loop (a notebook, an async app)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="prefill-router-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def finish(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a closing coroutine, waiting at most CLOSE_TIMEOUT_S; errors are ignored (what fails to close
        cleanly is dropped all the same). Called from the loop's own thread (a garbage collection there), it
        only schedules; once the loop is stopped or the interpreter is ending, the OS closes the sockets."""
        if sys.is_finalizing() or self.loop.is_closed() or not self.loop.is_running():
            coro.close()
            return
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            if asyncio.get_running_loop() is self.loop:
                return
        except RuntimeError:
            pass
        try:
            future.result(timeout=CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            future.cancel()

    def close(self) -> None:
        if self.loop.is_running():
            self.finish(self.loop.shutdown_asyncgens())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


_OPEN_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()
_OPEN_CLIENTS_LOCK = threading.Lock()


@atexit.register
def _close_open_clients() -> None:
    # atexit runs while the clients' loop threads still run (daemon threads stop only later), so open streams
    # and connections close cleanly here instead of hanging or printing warnings during interpreter shutdown.
    with _OPEN_CLIENTS_LOCK:
        clients = list(_OPEN_CLIENTS)
    for client in clients:
        client.close()


class RoutesPrompts(Protocol):
    """What Client needs of a router: `Router.route` (a trained Router, or any object that routes alike)."""

    def route(self, prompt: list[Message], *, policy: str | None = None,
              lam: float | None = None) -> RouteDecision: ...


class Client:
    """Route in this process with a trained Router, then call the chosen OpenAI-compatible upstream.

    config: the gateway's config (a file path, a dict, or a GatewayConfig): targets, fallbacks, presets,
        retries and, unless `router` is given, `router.checkpoint`.
    router: an already loaded `prefill_router.router.Router` (skips loading the checkpoint).
    """

    def __init__(self, config: str | Path | dict | GatewayConfig, *, router: RoutesPrompts | None = None):
        if isinstance(config, (str, Path)):
            config = load_gateway_config(config)
        elif isinstance(config, dict):
            config = parse_gateway_config(config)
        self.config = config
        if router is None:
            from prefill_router.serve.app import load_router

            router = load_router(config)
        # The gateway's routing window: a checkpoint trained on whole prompts reads at most
        # router.max_route_tokens of each conversation here too, so the Client routes as the gateway does.
        from prefill_router.router import Router

        if isinstance(router, Router):  # (tests may hand in any object with route())
            scorer = RouterScorer(router, config.router.max_route_tokens, config.router.prefix_cache_mb,
                                  config.router.dtype)
            scorer.warm_up()
            router = scorer.router
        self.router: RoutesPrompts = router
        self._targets = [t.name for t in config.targets]
        self._loop = _LoopThread()
        self._pool = UpstreamPool(config.targets, retries=config.retries, request_timeout_s=config.request_timeout_s,
                                  max_retry_after_s=config.max_retry_after_s,
                                  max_body_bytes=config.max_upstream_body_bytes)
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._closed = False
        self.chat = _Chat(self)
        with _OPEN_CLIENTS_LOCK:
            _OPEN_CLIENTS.add(self)

    def route(self, messages: list[dict], *, model: str = "router") -> RouteDecision:
        """The routing decision only (a RouteDecision), as `POST /v1/route` gives it."""
        choice = resolve_model(model, self._targets, self.config.presets,
                               default_policy=self.config.router.policy, default_lam=self.config.router.lam)
        if choice.pinned is not None:
            raise ConfigError(f"model '{model}' is a target, not a router alias")
        return self.router.route(self._routing_text(messages), policy=choice.policy, lam=choice.lam)

    def _routing_text(self, messages: list[dict]) -> list[Message]:
        """What the router reads, by the gateway's rules: the conversation's first turn (sessions.mode
        first_turn, the default; an in-process client keeps no sticky pins, so sticky reads it too), or the
        whole conversation (per_turn), then the routing window (first system + last user message)."""
        mode: SessionMode = "per_turn" if self.config.sessions.mode == "per_turn" else "first_turn"
        return routed_window(routing_messages(messages), mode)

    def _create(self, *, model: str, messages: list[dict], stream: bool, **params: Any) -> ChatCompletion | Stream:
        if self._closed:
            raise PrefillRouterError("this Client is closed")
        choice = resolve_model(model, self._targets, self.config.presets,
                               default_policy=self.config.router.policy, default_lam=self.config.router.lam)
        routed = self._routing_text(messages)
        decision: RouteDecision | None = None
        if choice.pinned is not None:
            chosen = choice.pinned
        else:
            decision = self.router.route(routed, policy=choice.policy, lam=choice.lam)
            chosen = decision.target
        chain = [chosen] if choice.pinned else self.config.fallback_chain(chosen)
        body = {**params, "model": model, "messages": messages}
        if stream:
            body["stream"] = True
        reply = self._loop.run(self._pool.chat(chain, body, stream=stream))
        routing = Routing(target=reply.target, chosen=chosen, fallbacks=reply.fallbacks,
                          probabilities=None if decision is None else decision.probabilities,
                          latency_ms=0.0 if decision is None else decision.latency_ms,
                          truncated=False if decision is None else decision.truncated)
        response = reply.response
        if response.status_code >= 400:
            try:
                error_body: Any = response.json()
            except ValueError:
                error_body = response.text
            raise UpstreamHTTPError(reply.target, response.status_code, error_body)
        if stream:
            return Stream(self, reply, routing)
        try:
            data = response.json()
        except ValueError:
            raise UpstreamReplyError(reply.target, f"reply is not JSON: {response.text[:200]!r}") from None
        return _parse(ChatCompletion, data, reply.target, routing)

    def close(self) -> None:
        """Close open streams, the connection pool and the event loop thread (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        with _OPEN_CLIENTS_LOCK:
            _OPEN_CLIENTS.discard(self)
        for stream in list(self._streams):
            stream.close()
        self._loop.finish(self._pool.aclose())
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
