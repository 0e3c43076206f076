"""Gateway building blocks: config validation, model names, message checks, the LRU cache, the micro-batcher,
and the upstream retry/fallback rules against real fake upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from prefill_router.errors import ConfigError
from prefill_router.serve.batching import LRUCache, MicroBatcher
from prefill_router.serve.config import Preset, load_gateway_config, parse_gateway_config
from prefill_router.serve.engine import BadMessages, messages_key, routing_messages
from prefill_router.serve.fake_upstream import Answer, Drop, Fail, Stall
from prefill_router.serve.models import UnknownModel, resolve_model
from prefill_router.serve.upstream import AllUpstreamsFailed, UpstreamPool
from prefill_router.targets import TargetConfig


def _targets(*names):
    return [{"name": n, "base_url": f"http://127.0.0.1:9/{n}"} for n in names]


# --- config ---------------------------------------------------------------------------------------------
def test_config_file_relative_checkpoint_and_defaults(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("router: {checkpoint: ckpt}\ntargets:\n  - {name: a, base_url: 'http://x/v1'}\n")
    config = load_gateway_config(path)
    assert config.router.checkpoint == (tmp_path / "ckpt").resolve()
    assert config.fallback_chain("a") == ["a"]
    assert config.batching.max_batch_size is None and config.cache_size > 0  # None: measured at start


def test_config_toml(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('fallback_order = ["b", "a"]\n[router]\ncheckpoint = "/abs/ckpt"\n'
                    '[[targets]]\nname = "a"\nbase_url = "http://x/v1"\n'
                    '[[targets]]\nname = "b"\nbase_url = "http://y/v1"\n')
    config = load_gateway_config(path)
    assert config.fallback_chain("a") == ["a", "b"]
    assert config.fallback_chain("b") == ["b", "a"]


@pytest.mark.parametrize("data, field", [
    ({"router": {}, "targets": []}, "targets"),
    ({"router": {}, "targets": [{"name": "a", "base_url": "ftp://x"}]}, "targets.0.base_url"),
    ({"router": {}, "targets": _targets("a"), "batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"router": {}, "targets": _targets("a"), "batching": {"max_wait_ms": -1}}, "batching.max_wait_ms"),
    ({"router": {}, "targets": _targets("a"), "cache_size": -1}, "cache_size"),
    ({"router": {}, "targets": _targets("a"), "max_body_bytes": 0}, "max_body_bytes"),
    ({"router": {}, "targets": _targets("a"), "listen": {"port": 70000}}, "listen.port"),
    ({"router": {}, "targets": _targets("a"), "bogus": 1}, "bogus"),
    ({"router": {"lam": -1}, "targets": _targets("a")}, "router.lam"),
    ({"router": {}, "targets": _targets("a"), "presets": {"x:y": {"lam": 1}}}, "presets"),
])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as exc:
        parse_gateway_config(data, "gw.yaml")
    message = str(exc.value)
    assert "gw.yaml" in message
    assert any(line.strip().startswith(field + ":") for line in message.splitlines()), message


@pytest.mark.parametrize("data, words", [
    ({"router": {}, "targets": _targets("a", "a")}, ["duplicate", "'a'"]),
    ({"router": {}, "targets": _targets("router")}, ["clash", "router"]),
    ({"router": {}, "targets": _targets("a"), "fallback_order": ["a", "zz"]}, ["fallback_order", "zz"]),
    ({"router": {}, "targets": [{**_targets("a")[0], "fallbacks": ["q"]}]}, ["targets.0.fallbacks", "q"]),
])
def test_config_cross_field_errors(data, words):
    with pytest.raises(ConfigError) as exc:
        parse_gateway_config(data, "gw.yaml")
    for w in words:
        assert w in str(exc.value)


def test_per_target_fallbacks_override_the_global_order():
    config = parse_gateway_config({"router": {}, "fallback_order": ["a", "b", "c"],
                                   "targets": [{**_targets("a")[0], "fallbacks": ["c"]}, *_targets("b", "c")]})
    assert config.fallback_chain("a") == ["a", "c"]
    assert config.fallback_chain("b") == ["b", "a", "c"]


def test_missing_config_file_and_auth_env(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        load_gateway_config(tmp_path / "nope.yaml")
    config = parse_gateway_config({"router": {}, "targets": _targets("a"),
                                   "auth": {"keys": ["k1"], "keys_env": "PR_TEST_KEYS"}})
    monkeypatch.delenv("PR_TEST_KEYS", raising=False)
    with pytest.raises(ConfigError, match="auth.keys_env"):
        config.auth.all_keys()
    monkeypatch.setenv("PR_TEST_KEYS", "k2, k3,")
    assert config.auth.all_keys() == {"k1", "k2", "k3"}


# --- model names ----------------------------------------------------------------------------------------
PRESETS = {"best": Preset(lam=0.0), "cheap": Preset(lam=1.0), "safe": Preset(policy="tolerance:0.05")}


def test_resolve_model_names():
    targets = ["big", "small"]
    r = resolve_model("router", targets, PRESETS, default_policy="utility:0.1", default_lam=None)
    assert (r.pinned, r.policy, r.lam) == (None, "utility:0.1", None)
    r = resolve_model("router:0.25", targets, PRESETS)
    assert (r.pinned, r.lam) == (None, 0.25)
    r = resolve_model("router:cheap", targets, PRESETS, default_policy="utility:0.2", default_lam=0.5)
    assert (r.policy, r.lam) == ("utility:0.2", 1.0)
    r = resolve_model("router:safe", targets, PRESETS, default_policy="argmax", default_lam=0.5)
    assert (r.policy, r.lam) == ("tolerance:0.05", None)  # a preset naming its policy is taken as written
    assert resolve_model("small", targets, PRESETS).pinned == "small"


@pytest.mark.parametrize("name, words", [
    ("gpt-5", ["unknown model 'gpt-5'", "big", "router:cheap"]),
    ("router:fast", ["'fast'", "preset"]),
    ("router:-1", ["lambda", ">= 0"]),
    ("router:nan", ["lambda"]),
    ("", ["required"]),
    (None, ["required"]),
])
def test_resolve_model_errors(name, words):
    with pytest.raises(UnknownModel) as exc:
        resolve_model(name, ["big", "small"], PRESETS)
    for w in words:
        assert w in str(exc.value)


# --- messages -------------------------------------------------------------------------------------------
def test_routing_messages_keeps_text_only():
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is"},
                                         {"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": None, "tool_calls": []}]
    assert routing_messages(msgs) == [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "what is\n2+2?"}]
    assert messages_key(routing_messages(msgs)) == messages_key([{"content": "be brief", "role": "system"},
                                                                  {"role": "user", "content": "what is\n2+2?"}])
    assert messages_key([{"role": "user", "content": "a"}]) != messages_key([{"role": "user", "content": "b"}])


@pytest.mark.parametrize("messages, words", [
    (None, "non-empty list"), ([], "non-empty list"), ("hi", "non-empty list"),
    (["hi"], "messages[0]"), ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [5]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "   "}], "no text"), ([{"role": "user", "content": ""}], "no text"),
    ([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}], "messages[1].role 'wizard'"),
])
def test_routing_messages_errors(messages, words):
    with pytest.raises(BadMessages, match=words.replace("[", r"\[").replace("]", r"\]")):
        routing_messages(messages)


# --- LRU cache ------------------------------------------------------------------------------------------
def test_lru_cache_evicts_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1          # a is now the most recent
    cache.put("c", 3)                   # evicts b
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    off = LRUCache(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


# --- micro-batcher --------------------------------------------------------------------------------------
def test_micro_batcher_batches_concurrent_items_and_keeps_order():
    calls: list[list[int]] = []
    gate = threading.Event()

    def square(items):
        gate.wait(5)  # hold the first batch so the others queue up behind it
        calls.append(list(items))
        return [i * i for i in items]

    async def main():
        batcher = MicroBatcher(square, max_batch_size=4, max_wait_ms=50, on_batch=sizes.append)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.1)     # the first batch is now running (blocked on the gate)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results

    sizes: list[int] = []
    assert asyncio.run(main()) == [i * i for i in range(10)]
    assert sizes[0] == 1 and max(sizes) == 4 and sum(sizes) == 10
    assert all(len(c) <= 4 for c in calls)
    assert sorted(i for c in calls for i in c) == list(range(10))


def test_micro_batcher_isolates_a_failing_item():
    def fn(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    async def main():
        batcher = MicroBatcher(fn, max_batch_size=8, max_wait_ms=100)
        results = await asyncio.gather(*(batcher.submit(s) for s in ["a", "bad", "c"]), return_exceptions=True)
        await batcher.close()
        return results

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C")
    assert isinstance(bad, ValueError)


def test_micro_batcher_size_one_never_batches():
    sizes: list[int] = []

    async def main():
        batcher = MicroBatcher(lambda xs: [x + 1 for x in xs], max_batch_size=1, max_wait_ms=50,
                               on_batch=sizes.append)
        out = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        await batcher.close()
        return out

    assert asyncio.run(main()) == [1, 2, 3, 4, 5, 6]
    assert sizes == [1] * 6


# --- upstream rules -------------------------------------------------------------------------------------
BODY = {"model": "router", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3}


@pytest.fixture(scope="module")
def upstream_names() -> list[str]:
    return ["a", "b"]  # the shared `upstreams` fixture (conftest.py) starts these


def _pool(a, b, retries=1, timeout=1.0, failed=None):
    targets = [TargetConfig(name="ta", base_url=a.base_url, model="model-a", timeout_s=timeout),
               TargetConfig(name="tb", base_url=b.base_url, model="model-b", timeout_s=timeout)]
    return UpstreamPool(targets, retries=retries, on_attempt_failed=None if failed is None else failed.append)


def _chat(pool, chain, body=BODY, stream=False):
    async def main():
        try:
            reply = await pool.chat(chain, body, stream=stream)
            if stream:
                await reply.response.aread()
                await reply.response.aclose()
            return reply
        finally:
            await pool.aclose()
    return asyncio.run(main())


def test_upstream_rewrites_model_and_keeps_other_fields(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    reply = _chat(_pool(a, b), ["ta", "tb"])
    assert reply.target == "ta" and reply.failed == [] and reply.response.status_code == 200
    sent = a.requests[-1].body
    assert sent["model"] == "model-a" and sent["temperature"] == 0.3 and sent["messages"] == BODY["messages"]
    assert b.calls() == 0


def test_upstream_retries_once_then_falls_back(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.script(Fail(503), Fail(500))
    failed = []
    reply = _chat(_pool(a, b, failed=failed), ["ta", "tb"])
    assert reply.target == "tb" and reply.fallbacks == ["ta"]
    assert a.calls() == 2 and b.calls() == 1
    assert [(f.target, f.status) for f in failed] == [("ta", 503), ("ta", 500)]


def test_upstream_retry_succeeds_without_fallback(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.script(Fail(429, retry_after=1))
    reply = _chat(_pool(a, b), ["ta", "tb"])
    assert reply.target == "ta" and reply.fallbacks == [] and len(reply.failed) == 1
    assert a.calls() == 2 and b.calls() == 0


def test_upstream_timeout_and_connection_error_fall_back(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.script(Stall(3), Drop())
    reply = _chat(_pool(a, b, timeout=0.3), ["ta", "tb"])
    assert reply.target == "tb"
    assert "timeout" in reply.failed[0].reason and "connection error" in reply.failed[1].reason


def test_upstream_4xx_is_passed_through_without_retry(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.script(Fail(400, "context length exceeded"))
    reply = _chat(_pool(a, b), ["ta", "tb"])
    assert reply.target == "ta" and reply.response.status_code == 400
    assert reply.response.json()["error"]["message"] == "context length exceeded"
    assert a.calls() == 1 and b.calls() == 0


def test_upstream_all_fail_lists_every_attempt(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.script(Fail(500), Fail(502))
    b.script(Fail(503), Drop())
    with pytest.raises(AllUpstreamsFailed) as exc:
        _chat(_pool(a, b), ["ta", "tb"])
    assert [(x.target, x.status) for x in exc.value.attempts] == [("ta", 500), ("ta", 502), ("tb", 503),
                                                                  ("tb", None)]


def test_upstream_missing_api_key_env_skips_to_next(upstreams, monkeypatch):
    a, b = upstreams["a"], upstreams["b"]
    monkeypatch.delenv("PR_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("PR_TEST_KEY_B", "secret-b")
    targets = [TargetConfig(name="ta", base_url=a.base_url, api_key_env="PR_TEST_UNSET_KEY"),
               TargetConfig(name="tb", base_url=b.base_url, api_key_env="PR_TEST_KEY_B")]

    async def main():
        pool = UpstreamPool(targets)
        try:
            return await pool.chat(["ta", "tb"], BODY)
        finally:
            await pool.aclose()

    reply = asyncio.run(main())
    assert reply.target == "tb" and "PR_TEST_UNSET_KEY" in reply.failed[0].reason and a.calls() == 0
    assert b.requests[-1].headers["Authorization"] == "Bearer secret-b"


def test_upstream_stream_falls_back_before_first_byte(upstreams):
    a, b = upstreams["a"], upstreams["b"]
    a.script(Fail(503), Fail(503))
    b.default = Answer("one two three")
    reply = _chat(_pool(a, b), ["ta", "tb"], body={**BODY, "stream": True}, stream=True)
    assert reply.target == "tb" and reply.fallbacks == ["ta"]
    assert b"data: [DONE]" in reply.response.content


def test_fake_upstream_stall_is_a_real_timeout(upstreams):
    a = upstreams["a"]
    a.script(Stall(2))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(a.base_url + "/chat/completions", json=BODY, timeout=0.2)
