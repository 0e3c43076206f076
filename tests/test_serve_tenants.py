"""Client keys as tenants (alias, allowed targets, trade-off, rate limit, budgets), their scope, and the faults a
shared gateway must answer with a 4xx: a tiny router trained here, the gateway served by uvicorn on 127.0.0.1,
fake upstreams on their own ports."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import pytest
from gateway_helpers import (  # noqa: F401 - encoder, checkpoint: fixtures
    TARGETS,
    metric,
    question,
    train_tiny_router,
    upstream_targets,
)

from prefill_router.router import Router
from prefill_router.serve.app import create_app
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.server import BackgroundServer

OPERATOR = {"Authorization": "Bearer operator-secret-key"}
TENANTS = [
    {"alias": "frugal", "key": "frugal-secret-key", "models": ["small", "mid"], "preset": "cheap"},
    {"alias": "limited", "key_env": "PR_TEST_LIMITED_KEY", "rpm": 3},
    {"alias": "broke", "key": "broke-secret-key", "budget_usd_per_day": 1e-6},
    {"alias": "monthly", "key": "monthly-secret-key", "budget_usd_per_month": 1e-6},
]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path, **overrides):
    monkeypatch.setenv("PR_TEST_LIMITED_KEY", "limited-secret-key")
    config = {"router": {"checkpoint": str(checkpoint), "quantize": None}, "targets": upstream_targets(upstreams),
              "batching": {"max_batch_size": 4, "max_wait_ms": 1}, "auth": {"keys": ["plain-secret-key"],
                                                                            "tenants": TENANTS},
              "admin": {"keys": ["operator-secret-key"]}, "feedback": {"dir": str(tmp_path / "feedback")},
              "max_body_bytes": 200_000, **overrides}
    app = create_app(parse_gateway_config(config), RouterScorer(Router.load(checkpoint, encoder=encoder)))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, app


def chat(client, key, i=0, **extra):
    return client.post("/v1/chat/completions", headers=bearer(key),
                       json={"model": "router", "messages": question(i), **extra})


def test_a_key_routes_only_to_its_targets_with_its_trade_off(checkpoint, encoder, upstreams, monkeypatch,
                                                              tmp_path):
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, app):
        routed = [chat(client, "frugal-secret-key", i) for i in range(6)]
        named = client.post("/v1/chat/completions", headers=bearer("frugal-secret-key"),
                            json={"model": "big", "messages": question(1)})
        asked_for_big = chat(client, "frugal-secret-key", 1, router={"models": ["big"]})
        decision = client.post("/v1/route", headers=bearer("frugal-secret-key"), json={"messages": question(2)})
        models = client.get("/v1/models", headers=bearer("frugal-secret-key")).json()["data"]
        everyone = client.get("/v1/models", headers=OPERATOR).json()["data"]
        policy = app.state.gateway.engine.scorer.policy_spec(None, 1.0)  # the "cheap" preset: lambda 1
    assert all(r.status_code == 200 for r in routed)
    assert {r.headers["x-router-target"] for r in routed} <= {"small", "mid"}
    assert named.status_code == 403 and named.json()["error"]["code"] == "model_not_allowed"
    assert "frugal" in named.json()["error"]["message"]
    assert asked_for_big.status_code == 403 and asked_for_big.json()["error"]["param"] == "router.models"
    assert decision.json()["policy"] == policy and decision.json()["target"] in ("small", "mid")
    assert "big" not in {m["id"] for m in models} and "big" in {m["id"] for m in everyone}


def test_over_the_rate_a_key_gets_429_with_retry_after(checkpoint, encoder, upstreams, monkeypatch, tmp_path):
    if time.time() % 60 > 50:  # the limit counts per UTC minute: start with the minute ahead of us
        time.sleep(61 - time.time() % 60)
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, _):
        statuses = [chat(client, "limited-secret-key", i) for i in range(5)]
        others = chat(client, "plain-secret-key")  # a plain key has no limit, and another key's count is not its
        prometheus = client.get("/metrics").text
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
    refused = statuses[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "'limited'" in refused.json()["error"][
        "message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert others.status_code == 200
    assert metric(prometheus, "prefill_router_key_limited_total", key="limited", reason="rate") == 2


@pytest.mark.parametrize(("key", "period"), [("broke-secret-key", "daily"), ("monthly-secret-key", "monthly")])
def test_over_its_budget_a_key_gets_429_naming_it_and_the_reset(checkpoint, encoder, upstreams, monkeypatch,
                                                                 tmp_path, key, period):
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, _):
        first = chat(client, key, 1)  # within budget when it starts; its cost takes the key past it
        second = chat(client, key, 2)
        stats = client.get("/v1/stats", headers=OPERATOR).json()
        own = client.get("/v1/stats", headers=bearer(key)).json()
    assert first.status_code == 200
    assert second.status_code == 429, second.text
    error = second.json()["error"]
    alias = key.split("-")[0]
    assert error["code"] == "budget_exceeded" and f"'{alias}'" in error["message"] and period in error["message"]
    resets = datetime.strptime(error["message"].rsplit("resets at ", 1)[1], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC)
    now = datetime.now(UTC)
    assert 0 < (resets - now).total_seconds() <= (86400 if period == "daily" else 31 * 86400)
    assert resets.hour == resets.minute == 0 and (period == "daily" or resets.day == 1)
    assert int(second.headers["retry-after"]) == pytest.approx((resets - now).total_seconds(), abs=5)
    assert stats["keys"][alias]["requests"] == 1 and stats["keys"][alias]["usd"] > 0
    assert own == {"key": alias, "requests": 1, "usd": stats["keys"][alias]["usd"]}


def test_a_client_key_sees_and_scores_only_its_own_decisions(checkpoint, encoder, upstreams, monkeypatch,
                                                             tmp_path):
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, _):
        mine = chat(client, "plain-secret-key", 1).headers["x-router-request-id"]
        theirs = chat(client, "frugal-secret-key", 2).headers["x-router-request-id"]
        seen = {who: {d["id"] for d in client.get("/v1/decisions", headers=h).json()["data"]}
                for who, h in (("plain", bearer("plain-secret-key")), ("frugal", bearer("frugal-secret-key")),
                               ("operator", OPERATOR))}
        stolen = client.post("/v1/feedback", headers=bearer("frugal-secret-key"), json={"id": mine, "score": 1})
        own = client.post("/v1/feedback", headers=bearer("frugal-secret-key"), json={"id": theirs, "score": 1})
        by_operator = client.post("/v1/feedback", headers=OPERATOR, json={"id": mine, "score": 0})
        plain_stats = client.get("/v1/stats", headers=bearer("plain-secret-key")).json()
    assert seen["plain"] == {mine} and seen["frugal"] == {theirs} and seen["operator"] == {mine, theirs}
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "unknown_request_id"
    assert own.status_code == 200 and by_operator.status_code == 200
    assert plain_stats["key"].startswith("key-") and "targets" not in plain_stats


def _raw(url: str, head: str, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Send a request head (and part of a body) on a raw socket; what the server answers within wait_s."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        try:
            return s.recv(65536)
        except TimeoutError:
            return b""


@pytest.mark.parametrize("path", ["/v1/feedback", "/admin/reload", "/v1/chat/completions"])
def test_a_body_is_not_read_before_the_key_is_checked(checkpoint, encoder, upstreams, monkeypatch, tmp_path,
                                                      path):
    """A 300 MB body announced without a key: 401 at once, after 1 KB of it (the rest is never sent)."""
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, _):
        url = str(client.base_url).rstrip("/")
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 300000000\r\n")
        started = time.monotonic()
        answer = _raw(url, head, b"{" + b" " * 1024)
        took = time.monotonic() - started
        too_big = _raw(url, head.replace("Host: x", "Host: x\r\nAuthorization: Bearer operator-secret-key"),
                       b"{")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert took < 9  # not waiting for a body that never comes
    assert too_big.startswith(b"HTTP/1.1 413"), too_big[:200]


def test_strict_types_and_out_of_range_numbers_are_named_4xx(checkpoint, encoder, upstreams, monkeypatch,
                                                              tmp_path):
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, _):
        request_id = chat(client, "plain-secret-key").headers["x-router-request-id"]
        answers = {
            "lambda 1e400": client.post("/v1/route", headers=OPERATOR, content=b'{"messages": [{"role": "user", '
                                        b'"content": "hi"}], "router": {"lambda": 1e400}}'),
            "lambda 10^400": client.post("/v1/route", headers=OPERATOR, content=b'{"messages": [{"role": "user", '
                                         b'"content": "hi"}], "router": {"lambda": 1' + b"0" * 400 + b"}}"),
            "tolerance 1e400": client.post("/v1/route", headers=OPERATOR, content=b'{"messages": [{"role": '
                                           b'"user", "content": "hi"}], "router": {"tolerance": 1e400}}'),
            "score '1'": client.post("/v1/feedback", headers=OPERATOR, json={"id": request_id, "score": "1"}),
            "score true": client.post("/v1/feedback", headers=OPERATOR, json={"id": request_id, "score": True}),
            "reload_encoder 'yes'": client.post("/admin/reload", headers=OPERATOR,
                                                json={"reload_encoder": "yes"}),
            "lone surrogate path": client.post("/admin/reload", headers=OPERATOR,
                                               content=b'{"checkpoint": "/tmp/\\ud800"}'),
            "NUL in path": client.post("/admin/reload", headers=OPERATOR, json={"checkpoint": "/tmp/a\u0000b"}),
        }
        still_open = client.post("/v1/feedback", headers=OPERATOR, json={"id": request_id, "score": 1})
    for what, r in answers.items():
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert r.json()["error"]["message"], what
    assert answers["score '1'"].json()["error"]["param"] == "score"
    assert answers["reload_encoder 'yes'"].json()["error"]["param"] == "reload_encoder"
    assert still_open.status_code == 200  # the refused ones recorded nothing


def test_a_reload_while_a_request_is_uploading_fails_nothing(checkpoint, encoder, upstreams, monkeypatch,
                                                             tmp_path):
    """The request takes the routing engine only once its body is in: a reload meanwhile cannot close it."""
    with serving(checkpoint, encoder, upstreams, monkeypatch, tmp_path) as (client, _):
        url = str(client.base_url).rstrip("/")
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": "router", "messages": question(3)}).encode()
        answers = []

        def upload() -> None:
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Authorization: Bearer plain-secret-key\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                          + body[:10])
                reloaded.wait(30)
                s.sendall(body[10:])
                answers.append(s.recv(65536))

        reloaded = threading.Event()
        uploads = [threading.Thread(target=upload) for _ in range(3)]
        for t in uploads:
            t.start()
        time.sleep(0.5)
        for _ in range(2):
            r = client.post("/admin/reload", headers=OPERATOR, json={})
            assert r.status_code == 200, r.text
        time.sleep(0.5)  # the replaced engines retire once nothing holds them
        reloaded.set()
        for t in uploads:
            t.join(30)
    assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 200") for a in answers), [a[:300] for a in answers]


def test_the_journal_resumes_past_foreign_entries(tmp_path):
    from prefill_router.serve.journal import FeedbackJournal

    folder = tmp_path / "journal"
    folder.mkdir()
    good = {"id": "rr-good", "aliases": ["chatcmpl-1"], "targets": TARGETS, "chosen": "big", "answered_by": "big",
            "shape": [1], "x": "AAAAAA=="}
    (folder / "routed-00000000000000000001.jsonl").write_text("\n".join([
        json.dumps({"id": ["a", "list"], "aliases": []}), json.dumps({"id": "rr-x", "aliases": [7]}),
        json.dumps([1, 2]), "[" * 50_000, json.dumps(good), json.dumps({"alias_of": ["x"], "aliases": ["y"]})]) + "\n")
    (folder / "routed-00000000000000000002.jsonl").mkdir()  # a folder with a segment's name
    (folder / "feedback.jsonl").write_text(json.dumps({"id": {"not": "a string"}}) + "\n")
    journal = FeedbackJournal(folder).start()
    try:
        assert journal.lookup("rr-good").result(10)["id"] == "rr-good"
        assert journal.lookup("chatcmpl-1").result(10)["id"] == "rr-good"
        recorded = journal.feedback("rr-good", 1.0, None).result(10)
        assert recorded["id"] == "rr-good"
    finally:
        journal.close()
