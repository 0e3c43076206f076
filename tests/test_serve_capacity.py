"""Routing under saturation, through real HTTP servers on 127.0.0.1: when the encoder cannot keep up, every request
still gets a learned decision (the checkpoint's fast fallback scorer) within the deadline, never the default
target; the default target only when there is no fallback scorer. Plus the capacity measurement and the
deadline-aware batcher."""

from __future__ import annotations

import asyncio
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from gateway_helpers import gateway_config, metric, question, train_tiny_router

from prefill_router.features.encoder import load_encoder
from prefill_router.router import Router
from prefill_router.serve.app import create_app
from prefill_router.serve.batching import MicroBatcher
from prefill_router.serve.capacity import describe_capacity, measure_capacity
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer, routed_window
from prefill_router.serve.server import BackgroundServer

DEADLINE_MS = 400
FORWARD_S = 0.12  # per prompt: an encoder this machine cannot keep up with at the concurrency below


@pytest.fixture(scope="module")
def router(tiny_encoder_dir, tmp_path_factory):
    encoder = load_encoder(str(tiny_encoder_dir))
    return Router.load(train_tiny_router(encoder, tmp_path_factory.mktemp("router")), encoder=encoder)


class SlowEncoder(RouterScorer):
    def score_batch(self, prompts):
        time.sleep(FORWARD_S * len(prompts))
        return super().score_batch(prompts)


@contextmanager
def gateway(scorer, ups, **router_section):
    config = gateway_config(ups, router={"checkpoint": None, "deadline_ms": DEADLINE_MS, **router_section},
                            batching={"max_batch_size": 1})
    with BackgroundServer(create_app(parse_gateway_config(config), scorer)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def flood(client, n: int, workers: int = 24) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: client.post("/v1/chat/completions", json={
            "model": "router", "messages": question(1000 + i), "router": {"return_decision": True}}), range(n)))


def test_a_saturated_gateway_decides_every_request_with_a_learned_scorer_in_time(router, upstreams):
    assert router.fallback is not None  # train_router fits it beside the main router
    scorer = SlowEncoder(router, max_route_tokens=32)
    with gateway(scorer, upstreams) as client:
        replies = flood(client, 60)
        # A conversation whose first turn the fallback decided stays on its target once the encoder is free.
        first = next(i for i, r in enumerate(replies) if r.headers["x-router-decided-by"] == "fallback")
        time.sleep(FORWARD_S * 70)  # the queue has drained
        turn_2 = client.post("/v1/chat/completions", json={"model": "router", "messages": question(1000 + first) + [
            {"role": "assistant", "content": "The answer is 4."}, {"role": "user", "content": "Why?"}]})
        decisions = client.get("/v1/decisions", params={"limit": 100}).json()["data"]
        stats = client.get("/v1/stats").json()
        prometheus = client.get("/metrics").text
    assert [r.status_code for r in replies] == [200] * 60
    assert turn_2.headers["x-router-cache"] == "hit"
    assert turn_2.headers["x-router-target"] == replies[first].headers["x-router-target"]
    assert turn_2.headers["x-router-decided-by"] == "fallback"  # the cached decision is the fallback's
    decided = [r.headers["x-router-decided-by"] for r in replies]
    assert set(decided) <= {"prefill", "fallback"} and decided.count("fallback") > 0 and "prefill" in decided
    for r in replies:
        # Nobody waited past the deadline for a decision (a scheduling margin aside: this machine is shared).
        assert float(r.headers["x-router-latency-ms"]) < DEADLINE_MS + 300
        decision = r.json()["router_decision"]
        assert decision["decided_by"] == r.headers["x-router-decided-by"] and decision["probabilities"]
    # The fallback's P are its own: the fast scorer's on the routing window (the serving copy reads 32 tokens).
    fallback_reply = next(r for r in replies if r.headers["x-router-decided-by"] == "fallback")
    i = replies.index(fallback_reply)
    P, _ = scorer.router.predict_fallback([routed_window(question(1000 + i), "first_turn")])
    got = fallback_reply.json()["router_decision"]["probabilities"]
    assert [got[t] for t in router.targets] == pytest.approx(P[0].tolist(), abs=1e-6)
    assert metric(prometheus, "prefill_router_decisions_total", scorer="default") == 0
    decided.append("fallback")  # turn 2
    assert metric(prometheus, "prefill_router_decisions_total", scorer="fallback") == decided.count("fallback")
    assert metric(prometheus, "prefill_router_admission_fallbacks_total") > 0  # decided at arrival, not waited out
    assert stats["decided_by"] == {k: decided.count(k) for k in set(decided)}
    assert {d["decided_by"] for d in decisions} == set(decided)


def test_without_a_fallback_scorer_the_default_target_takes_what_misses_the_deadline(router, upstreams):
    old = copy.copy(router)
    old.fallback = None  # a checkpoint trained before the fallback scorer existed
    with gateway(SlowEncoder(old, max_route_tokens=32), upstreams, default_target="small") as client:
        replies = flood(client, 24)
    decided = [r.headers["x-router-decided-by"] for r in replies]
    assert all(r.status_code == 200 for r in replies)
    assert "default" in decided and "fallback" not in decided
    assert {r.headers["x-router-target"] for r, d in zip(replies, decided) if d == "default"} == {"small"}


def test_a_batch_stops_growing_before_it_would_miss_its_earliest_deadline():
    seen: list[int] = []

    def forward(items):
        time.sleep(0.05 * len(items))
        return items

    async def main():
        batcher = MicroBatcher(forward, max_batch_size=16, max_wait_ms=20, on_batch=seen.append)
        await batcher.submit(0)  # one batch teaches the drain rate: about 0.05 s per item
        assert batcher.drain.seconds_per_unit == pytest.approx(0.05, rel=0.8)
        results = await asyncio.gather(*(batcher.submit(i, deadline_s=0.18) for i in range(1, 9)))
        await batcher.close()
        return results

    assert asyncio.run(main()) == list(range(1, 9))
    assert seen[0] == 1 and max(seen[1:]) <= 4 < 8  # each batch fits a 0.18 s deadline, not all 8 at once


def test_capacity_is_measured_on_the_router_and_picks_a_batch_size(router):
    capacity = measure_capacity(RouterScorer(router, max_route_tokens=32), seconds=0.2)
    assert set(capacity["prompts_per_s"]) == {1, 4} and all(v > 0 for v in capacity["prompts_per_s"].values())
    rates = capacity["prompts_per_s"]
    assert capacity["batch_size"] == (4 if rates[4] >= 1.1 * rates[1] else 1)
    assert capacity["seconds_per_char"] > 0 and np.isfinite(capacity["seconds_per_char"])
    text = describe_capacity(capacity, 2000)
    assert "prompts/s at batch 1" in text and "32-token" in text
