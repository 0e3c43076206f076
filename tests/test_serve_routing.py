"""Bounded routing, sessions, tool calls and the per-request `router` object, through real HTTP servers on
127.0.0.1: the gateway (uvicorn) with a router trained here on the tiny random encoder, and fake upstreams."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from gateway_helpers import PRICES, TARGETS, gateway_config, question, train_tiny_router
from prometheus_client.parser import text_string_to_metric_families

from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, PriceTable
from prefill_router.features.encoder import load_encoder
from prefill_router.router import Router, train_router
from prefill_router.serve.app import create_app
from prefill_router.serve.batching import LengthBuckets, MicroBatcher
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.fake_upstream import Answer, Fail
from prefill_router.serve.server import BackgroundServer

WINDOW = 32  # max_route_tokens in these tests (the tiny encoder's context is 128)


@pytest.fixture(scope="module")
def router(tiny_encoder_dir, tmp_path_factory):
    encoder = load_encoder(str(tiny_encoder_dir))
    return Router.load(train_tiny_router(encoder, tmp_path_factory.mktemp("router")), encoder=encoder)


@contextmanager
def gateway(scorer, ups, **overrides):
    app = create_app(parse_gateway_config(gateway_config(ups, **overrides)), scorer)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def metric(client: httpx.Client, name: str, **labels) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def chat(client, messages, model="router", headers=None, **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **extra},
                       headers=headers)


@contextmanager
def tokens_seen(router):
    """The length of every sequence the encoder's model is run on."""
    seen: list[int] = []
    hook = router.encoder.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def conversation(turns: int, tool_turns: bool = True) -> list[list[dict]]:
    """The message lists a client sends on each turn of one chat: every turn resends the history."""
    messages = [{"role": "system", "content": "You are a careful assistant. " * 3}]
    sent = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"turn {t}: " + "the quick brown fox jumps " * (3 + 4 * t)})
        sent.append([dict(m) for m in messages])
        if tool_turns:
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{t}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]})
            messages.append({"role": "tool", "tool_call_id": f"c{t}", "content": "result " * 40})
        messages.append({"role": "assistant", "content": "an answer " * 10})
    return sent


# --- sessions -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["first_turn", "sticky"])
def test_five_turn_conversation_stays_on_one_target_and_reads_a_bounded_window(router, upstreams, mode):
    scorer = RouterScorer(router, max_route_tokens=WINDOW)
    headers = {"x-session-id": "conversation-1"} if mode == "sticky" else None
    with gateway(scorer, upstreams, sessions={"mode": mode}) as client, tokens_seen(scorer.router) as seen:
        targets, per_turn = [], []
        for messages in conversation(5):
            before = len(seen)
            r = chat(client, messages, headers=headers)
            assert r.status_code == 200, r.text
            targets.append(r.headers["x-router-target"])
            per_turn.append(seen[before:])
        assert len(set(targets)) == 1
        assert all(n <= WINDOW for turn in per_turn for n in turn)
        if mode == "first_turn":  # later turns read the first turn's window again: the cache answers
            assert sum(len(turn) for turn in per_turn) == 1
        else:
            assert metric(client, "prefill_router_session_decisions_total", outcome="pinned") == 4
    # every turn's full conversation went upstream, tool calls and results included
    sent = upstreams[targets[0]].requests
    assert [len(r.body["messages"]) for r in sent] == [len(m) for m in conversation(5)]


