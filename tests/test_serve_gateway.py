"""The gateway and the Client end to end: a router checkpoint trained here from the tiny random encoder, the
gateway served by uvicorn on 127.0.0.1, and fake OpenAI-compatible upstreams on their own ports."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import gateway_helpers
import httpx
import numpy as np
import pytest
from gateway_helpers import TARGETS, question, train_tiny_router
from prometheus_client.parser import text_string_to_metric_families

from prefill_router.client import Client, UpstreamHTTPError
from prefill_router.router import Router
from prefill_router.serve.app import create_app
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.fake_upstream import Answer, Fail, Stall
from prefill_router.serve.models import UnknownModel
from prefill_router.serve.server import BackgroundServer
from prefill_router.serve.upstream import AllUpstreamsFailed


@pytest.fixture(scope="module")
def checkpoint(tiny_encoder_dir, tmp_path_factory):
    """A small router on a synthetic 3-target dataset with the tiny encoder, saved to disk."""
    from prefill_router.features import load_encoder

    encoder = load_encoder(str(tiny_encoder_dir))
    return train_tiny_router(encoder, tmp_path_factory.mktemp("router")), encoder


@pytest.fixture(scope="module")
def router(checkpoint):
    folder, encoder = checkpoint
    return Router.load(folder, encoder=encoder)


def gateway_config(ups, **overrides) -> dict:
    """The shared test config with unpriced targets, 2 s attempts and an upstream API key on "big"."""
    overrides.setdefault("targets", [
        {"name": n, "base_url": ups[n].base_url, "model": f"{n}-upstream", "timeout_s": 2,
         "api_key_env": "PR_TEST_UPSTREAM_KEY" if n == "big" else None} for n in TARGETS])
    return gateway_helpers.gateway_config(ups, **overrides)


@contextmanager
def running_gateway(router, ups, **overrides):
    app = create_app(parse_gateway_config(gateway_config(ups, **overrides)), RouterScorer(router))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, server


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch):
    monkeypatch.setenv("PR_TEST_UPSTREAM_KEY", "sk-upstream-big")


def metric(client: httpx.Client, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def chat(client, model, messages, **extra):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, **extra})


def assert_openai_error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


# --- routing and proxying --------------------------------------------------------------------------------
def test_chat_routes_like_the_router_and_proxies_unchanged(router, upstreams):
    msgs = question(5)
    expected = router.route(msgs)
    with running_gateway(router, upstreams) as (client, _):
        r = chat(client, "router", msgs, temperature=0.2)
    assert r.status_code == 200, r.text
    target = r.headers["x-router-target"]
    assert target == r.headers["x-router-chosen"] == expected.target
    probabilities = json.loads(r.headers["x-router-probabilities"])
    assert list(probabilities) == TARGETS
    assert np.allclose([probabilities[t] for t in TARGETS], [expected.probabilities[t] for t in TARGETS],
                       atol=1e-5)
    assert float(r.headers["x-router-latency-ms"]) > 0
    assert json.loads(r.headers["x-router-fallbacks"]) == []
    assert r.json()["choices"][0]["message"]["content"] == f"answer from {target}"
    sent = upstreams[target].requests[-1]
    assert sent.body["model"] == f"{target}-upstream" and sent.body["temperature"] == 0.2
    assert sent.body["messages"] == msgs
    if target == "big":
        assert sent.headers["Authorization"] == "Bearer sk-upstream-big"
    assert sum(up.calls() for up in upstreams.values()) == 1


def test_lambda_and_presets_set_the_trade_off_per_request(router, upstreams):
    msgs = question(8)
    with running_gateway(router, upstreams) as (client, _):
        best = chat(client, "router:best", msgs)
        cheapest = chat(client, "router:1000000", msgs)
        cheap = chat(client, "router:cheap", msgs)
        half = chat(client, "router:0.5", msgs)
    probabilities = json.loads(best.headers["x-router-probabilities"])
    assert best.headers["x-router-target"] == max(probabilities, key=probabilities.get)
    assert cheapest.headers["x-router-target"] == "small"  # the cheapest target once cost dominates
    assert cheap.headers["x-router-target"] == router.route(msgs, lam=1.0).target
    assert half.headers["x-router-target"] == router.route(msgs, lam=0.5).target
    # one forward pass served all four: the policy is applied per request on cached probabilities
    assert [r.headers["x-router-cache"] for r in (best, cheapest, cheap, half)] == ["miss", "hit", "hit", "hit"]


def test_pinned_target_skips_routing(router, upstreams):
    with running_gateway(router, upstreams) as (client, _):
        r = chat(client, "mid", question(1))
        assert metric(client, "prefill_router_batch_size_count") == 0
    assert r.status_code == 200 and r.headers["x-router-target"] == "mid"
    assert "x-router-probabilities" not in r.headers
    assert upstreams["mid"].requests[-1].body["model"] == "mid-upstream"


def test_streaming_is_passed_through_as_sse(router, upstreams):
    msgs = question(2)
    target = router.route(msgs).target
    upstreams[target].default = Answer("streamed words arrive in order")
    with running_gateway(router, upstreams) as (client, _), client.stream("POST", "/v1/chat/completions",
                       json={"model": "router", "messages": msgs, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-router-target"] == target
        lines = [line for line in r.iter_lines() if line]
    assert upstreams[target].requests[-1].body["stream"] is True
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "streamed words arrive in order"
    assert upstreams[target].completed_streams == 1


# --- faults -----------------------------------------------------------------------------------------------
def test_retry_then_fallback_is_recorded_in_headers_and_metrics(router, upstreams):
    msgs = question(3)
    chosen = router.route(msgs).target
    chain = [chosen] + [t for t in ["mid", "small", "big"] if t != chosen]
    upstreams[chosen].script(Fail(503), Fail(500))
    with running_gateway(router, upstreams) as (client, _):
        r = chat(client, "router", msgs)
        assert r.status_code == 200
        assert r.headers["x-router-chosen"] == chosen
        assert r.headers["x-router-target"] == chain[1]
        assert json.loads(r.headers["x-router-fallbacks"]) == [chosen]
        assert r.json()["choices"][0]["message"]["content"] == f"answer from {chain[1]}"
        assert upstreams[chosen].calls() == 2  # one retry, then the next target
        assert metric(client, "prefill_router_fallbacks_total", target=chosen) == 1
        assert metric(client, "prefill_router_upstream_errors_total", target=chosen) == 2
        assert metric(client, "prefill_router_requests_total", target=chain[1], status="200") == 1


def test_timeout_falls_back(router, upstreams):
    msgs = question(4)
    chosen = router.route(msgs).target
    upstreams[chosen].script(Stall(3), Stall(3))
    with running_gateway(router, upstreams, targets=[
            {"name": n, "base_url": upstreams[n].base_url, "timeout_s": 0.3} for n in TARGETS]) as (client, _):
        r = chat(client, "router", msgs)
    assert r.status_code == 200 and r.headers["x-router-target"] != chosen
    assert json.loads(r.headers["x-router-fallbacks"]) == [chosen]


def test_every_target_failing_gives_502(router, upstreams):
    for up in upstreams.values():
        up.default = Fail(500, "down")
    with running_gateway(router, upstreams) as (client, _):
        r = chat(client, "router", question(6))
        assert_openai_error(r, 502, "all_upstreams_failed")
        assert r.json()["error"]["type"] == "upstream_error"
        assert sorted(json.loads(r.headers["x-router-fallbacks"])) == sorted(TARGETS)
        assert sum(up.calls() for up in upstreams.values()) == 6  # each target: first try and one retry
        assert metric(client, "prefill_router_errors_total", status="502", code="all_upstreams_failed") == 1
        # the first two targets were left for the next; the last had none to fall back to
        left = sum(metric(client, "prefill_router_fallbacks_total", target=t) for t in TARGETS)
        assert left == len(TARGETS) - 1
        pinned = chat(client, TARGETS[0], question(7))  # a pinned target falls back to nobody
        assert_openai_error(pinned, 502, "all_upstreams_failed")
        assert sum(metric(client, "prefill_router_fallbacks_total", target=t) for t in TARGETS) == left
        assert client.get("/health").status_code == 200  # the server is still up


def test_upstream_4xx_is_passed_through_unchanged(router, upstreams):
    msgs = question(7)
    chosen = router.route(msgs).target
    upstreams[chosen].script(Fail(400, "max_tokens is too large"))
    with running_gateway(router, upstreams) as (client, _):
        r = chat(client, "router", msgs)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "max_tokens is too large", "type": "upstream_error", "code": 400}}
    assert r.headers["x-router-target"] == chosen
    assert upstreams[chosen].calls() == 1 and sum(up.calls() for up in upstreams.values()) == 1


def test_client_disconnect_mid_stream_cancels_the_upstream_call(router, upstreams):
    msgs = question(9)
    target = router.route(msgs).target
    upstreams[target].default = Answer(" ".join(["word"] * 200), chunk_delay_s=0.05)
    with running_gateway(router, upstreams) as (client, _):
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "router", "messages": msgs, "stream": True}) as r:
            first = next(r.iter_bytes())
            assert first.startswith(b"data: ")
        # leaving the block closed our connection; the gateway must close its upstream connection too
        deadline = time.monotonic() + 20
        while upstreams[target].disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstreams[target].disconnects == 1
        assert upstreams[target].completed_streams == 0
        while metric(client, "prefill_router_stream_disconnects_total", target=target) == 0 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(client, "prefill_router_stream_disconnects_total", target=target) == 1


def test_upstream_breaking_mid_stream_ends_the_stream_with_an_error_event(router, upstreams):
    msgs = question(10)
    target = router.route(msgs).target
    upstreams[target].default = Answer("one two three four five six", cut_after=3)
    with running_gateway(router, upstreams) as (client, _):
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "router", "messages": msgs, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert metric(client, "prefill_router_upstream_errors_total", target=target) == 1
    events = [json.loads(line[len("data: "):]) for line in lines]
    assert len(events) == 4 and "data: [DONE]" not in lines  # 3 relayed chunks, then our error event
    assert events[-1]["error"]["code"] == "upstream_stream_failed"
    assert all("choices" in e for e in events[:3])


def test_missing_upstream_key_degrades_health_and_falls_back(router, upstreams, monkeypatch):
    monkeypatch.delenv("PR_TEST_UPSTREAM_KEY")
    with running_gateway(router, upstreams) as (client, _):
        health = client.get("/health").json()
        r = chat(client, "big", question(13))
    assert health["status"] == "degraded"
    assert health["upstreams"]["big"]["api_key"] == "missing (PR_TEST_UPSTREAM_KEY)"
    assert_openai_error(r, 502, "all_upstreams_failed")
    assert "PR_TEST_UPSTREAM_KEY" in r.json()["error"]["message"] and upstreams["big"].calls() == 0


# --- bad input --------------------------------------------------------------------------------------------
def test_bad_requests_get_openai_style_errors(router, upstreams):
    with running_gateway(router, upstreams, max_body_bytes=2000) as (client, _):
        url = "/v1/chat/completions"
        assert_openai_error(client.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                            400, "invalid_json")
        assert_openai_error(client.post(url, json=["a", "list"]), 400, "invalid_json")
        assert_openai_error(client.post(url, json={"model": "router"}), 400, "invalid_messages", "messages")
        assert_openai_error(chat(client, "router", []), 400, "invalid_messages")
        assert_openai_error(chat(client, "router", [{"role": "user", "content": ""}]), 400, "invalid_messages")
        assert_openai_error(chat(client, "router", [{"content": "no role"}]), 400, "invalid_messages")
        wizard = chat(client, "router", [{"role": "wizard", "content": "hi"}])
        assert_openai_error(wizard, 400, "invalid_messages")
        assert "'wizard' is not a chat role" in wizard.json()["error"]["message"]
        unknown = chat(client, "gpt-17", question(1))
        assert_openai_error(unknown, 400, "model_not_found", "model")
        assert "gpt-17" in unknown.json()["error"]["message"]
        assert_openai_error(client.post(url, json={"messages": question(1)}), 400, "missing_required_parameter",
                            "model")
        assert_openai_error(chat(client, "router:-3", question(1)), 400, "invalid_value", "model")
        number = client.post(url, json={"model": 5, "messages": question(1)})
        assert_openai_error(number, 400, "invalid_value", "model")
        assert "'model' must be a string" in number.json()["error"]["message"]
        big = chat(client, "router", [{"role": "user", "content": "x" * 5000}])
        assert_openai_error(big, 413, "request_too_large")
        # a body without Content-Length (chunked) is cut off at the limit too
        chunked = client.post(url, content=iter([b'{"model": "router", "messages": [', b" " * 3000, b"]}"]))
        assert_openai_error(chunked, 413, "request_too_large")
        assert_openai_error(client.get("/v1/nothing-here"), 404)
        assert sum(up.calls() for up in upstreams.values()) == 0
        assert metric(client, "prefill_router_errors_total", status="400", code="invalid_messages") == 5
        ok = chat(client, "router", question(1))
        assert ok.status_code == 200  # nothing above broke the server


def test_prompt_longer_than_the_encoder_context_is_truncated_not_rejected(router, upstreams):
    long_prompt = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 200}]
    with running_gateway(router, upstreams, max_body_bytes=100_000) as (client, _):
        r = chat(client, "router", long_prompt)
        decision = client.post("/v1/route", json={"messages": long_prompt}).json()
    assert r.status_code == 200 and r.headers["x-router-truncated"] == "true"
    assert decision["truncated"] is True


def test_bearer_keys(router, upstreams):
    with running_gateway(router, upstreams, auth={"keys": ["k-123"]}) as (client, _):
        assert_openai_error(chat(client, "router", question(1)), 401, "invalid_api_key")
        wrong = client.post("/v1/chat/completions", json={"model": "router", "messages": question(1)},
                            headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401, "invalid_api_key")
        assert_openai_error(client.get("/v1/models"), 401)
        assert_openai_error(client.post("/v1/route", json={"messages": question(1)}), 401)
        good = client.post("/v1/chat/completions", json={"model": "router", "messages": question(1)},
                           headers={"Authorization": "Bearer k-123"})
        assert good.status_code == 200
        assert client.get("/health").status_code == 200  # health and metrics stay open for probes
        assert upstreams[good.headers["x-router-target"]].requests[-1].headers.get("Authorization") != \
            "Bearer k-123"  # the client's gateway key never reaches an upstream


# --- other endpoints --------------------------------------------------------------------------------------
def test_route_models_health(router, upstreams):
    msgs = question(11)
    expected = router.route(msgs, lam=0.5)
    with running_gateway(router, upstreams) as (client, _):
        decision = client.post("/v1/route", json={"model": "router:0.5", "messages": msgs}).json()
        models = client.get("/v1/models").json()
        health = client.get("/health").json()
        pinned = client.post("/v1/route", json={"model": "big", "messages": msgs})
    assert decision["target"] == expected.target
    assert set(decision["probabilities"]) == set(TARGETS)
    assert decision["estimated_cost"] == pytest.approx(expected.estimated_cost)
    assert decision["estimated_cost"]["big"] > decision["estimated_cost"]["mid"] > decision["estimated_cost"]["small"]
    assert decision["latency_ms"] > 0 and decision["fallback_chain"][0] == expected.target
    assert [m["id"] for m in models["data"]] == ["router", "router:best", "router:cheap", *TARGETS]
    assert health["encoder_loaded"] is True and health["targets"] == TARGETS
    assert health["upstreams"]["big"]["api_key"] == "set" and health["status"] == "ok"
    assert_openai_error(pinned, 400, "invalid_value", "model")


def test_metrics_endpoint_is_prometheus_text(router, upstreams):
    with running_gateway(router, upstreams) as (client, _):
        chat(client, "router", question(12))
        text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(text.text)}
    assert {"prefill_router_requests", "prefill_router_routing_latency_seconds", "prefill_router_batch_size",
            "prefill_router_fallbacks", "prefill_router_upstream_errors", "prefill_router_errors"} <= names


# --- micro-batching and the cache -------------------------------------------------------------------------
async def _concurrent_chats(url: str, prompts: list, model: str = "router") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions",
                                                  json={"model": model, "messages": p}) for p in prompts))


def test_concurrent_requests_share_forward_passes(router, upstreams):
    prompts = [question(100 + i) for i in range(12)]
    with running_gateway(router, upstreams, batching={"max_batch_size": 8, "max_wait_ms": 300}) as (client, server):
        responses = asyncio.run(_concurrent_chats(server.url, prompts))
        batches = metric(client, "prefill_router_batch_size_count")
        prompts_batched = metric(client, "prefill_router_batch_size_sum")
        singles = metric(client, "prefill_router_batch_size_bucket", le="1.0")
    assert all(r.status_code == 200 for r in responses)
    assert prompts_batched == 12
    assert batches < 12 and singles < batches  # at least one forward pass carried more than one prompt
    # batching does not change decisions: each equals routing that prompt alone
    assert [r.headers["x-router-target"] for r in responses] == [router.route(p).target for p in prompts]


def test_batching_off_runs_one_forward_per_request(router, upstreams):
    prompts = [question(200 + i) for i in range(6)]
    with running_gateway(router, upstreams, batching={"max_batch_size": 1, "max_wait_ms": 0}) as (client, server):
        responses = asyncio.run(_concurrent_chats(server.url, prompts))
        assert all(r.status_code == 200 for r in responses)
        assert metric(client, "prefill_router_batch_size_count") == 6
        assert metric(client, "prefill_router_batch_size_bucket", le="1.0") == 6


def test_lru_cache_hits_and_evicts(router, upstreams):
    a, b = question(300), question(301)
    with running_gateway(router, upstreams, cache_size=1) as (client, _):
        sources = [chat(client, "router", m).headers["x-router-cache"] for m in (a, a, b, a)]
        assert sources == ["miss", "hit", "miss", "miss"]  # b evicted a (size 1)
        assert metric(client, "prefill_router_batch_size_count") == 3
        assert metric(client, "prefill_router_cache_lookups_total", result="hit") == 1
        assert metric(client, "prefill_router_cache_lookups_total", result="miss") == 3
    with running_gateway(router, upstreams, cache_size=0) as (client, _):
        assert [chat(client, "router", a).headers["x-router-cache"] for _ in range(2)] == ["miss", "miss"]


def test_identical_concurrent_prompts_share_one_forward(router, upstreams):
    with running_gateway(router, upstreams, batching={"max_batch_size": 8, "max_wait_ms": 200}) as (client, server):
        responses = asyncio.run(_concurrent_chats(server.url, [question(400)] * 5))
        assert sorted(r.headers["x-router-cache"] for r in responses) == ["miss"] + ["shared"] * 4
        assert metric(client, "prefill_router_batch_size_sum") == 1


# --- the Python client ------------------------------------------------------------------------------------
def test_client_routes_in_process_and_calls_the_upstream(router, upstreams):
    msgs = question(21)
    expected = router.route(msgs)
    # quantize null: the encoder as trained, so P equal the router's own (int8 serving: test_serve_routing.py)
    with Client(gateway_config(upstreams, router={"checkpoint": None, "quantize": None}), router=router) as client:
        reply = client.chat.completions.create(model="router", messages=msgs, max_tokens=5)
        assert reply.choices[0].message.content == f"answer from {expected.target}"
        assert reply.routing.target == reply.routing.chosen == expected.target
        assert reply.routing.probabilities == pytest.approx(expected.probabilities)
        assert "routing" not in reply  # the dict itself is the upstream's JSON
        assert upstreams[expected.target].requests[-1].body["max_tokens"] == 5
        assert client.route(msgs, model="router:1000000").target == "small"
        pinned = client.chat.completions.create(model="mid", messages=msgs)
        assert pinned.routing.target == "mid" and pinned.routing.probabilities is None


def test_client_streams(router, upstreams):
    msgs = question(22)
    target = router.route(msgs).target
    upstreams[target].default = Answer("a streamed client answer")
    with Client(gateway_config(upstreams), router=router) as client:
        stream = client.chat.completions.create(model="router", messages=msgs, stream=True)
        text = "".join(c.choices[0].delta.get("content") or "" for c in stream if c.choices)
    assert text == "a streamed client answer" and stream.routing.target == target


def test_client_falls_back_and_reports_failures(router, upstreams):
    msgs = question(23)
    chosen = router.route(msgs).target
    upstreams[chosen].script(Fail(502), Fail(502))
    with Client(gateway_config(upstreams), router=router) as client:
        reply = client.chat.completions.create(model="router", messages=msgs)
        assert reply.routing.fallbacks == [chosen] and reply.routing.target != chosen
        upstreams["mid"].script(Fail(404, "no such model"))
        with pytest.raises(UpstreamHTTPError) as exc:
            client.chat.completions.create(model="mid", messages=msgs)
        assert exc.value.status == 404 and exc.value.target == "mid"
        for up in upstreams.values():
            up.default = Fail(503)
        with pytest.raises(AllUpstreamsFailed):
            client.chat.completions.create(model="router", messages=msgs)
        with pytest.raises(UnknownModel):
            client.chat.completions.create(model="gpt-17", messages=msgs)


# --- the `serve` command ----------------------------------------------------------------------------------
def test_serve_cli_check_and_config_errors(checkpoint, upstreams, tmp_path, capsys):
    from prefill_router.cli import main

    folder, _ = checkpoint
    good = tmp_path / "gateway.yaml"
    config = gateway_config(upstreams)
    config["router"] = {"checkpoint": str(folder)}
    good.write_text(json.dumps(config))  # JSON is valid YAML
    assert main(["serve", "--config", str(good), "--check"]) == 0
    assert "config and router OK" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**config, "batching": {"max_batch_size": 0}}))
    assert main(["serve", "--config", str(bad), "--check"]) == 2
    assert "batching.max_batch_size" in capsys.readouterr().err

    missing = tmp_path / "missing.yaml"
    missing.write_text(json.dumps({**config, "router": {"checkpoint": str(tmp_path / "nope")}}))
    assert main(["serve", "--config", str(missing), "--check"]) == 2
    assert "nope" in capsys.readouterr().err

    bad_preset = tmp_path / "preset.yaml"
    bad_preset.write_text(json.dumps({**config, "presets": {"odd": {"policy": "tolerance:0.1", "lam": 1}}}))
    assert main(["serve", "--config", str(bad_preset), "--check"]) == 2
    assert "presets.odd" in capsys.readouterr().err


def test_serve_cli_serves_over_http(checkpoint, upstreams, tmp_path):
    """`python -m prefill_router serve` in its own process, as a user runs it."""
    import os
    import re
    import subprocess
    import sys

    folder, _ = checkpoint
    config = gateway_config(upstreams)
    config["router"] = {"checkpoint": str(folder)}
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prefill_router", "serve", "--config", str(path),
                             "--port", "0", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, seen = None, []
        for line in proc.stdout:  # uvicorn logs the port it bound once it is ready
            seen.append(line)
            match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
            if match:
                url = match.group(1)
                break
        assert url, "".join(seen)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").json()["encoder_loaded"] is True
            r = chat(client, "router", question(31))
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == f"answer from {r.headers['x-router-target']}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
