"""`prefill_router.Client` reads like the openai SDK: the SDK's streaming loop works on every chunk, replies expose
the SDK's attributes, and leaving a stream early is quiet. Real HTTP throughout: a fake upstream on 127.0.0.1,
and for the comparison with the real SDK, the real gateway in front of it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prefill_router.client import Client, UpstreamReplyError
from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, PriceTable
from prefill_router.features import load_encoder
from prefill_router.router import train_router
from prefill_router.serve.fake_upstream import Answer, FakeUpstream, Raw

TARGETS = ["big", "small"]
MESSAGES = [{"role": "user", "content": "What is 17 * 23?"}]
ANSWER = "seventeen times twenty-three is 391"


@pytest.fixture(scope="module")
def router(tiny_encoder_dir):
    encoder = load_encoder(str(tiny_encoder_dir))
    prompts = [[{"role": "user", "content": f"question {i}: what is {i} + {3 * i}?"}] for i in range(32)]
    features = encoder.encode(prompts, poolings=("mean",))
    Y = np.stack([np.ones(32), (np.arange(32) % 2).astype(float)], axis=1)
    cost_model = CostModel(PriceTable({"big": (10.0, 30.0), "small": (0.1, 0.3)}), TARGETS, np.array([50.0, 50.0]))
    data = RoutingDataset([str(i) for i in range(32)], prompts, TARGETS, Y,
                          cost_model.estimate(encoder.count_tokens(prompts)))
    return train_router(data, features, config={
        "pca": 4, "policy": "argmax",
        "trunk": {"seeds": 1, "keep": 1, "max_epochs": 3, "hidden": [8], "dropout": [0.0], "threads": 1}},
        encoder=encoder, cost_model=cost_model)


@pytest.fixture
def upstream():
    with FakeUpstream(Answer(ANSWER)) as up:
        yield up


def config(up: FakeUpstream) -> dict:
    # Both targets on one fake upstream: whichever the router picks, the answer is the same.
    return {"router": {}, "targets": [{"name": t, "base_url": up.base_url, "model": f"{t}-model"} for t in TARGETS]}


def test_the_sdk_streaming_loop_works_on_every_chunk(router, upstream):
    with Client(config(upstream), router=router) as client:
        stream = client.chat.completions.create(model="router", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        # The SDK's loop, unchanged: the final chunk's delta is empty and its content reads as None.
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == ANSWER
    last_choice = [c for c in chunks if c.choices][-1].choices[0]
    assert last_choice.delta.content is None and last_choice.delta.role is None
    assert last_choice.finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]  # as in the SDK: a usage-only chunk has no choices
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(ANSWER.split())
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert stream.routing.target in TARGETS and chunks[0].model == f"{stream.routing.target}-model"


def test_a_reply_has_the_sdk_attributes(router, upstream):
    with Client(config(upstream), router=router) as client:
        reply = client.chat.completions.create(model="router:0", messages=MESSAGES, max_tokens=20)
    assert reply.choices[0].message.content == ANSWER and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].index == 0
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + len(ANSWER.split())
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == f"{reply.routing.target}-model" and isinstance(reply.created, int)
    # A documented field the upstream left out is None; an unknown name is an AttributeError, as in the SDK.
    assert reply.choices[0].message.tool_calls is None and reply.system_fingerprint is None
    with pytest.raises(AttributeError):
        reply.no_such_field  # noqa: B018
    dumped = reply.model_dump()
    assert dumped["choices"][0]["message"]["content"] == ANSWER and "routing" not in dumped
    assert reply.to_dict()["usage"] == {"prompt_tokens": reply.usage.prompt_tokens,
                                        "completion_tokens": len(ANSWER.split()),
                                        "total_tokens": reply.usage.total_tokens}
    assert reply.routing.probabilities is not None and set(reply.routing.probabilities) == set(TARGETS)


def test_a_stream_error_event_or_a_reply_that_is_not_json_is_an_error_naming_the_target(router, upstream):
    upstream.script(Raw(200, 'data: {"error": {"message": "model overloaded"}}\n\n', "text/event-stream"),
                    Raw(200, "<html>bad gateway</html>", "text/html"))
    with Client(config(upstream), router=router) as client:
        stream = client.chat.completions.create(model="small", messages=MESSAGES, stream=True)
        with pytest.raises(UpstreamReplyError, match="'small'.*model overloaded"):
            next(stream)
        with pytest.raises(UpstreamReplyError, match="'small': reply is not JSON"):
            client.chat.completions.create(model="small", messages=MESSAGES)


QUIET_EXIT_SCRIPT = """
import sys
from types import SimpleNamespace