def test_per_turn_routing_reuses_the_system_prompt_prefix_and_decides_as_without_it(router, upstreams):
    """per_turn mode re-routes every turn on [system, last user turn]: with prefix reuse on, turns 2..5 run
    only the tokens after the cached template opening and system prompt, and get the same P as without."""
    from prefill_router.features.prefix_cache import BLOCK

    turns = conversation(5, tool_turns=False)
    decided = {}
    for mb in (0, 16):
        scorer = RouterScorer(router, max_route_tokens=WINDOW, prefix_cache_mb=mb)
        scorer.warm_up()  # as build_gateway does: the serving window's encoder, with reuse when asked
        with gateway(scorer, upstreams, sessions={"mode": "per_turn"}, cache_size=0) as client, \
                tokens_seen(scorer.router) as seen:
            decided[mb] = [client.post("/v1/route", json={"messages": m}).json() for m in turns]
            runs = list(seen)
        if mb:
            assert scorer.router.encoder.prefix_cache.stats()["hits"] == 4
            assert all(n <= WINDOW - BLOCK for n in runs[1:])  # the head block (template + system) was reused
        else:
            assert all(n > WINDOW - BLOCK for n in runs)
    for plain, reused in zip(decided[0], decided[16]):
        assert plain["target"] == reused["target"]
        for t in TARGETS:
            assert reused["probabilities"][t] == pytest.approx(plain["probabilities"][t], abs=1e-4)


def test_serving_formats_load_a_copy_of_the_encoder_and_stay_close_to_float32(router, upstreams):
    """router.dtype int8 or bf16: the gateway routes with a copy of the encoder in that format, the router handed
    in keeps its float32 one, P stay close to float32's, and /health says how routing runs and why."""
    fp32 = RouterScorer(router, max_route_tokens=WINDOW)
    served = {fmt: RouterScorer(router, max_route_tokens=WINDOW, dtype=fmt) for fmt in ("int8", "bf16")}
    for scorer in (fp32, *served.values()):
        scorer.warm_up()
    kinds = {type(m).__module__ for m in served["int8"].router.encoder.model.modules()}
    assert any("quantized" in k for k in kinds)
    assert served["bf16"].router.encoder.model.dtype == torch.bfloat16
    assert not any("quantized" in type(m).__module__ for m in router.encoder.model.modules())
    assert router.encoder.number_format == "fp32"
    prompts = [question(i) for i in range(6)]
    for fmt, scorer in served.items():
        with gateway(fp32, upstreams) as a, gateway(scorer, upstreams) as b:
            for m in prompts:
                p32, p = (c.post("/v1/route", json={"messages": m}).json()["probabilities"] for c in (a, b))
                assert p != p32 and all(abs(p[t] - p32[t]) < 0.05 for t in TARGETS)
            runtime = b.get("/health").json()["runtime"]
            assert runtime["dtype"] == runtime["dtype_requested"] == fmt and runtime["trained_quantize"] is None
            assert a.get("/health").json()["runtime"]["dtype"] == "fp32"


def test_first_turn_is_the_same_on_every_replica(router, upstreams):
    """No shared state: two gateways (replicas) send every turn of one conversation to the same target."""
    turns = conversation(3)
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams) as a, \
            gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams) as b:
        chosen = {chat(client, messages).headers["x-router-target"]
                  for messages in turns for client in (a, b)}
    assert len(chosen) == 1


def test_sticky_pin_survives_a_fallback(router, upstreams):
    turns = conversation(3, tool_turns=False)
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams, sessions={"mode": "sticky"}) as client:
        first = chat(client, turns[0], user="alice")
        pinned = first.headers["x-router-target"]
        assert first.headers["x-router-session"] == "new"
        upstreams[pinned].script(Fail(503), Fail(503))  # the pinned target fails once, retry included
        second = chat(client, turns[1], user="alice")
        third = chat(client, turns[2], user="alice")
    assert second.status_code == 200 and second.headers["x-router-chosen"] == pinned
    assert second.headers["x-router-target"] != pinned and json.loads(second.headers["x-router-fallbacks"]) == [pinned]
    assert third.headers["x-router-target"] == pinned and third.headers["x-router-session"] == "pinned"


def test_sticky_escalate_only_never_moves_to_a_weaker_target(router, upstreams):
    turns = conversation(4, tool_turns=False)
    sessions = {"mode": "sticky", "escalate_only": True, "strength": ["small", "mid", "big"]}
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams, sessions=sessions) as client:
        headers = {"x-session-id": "agent-7"}
        first = chat(client, turns[0], headers=headers, router={"models": ["mid"]})
        second = chat(client, turns[1], model="router:best", headers=headers)
        cheapest = chat(client, turns[2], model="router:1000000", headers=headers)  # the router says: small
    order = sessions["strength"]
    targets = [r.headers["x-router-target"] for r in (first, second, cheapest)]
    assert targets[0] == "mid"
    assert order.index(targets[1]) >= order.index("mid") and targets[2] == targets[1]
    assert cheapest.headers["x-router-session"] == "pinned"


