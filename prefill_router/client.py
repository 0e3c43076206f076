"""`prefill_router.Client`: an OpenAI-style client that routes in-process, then calls the chosen upstream.

    from prefill_router import Client

    client = Client("gateway.yaml")            # the gateway's config file: targets, router checkpoint, presets
    reply = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "2+2?"}])
    print(reply.choices[0].message.content, reply.routing.target)

    for chunk in client.chat.completions.create(model="router:cheap", messages=..., stream=True):
        print(chunk.choices[0].delta.get("content") or "", end="")

`model` works as in the gateway ("router", "router:<lambda>", "router:<preset>", or a target name), and so
do retries and fallback: both call upstreams through `prefill_router.serve.upstream.UpstreamPool`.
Replies are dicts that also allow attribute access (`reply.choices[0].message.content`); `reply.routing`
says which target answered, which were given up on, and P per target.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from prefill_router.errors import PrefillRouterError
from prefill_router.serve.config import GatewayConfig, load_gateway_config, parse_gateway_config
from prefill_router.serve.engine import routing_messages
from prefill_router.serve.models import resolve_model
from prefill_router.serve.upstream import AllUpstreamsFailed, EventLoopThread, UpstreamPool, UpstreamReply

__all__ = ["AllUpstreamsFailed", "ChatObject", "Client", "Routing", "UpstreamHTTPError"]


class UpstreamHTTPError(PrefillRouterError):
    """The upstream refused the request (a 4xx other than 408/429, passed through as the gateway does)."""

    def __init__(self, target: str, status: int, body: Any):
        self.target, self.status, self.body = target, status, body
        super().__init__(f"target '{target}' answered HTTP {status}: {body}")


class ChatObject(dict):
    """A JSON object from the API: a plain dict whose keys also read as attributes, like the openai SDK's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self[name])
        except KeyError:
            raise AttributeError(name) from None

    def model_dump(self) -> dict:
        return json.loads(json.dumps(self))


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, ChatObject):
        return ChatObject(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


@dataclass
class Routing:
    target: str                                   # the target that answered
    chosen: str                                   # the router's choice (or the pinned target)
    fallbacks: list[str] = field(default_factory=list)  # targets given up on, in order
    probabilities: dict[str, float] | None = None  # None when the model pinned a target
    latency_ms: float = 0.0                       # routing time
    truncated: bool = False


class Stream:
    """An iterator of chunk objects from a streamed completion. Closing it (or leaving a `with` block, or
    breaking out of a for loop and dropping it) closes the upstream connection."""

    def __init__(self, chunks: Iterator[ChatObject], routing: Routing):
        self._chunks = chunks
        self.routing = routing

    def __iter__(self) -> Iterator[ChatObject]:
        return self._chunks

    def __next__(self) -> ChatObject:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _sse_events(reply: UpstreamReply) -> AsyncIterator[ChatObject]:
    try:
        async for line in reply.response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield ChatObject(json.loads(data))
    finally:
        await reply.response.aclose()


class _Completions:
    def __init__(self, client: Client):
        self._client = client

    def create(self, *, model: str, messages: list[dict], stream: bool = False, **params: Any):
        """Route `messages` and send them to the chosen target. Extra keyword arguments (temperature,
        max_tokens, ...) go to the upstream unchanged. Returns a ChatObject, or a Stream with stream=True."""
        return self._client._create(model=model, messages=messages, stream=stream, **params)


class _Chat:
    def __init__(self, client: Client):
        self.completions = _Completions(client)


class Client:
    """Route in this process with a trained Router, then call the chosen OpenAI-compatible upstream.

    config: the gateway's config (a file path, a dict, or a GatewayConfig): targets, fallbacks, presets,
        retries and, unless `router` is given, `router.checkpoint`.
    router: an already loaded `prefill_router.router.Router` (skips loading the checkpoint).
    """

    def __init__(self, config: str | Path | dict | GatewayConfig, *, router=None):
        if isinstance(config, (str, Path)):
            config = load_gateway_config(config)
        elif isinstance(config, dict):
            config = parse_gateway_config(config)
        self.config = config
        if router is None:
            from prefill_router.serve.app import load_router

            router = load_router(config)
        self.router = router
        self._targets = [t.name for t in config.targets]
        self._loop = EventLoopThread()
        self._pool = UpstreamPool(config.targets, retries=config.retries)
        self.chat = _Chat(self)

    def route(self, messages: list[dict], *, model: str = "router"):
        """The routing decision only (a RouteDecision), as `POST /v1/route` gives it."""
        choice = resolve_model(model, self._targets, self.config.presets,
                               default_policy=self.config.router.policy, default_lam=self.config.router.lam)
        if choice.pinned is not None:
            raise ValueError(f"model '{model}' is a target, not a router alias")
        return self.router.route(routing_messages(messages), policy=choice.policy, lam=choice.lam)

    def _create(self, *, model: str, messages: list[dict], stream: bool, **params: Any):
        choice = resolve_model(model, self._targets, self.config.presets,
                               default_policy=self.config.router.policy, default_lam=self.config.router.lam)
        routed = routing_messages(messages)
        decision = None
        if choice.pinned is None:
            decision = self.router.route(routed, policy=choice.policy, lam=choice.lam)
        chosen = choice.pinned or decision.target
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
            return Stream(self._loop.iterate(_sse_events(reply)), routing)
        result = ChatObject(response.json())
        result.routing = routing  # an attribute, not a key: the dict stays exactly the upstream's JSON
        return result

    def close(self) -> None:
        self._loop.run(self._pool.aclose())
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