from prefill_router import Client
from prefill_router.serve.fake_upstream import Answer, FakeUpstream


class FixedRouter:  # routing is not under test here: how the process ends is
    def route(self, messages, policy=None, lam=None):
        return SimpleNamespace(target="a", probabilities={"a": 1.0}, latency_ms=0.0, truncated=False)


up = FakeUpstream(Answer("one two three four five six seven eight", chunk_delay_s=0.05)).start()
client = Client({"router": {}, "targets": [{"name": "a", "base_url": up.base_url}]}, router=FixedRouter())
messages = [{"role": "user", "content": "hi"}]
how = sys.argv[1]
if how == "break":  # the stream stays referenced, neither it nor the client is closed
    stream = client.chat.completions.create(model="router", messages=messages, stream=True)
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="")
        break
elif how == "close":
    stream = client.chat.completions.create(model="router", messages=messages, stream=True)
    print(next(stream).choices[0].delta.content, end="")
    stream.close()
    assert list(stream) == []
elif how == "inline":
    for chunk in client.chat.completions.create(model="router", messages=messages, stream=True):
        if chunk.choices[0].delta.content:
            break
print("done")
"""


@pytest.mark.parametrize("how", ["break", "close", "inline"])
def test_leaving_a_stream_early_exits_quietly(how, tmp_path):
    script = tmp_path / "leave_early.py"
    script.write_text(textwrap.dedent(QUIET_EXIT_SCRIPT))
    # -X dev shows what a user would not want to see: unclosed resources, never-awaited coroutines, asyncio
    # errors at shutdown. A hang (the old behaviour when a stream was left open) fails by the timeout.
    done = subprocess.run([sys.executable, "-X", "dev", str(script), how], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("done\n")
    # asyncio's debug mode (on under -X dev) also reports callbacks slower than 0.1 s: load, not a leak
    slow = re.compile(r"^Executing <.*> took \d+\.\d+ seconds$")
    assert [line for line in done.stderr.splitlines() if not slow.match(line)] == []


def test_same_answers_as_the_openai_sdk_through_the_gateway(router, upstream):
    """The real openai SDK against the real gateway, and our Client, on the same upstream: every attribute a
    caller reads has the same value (ids and timestamps aside), chunk by chunk."""
    openai = pytest.importorskip("openai")
    from prefill_router.serve.app import build_gateway
    from prefill_router.serve.config import parse_gateway_config
    from prefill_router.serve.server import BackgroundServer

    def plain(r):
        m = r.choices[0].message
        return (r.object, r.model, m.role, m.content, m.tool_calls, m.refusal, r.choices[0].finish_reason,
                r.choices[0].index, r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)

    def streamed(chunks):
        return [(c.object, c.model, len(c.choices), c.usage and c.usage.total_tokens)
                + ((c.choices[0].delta.role, c.choices[0].delta.content, c.choices[0].delta.tool_calls,
                    c.choices[0].finish_reason) if c.choices else ()) for c in chunks]

    kwargs = {"model": "small", "messages": MESSAGES, "max_tokens": 20}  # pinned: the same target both ways
    with BackgroundServer(build_gateway(parse_gateway_config(config(upstream)), router)) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        sdk_reply = sdk.chat.completions.create(**kwargs)
        sdk_chunks = list(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        sdk.close()
    with Client(config(upstream), router=router) as client:
        reply = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert plain(reply) == plain(sdk_reply)
    assert streamed(chunks) == streamed(sdk_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in sdk_chunks if c.choices) == ANSWER