# --- deadline and length buckets ---------------------------------------------------------------------------
class GatedScorer(RouterScorer):
    """A scorer whose forward passes wait for `gate` when `hold(prompts)` says so: a slow encoder on demand."""

    def __init__(self, router, hold, **kwargs):
        super().__init__(router, **kwargs)
        self.gate, self.hold, self.entered = threading.Event(), hold, threading.Event()

    def score_batch(self, prompts):
        if self.hold(prompts):
            self.entered.set()
            self.gate.wait(60)
        return super().score_batch(prompts)


def test_deadline_sends_the_request_to_the_default_target(router, upstreams):
    """Without a fast fallback scorer (a checkpoint trained before it existed) the default target takes a missed
    deadline; tests/test_serve_capacity.py covers the fallback scorer."""
    import copy

    old = copy.copy(router)
    old.fallback = None
    scorer = GatedScorer(old, hold=lambda prompts: True, max_route_tokens=WINDOW)
    try:
        with gateway(scorer, upstreams, router={"checkpoint": None, "deadline_ms": 200,
                                                "default_target": "small"}) as client:
            r = chat(client, question(1), router={"return_decision": True})
            assert r.status_code == 200
            assert r.headers["x-router-deadline"] == "exceeded" and r.headers["x-router-target"] == "small"
            assert "x-router-probabilities" not in r.headers and "x-router-truncated" not in r.headers
            assert r.json()["router_decision"]["deadline_exceeded"] is True
            assert r.json()["router_decision"]["truncated"] is None  # not read, so not known
            decided = client.post("/v1/route", json={"messages": question(3)}).json()
            assert decided["deadline_exceeded"] is True and decided["truncated"] is None
            assert metric(client, "prefill_router_routing_deadline_exceeded_total", target="small") == 2
            scorer.gate.set()
            assert chat(client, question(2)).headers["x-router-deadline"] == "met"
    finally:
        scorer.gate.set()


def test_a_long_prompt_never_holds_a_short_one(router, upstreams):
    """The long prompt's forward pass is stuck; a short prompt is still routed by the router (no deadline)."""
    scorer = GatedScorer(router, hold=lambda prompts: any(len(m[-1]["content"]) > 500 for m in prompts),
                         max_route_tokens=WINDOW)
    long_prompt = [{"role": "user", "content": "Lorem ipsum dolor sit amet. " * 200}]
    try:
        with gateway(scorer, upstreams, router={"checkpoint": None, "deadline_ms": None},
                     batching={"max_batch_size": 8, "max_wait_ms": 2, "length_buckets": [500]}) as client:
            url = str(client.base_url)
            results: list = []
            stuck = threading.Thread(target=lambda: results.append(
                httpx.post(url + "/v1/chat/completions", json={"model": "router", "messages": long_prompt},
                           timeout=60)))
            stuck.start()
            assert scorer.entered.wait(30)  # the long prompt's forward pass has started and is held
            short = chat(client, question(3))
            assert short.status_code == 200 and short.headers["x-router-deadline"] == "met"
            assert short.headers["x-router-target"] == router.route(question(3)).target
            assert not results  # the long one is still waiting
            scorer.gate.set()
            stuck.join(60)
        assert results[0].status_code == 200
    finally:
        scorer.gate.set()


def test_length_buckets_run_on_their_own_workers():
    gate, entered = threading.Event(), threading.Event()
    nice: dict[str, int] = {}

    def fn(items):
        nice[items[0]] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if any(len(x) > 10 for x in items):
            entered.set()
            gate.wait(30)
        return [len(x) for x in items]

    async def main():
        buckets = LengthBuckets(fn, [10], len, max_batch_size=4, max_wait_ms=1)
        assert [buckets.bucket(x) for x in ("a", "a" * 10, "a" * 11)] == [0, 0, 1]
        long = asyncio.create_task(buckets.submit("x" * 50))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        short = await buckets.submit("abc")  # answered while the long bucket's worker is held
        assert not long.done()
        gate.set()
        result = (short, await long)
        await buckets.close()
        return result

    try:
        assert asyncio.run(main()) == (3, 50)
    finally:
        gate.set()
    assert nice["x" * 50] > nice["abc"]  # the long bucket's worker yields the CPU to the short one


def test_micro_batcher_drops_an_item_nobody_wants():
    ran: list = []

    async def main():
        batcher = MicroBatcher(lambda items: ran.extend(items) or items, max_batch_size=4, max_wait_ms=1)
        with pytest.raises(asyncio.CancelledError):
            await batcher.submit("abandoned", wanted=lambda: False)
        assert await batcher.submit("kept", wanted=lambda: True) == "kept"
        await batcher.close()

    asyncio.run(main())
    assert ran == ["kept"]


# --- tool calls ---------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_pass_through_untouched(router, upstreams, stream):
    agent = conversation(2)[1] + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "sunny " * 100}]
    body = {"model": "router", "messages": agent, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
            "stream": stream}
    for up in upstreams.values():
        up.default = Answer("", tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}'}])
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams, sessions={"mode": "per_turn"}) as client:
        # the window leaves out tool calls and tool results: the same window was just routed, so the cache answers
        window = [agent[0], [m for m in agent if m["role"] == "user"][-1]]
        assert client.post("/v1/route", json={"messages": window}).json()["cache"] == "miss"
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
            calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
        else:
            r = chat(client, agent, **{k: v for k, v in body.items() if k not in ("model", "messages")})
            assert r.status_code == 200
            message = r.json()["choices"][0]["message"]
            calls, finish = message["tool_calls"], [r.json()["choices"][0]["finish_reason"]]
    assert r.headers["x-router-cache"] == "hit"
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and finish == ["tool_calls"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    sent = upstreams[r.headers["x-router-target"]].requests[-1].body
    assert sent == {**body, "model": f"{r.headers['x-router-target']}-upstream"}


# --- the router object ---------------------------------------------------------------------------------------
def test_an_allow_list_binds_the_fallbacks_too(router, upstreams):
    """router.models limits who may answer: when the only allowed target fails, no other target is tried."""
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams) as client:
        upstreams["mid"].script(Fail(503), Fail(503), Fail(503), Fail(503))
        failed = chat(client, question(6), router={"models": ["mid"]})
        upstreams["mid"].script(Fail(503), Fail(503))
        rescued = chat(client, question(7), router={"models": ["mid", "big"]})
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "all_upstreams_failed"
    assert not upstreams["small"].requests  # fallback_order lists small first, but it is not allowed
    if rescued.headers.get("x-router-chosen") == "mid":
        assert rescued.status_code == 200 and rescued.headers["x-router-target"] == "big"


def test_router_object_allow_list_trade_off_and_decision(router, upstreams):
    msgs = question(5)
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams) as client:
        only_mid = chat(client, msgs, router={"models": ["mid"]})
        cheapest = chat(client, msgs, router={"lambda": 1e6})
        tolerant = chat(client, msgs, router={"tolerance": 1.0, "return_decision": True})
        best = chat(client, msgs, router={"models": ["big", "mid"], "lambda": 0, "return_decision": True})
        decided = client.post("/v1/route", json={"messages": msgs, "router": {"models": ["small", "mid"]}}).json()
    assert only_mid.headers["x-router-target"] == "mid"
    assert cheapest.headers["x-router-target"] == "small"
    assert tolerant.headers["x-router-target"] == "small"  # tolerance 1: every target is within it
    decision = tolerant.json()["router_decision"]
    assert decision["target"] == decision["answered_by"] == "small" and decision["policy"] == "tolerance:1"
    assert set(decision["probabilities"]) == set(decision["estimated_cost"]) == set(TARGETS)
    assert tolerant.json()["choices"][0]["message"]["content"] == "answer from small"
    P = best.json()["router_decision"]["probabilities"]
    assert best.headers["x-router-target"] == max(["big", "mid"], key=P.get)
    assert "router_decision" not in only_mid.json()  # only when asked for
    assert decided["target"] in ("small", "mid")
    for up in upstreams.values():  # never forwarded upstream
        assert all("router" not in r.body for r in up.requests)


def test_router_object_session_pins_in_any_mode(router, upstreams):
    turns = conversation(3, tool_turns=False)
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams, sessions={"mode": "per_turn"}) as client:
        first = chat(client, turns[0], router={"session": "s-1", "models": ["mid"]})
        later = [chat(client, t, router={"session": "s-1"}) for t in turns[1:]]
    assert first.headers["x-router-target"] == "mid"
    assert [r.headers["x-router-target"] for r in later] == ["mid", "mid"]
    assert [r.headers["x-router-session"] for r in later] == ["pinned", "pinned"]


@pytest.mark.parametrize("value, field", [
    ({"models": ["gpt-17"]}, "router.models"), ({"models": []}, "router.models"), ({"models": "big"}, "router.models"),
    ({"lambda": -1}, "router.lambda"), ({"lambda": "cheap"}, "router.lambda"),
    ({"tolerance": -0.5}, "router.tolerance"),
    ({"lambda": 1, "tolerance": 0.1}, "router.lambda"), ({"return_decision": "yes"}, "router.return_decision"),
    ({"session": ""}, "router.session"), ({"session": 7}, "router.session"), ({"speed": "fast"}, "router.speed"),
    ("fast", "router"), ([1], "router"),
])
def test_router_object_bad_values_are_400_naming_the_field(router, upstreams, value, field):
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams) as client:
        r = chat(client, question(1), router=value)
        pinned = chat(client, question(1), model="mid", router={"models": ["mid"]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_router_options" and field in r.json()["error"]["message"]
    assert pinned.status_code == 400 and "router.models" in pinned.json()["error"]["message"]
    assert sum(up.calls() for up in upstreams.values()) == 0


def test_openai_sdk_extra_body_as_in_the_docs(router, upstreams):
    openai = pytest.importorskip("openai")
    with gateway(RouterScorer(router, max_route_tokens=WINDOW), upstreams) as client:
        sdk = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0)
        reply = sdk.chat.completions.create(
            model="router", messages=question(6),
            extra_body={"router": {"models": ["small", "mid"], "lambda": 0.3, "return_decision": True}})
    decision = reply.model_extra["router_decision"]
    assert decision["target"] in ("small", "mid") and reply.choices[0].message.content == f"answer from " \
        f"{decision['answered_by']}"
    assert all("router" not in r.body for up in upstreams.values() for r in up.requests)


def test_a_windowed_checkpoint_serves_with_its_own_window(tiny_encoder_dir, tmp_path):
    from prefill_router.errors import CheckpointError, ConfigError

    windowed, plain = load_encoder(str(tiny_encoder_dir), max_route_tokens=WINDOW), load_encoder(str(tiny_encoder_dir))
    prompts = [question(i) for i in range(24)]
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([50.0, 50.0, 50.0]))
    data = RoutingDataset([str(i) for i in range(24)], prompts, TARGETS, np.ones((24, 3)),
                          cost_model.estimate(windowed.count_tokens(prompts)))
    folder = train_router(data, windowed.encode(prompts, poolings=("mean",)), config={
        "pca": 4, "policy": "argmax", "trunk": {"seeds": 1, "keep": 1, "max_epochs": 2, "hidden": [8],
                                                "dropout": [0.0], "threads": 1}},
        encoder=windowed, cost_model=cost_model).save(tmp_path / "router")
    loaded = Router.load(folder)
    assert loaded.encoder_spec["max_route_tokens"] == WINDOW  # what training read is what serving loads
    assert RouterScorer(loaded).window_info == {"max_route_tokens": WINDOW, "source": "checkpoint"}
    with pytest.raises(ConfigError, match="router.max_route_tokens"):
        RouterScorer(loaded, max_route_tokens=2 * WINDOW)
    with pytest.raises(CheckpointError, match="encoder mismatch"):
        Router.load(folder, encoder=plain)  # features read without the window are not these features
