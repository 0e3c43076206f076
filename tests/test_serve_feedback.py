"""Spend tracking, the feedback endpoint and its journal, and hot reload: a tiny router trained here, the gateway
served by uvicorn on 127.0.0.1, fake OpenAI-compatible upstreams on their own ports."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from gateway_helpers import (
    TARGETS,
    metric,
    question,
    train_tiny_router,
    upstream_targets,
    usage_cost,
)

from prefill_router.router import Router
from prefill_router.serve.app import create_app
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.journal import FeedbackJournal, UnknownRequestId, read_feedback
from prefill_router.serve.server import BackgroundServer

ADMIN = "admin-secret"


@contextmanager
def serving(checkpoint, encoder, upstreams, **overrides):
    config = {"router": {"checkpoint": str(checkpoint), "quantize": None}, "targets": upstream_targets(upstreams),
              "batching": {"max_batch_size": 4, "max_wait_ms": 1}, **overrides}
    app = create_app(parse_gateway_config(config), RouterScorer(Router.load(checkpoint, encoder=encoder)))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, app


def chat(client, i, **extra):
    return client.post("/v1/chat/completions", json={"model": "router", "messages": question(i), **extra})


def streamed(client, i, include_usage=True) -> tuple[httpx.Headers, str, dict | None]:
    """(headers, text, usage) of a streamed chat reply."""
    body = {"model": "router", "messages": question(i), "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    text, usage = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    text += choice["delta"].get("content") or ""
        return r.headers, text, usage


# --- spend ------------------------------------------------------------------------------------------------
def test_stats_and_prometheus_agree_with_the_upstream_usage(checkpoint, encoder, upstreams):
    seen = {t: {"prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0, "requests": 0} for t in TARGETS}
    routed_usd = always_best_usd = 0.0

    def count(target, usage, routed):
        nonlocal routed_usd, always_best_usd
        seen[target]["requests"] += 1
        for kind in ("prompt_tokens", "completion_tokens"):
            seen[target][kind] += usage[kind]
        seen[target]["usd"] += usage_cost(target, usage)
        if routed:
            routed_usd += usage_cost(target, usage)
            always_best_usd += usage_cost("big", usage)  # the priciest target is the strongest: the best

    with serving(checkpoint, encoder, upstreams) as (client, _):
        for i in range(12):
            r = chat(client, i, router={"models": [TARGETS[i % 3]]} if i % 4 else None)
            assert r.status_code == 200, r.text
            count(r.headers["x-router-target"], r.json()["usage"], routed=True)
        for i in range(12, 15):
            headers, _, usage = streamed(client, i)
            count(headers["x-router-target"], usage, routed=True)
        r = client.post("/v1/chat/completions", json={"model": "mid", "messages": question(99)})  # pinned
        count("mid", r.json()["usage"], routed=False)
        streamed(client, 20, include_usage=False)  # no usage: counted as missing, not as spend
        stats = client.get("/v1/stats").json()
        prometheus = client.get("/metrics").text

    assert stats["best_target"] == "big"
    for t in TARGETS:
        got = stats["targets"][t]
        assert got["prompt_tokens"] == seen[t]["prompt_tokens"] > 0 or seen[t]["requests"] == 0
        assert got["completion_tokens"] == seen[t]["completion_tokens"]
        assert got["usd"] == pytest.approx(seen[t]["usd"], rel=1e-9)
        for kind in ("prompt", "completion"):
            assert metric(prometheus, "prefill_router_upstream_tokens_total", target=t, kind=kind) == \
                seen[t][f"{kind}_tokens"]
        assert metric(prometheus, "prefill_router_spend_usd_total", target=t) == pytest.approx(seen[t]["usd"])
    assert sum(s["requests"] for s in seen.values()) == 16 and stats["requests"] == 17
    assert stats["total"]["usage_missing"] == 1
    assert sum(t["share"] for t in stats["targets"].values()) == pytest.approx(1.0)
    assert stats["total"]["usd"] == pytest.approx(sum(s["usd"] for s in seen.values()))
    assert stats["routed"]["usd"] == pytest.approx(routed_usd)
    assert stats["routed"]["always_best_usd"] == pytest.approx(always_best_usd)
    assert metric(prometheus, "prefill_router_always_best_usd_total") == pytest.approx(always_best_usd)
    assert stats["routed"]["savings_usd"] == pytest.approx(always_best_usd - routed_usd)
    assert stats["routed"]["savings_usd"] > 0  # two thirds of the requests were held to cheaper targets


# --- feedback ---------------------------------------------------------------------------------------------
def test_feedback_is_recorded_with_the_features_the_router_read(checkpoint, encoder, upstreams, tmp_path):
    folder = tmp_path / "feedback"
    with serving(checkpoint, encoder, upstreams, feedback={"dir": str(folder)}) as (client, _):
        r1, r2, r3 = chat(client, 1), chat(client, 2), chat(client, 3, router={"models": ["mid"]})
        h, _, _ = streamed(client, 4)
        ok = client.post("/v1/feedback", json={"id": r1.headers["x-router-request-id"], "score": 0.25})
        by_openai_id = client.post("/v1/feedback", json={"id": r2.json()["id"], "score": 1, "target": "small"})
        on_stream = client.post("/v1/feedback", json={"id": h["x-router-request-id"], "score": 0})
        again = client.post("/v1/feedback", json={"id": r1.headers["x-router-request-id"], "score": 1})
        unknown = client.post("/v1/feedback", json={"id": "rr-nope", "score": 1})
        bad_target = client.post("/v1/feedback", json={"id": r3.headers["x-router-request-id"], "score": 1,
                                                       "target": "gpt-9"})
        bad_score = client.post("/v1/feedback", json={"id": r3.headers["x-router-request-id"], "score": 1.5})
        no_id = client.post("/v1/feedback", json={"score": 1})
        not_json = client.post("/v1/feedback", content=b'{"id": ', headers={"content-type": "application/json"})
        stats = client.get("/v1/stats").json()
        decisions = client.get("/v1/decisions").json()["data"]

    assert ok.status_code == 200, ok.text
    assert ok.json()["target"] == r1.headers["x-router-target"] and ok.json()["score"] == 0.25
    assert by_openai_id.status_code == 200 and by_openai_id.json()["target"] == "small"
    assert on_stream.status_code == 200
    for response, status, code, words in [(again, 409, "duplicate_feedback", "already"),
                                          (unknown, 404, "unknown_request_id", "rr-nope"),
                                          (bad_target, 400, "unknown_target", "gpt-9"),
                                          (bad_score, 400, "invalid_body", "score"),
                                          (no_id, 400, "invalid_body", "id"),
                                          (not_json, 400, "invalid_json", "not valid JSON")]:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and words in error["message"]
    assert stats["feedback"]["recorded"] == 3
    assert {d["id"]: d["feedback"] for d in decisions}[r1.headers["x-router-request-id"]] == \
        {"score": 0.25, "target": r1.headers["x-router-target"]}

    rows = read_feedback(folder)
    assert rows.ids == [r1.headers["x-router-request-id"], r2.headers["x-router-request-id"],
                        h["x-router-request-id"]]
    assert rows.target[1] == "small" and list(rows.score) == [0.25, 1.0, 0.0]
    router = Router.load(checkpoint, encoder=encoder)
    X, _, _, _ = router.encode([question(1), question(2), question(4)])
    assert np.allclose(rows.X, X, atol=1e-5)  # exactly what the router read: retraining needs no encoder


def _stream_id(client, i) -> tuple[str, str]:
    """(x-router-request-id, the OpenAI id in the stream's events) of a streamed reply, read to its end."""
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "router", "messages": question(i), "stream": True}) as r:
        ids = [json.loads(line[6:]).get("id") for line in r.iter_lines()
               if line.startswith("data: ") and line != "data: [DONE]"]
        return r.headers["x-router-request-id"], next(x for x in ids if x)


def _post_feedback(client, body, tries: int = 40) -> httpx.Response:
    """Feedback right after a stream: its OpenAI id is registered when the gateway sees the stream end, which
    may come a moment after the client read the last byte."""
    for _ in range(tries):
        r = client.post("/v1/feedback", json=body)
        if r.status_code != 404:
            return r
        time.sleep(0.05)
    return r


def test_a_streamed_reply_takes_feedback_by_its_openai_id_across_a_restart(checkpoint, encoder, upstreams,
                                                                           tmp_path):
    feedback = {"dir": str(tmp_path / "fb")}
    with serving(checkpoint, encoder, upstreams, feedback=feedback) as (client, _):
        first_request, first_openai = _stream_id(client, 1)
        second_request, second_openai = _stream_id(client, 2)
        ok = _post_feedback(client, {"id": first_openai, "score": 1})
        assert ok.status_code == 200, ok.text
        assert ok.json()["id"] == first_request
        assert _post_feedback(client, {"id": first_request, "score": 0}).status_code == 409  # one request
    with serving(checkpoint, encoder, upstreams, feedback=feedback) as (client, _):
        again = client.post("/v1/feedback", json={"id": second_openai, "score": 0.5})
    assert again.status_code == 200, again.text
    assert read_feedback(tmp_path / "fb").ids == [first_request, second_request]


def test_feedback_on_an_answer_from_an_unscored_fallback_says_to_name_a_target(checkpoint, encoder, tmp_path):
    from gateway_helpers import running_upstreams

    from prefill_router.serve.fake_upstream import Fail

    with running_upstreams([*TARGETS, "spare"]) as ups:
        targets = upstream_targets({n: ups[n] for n in TARGETS})
        targets.append({**targets[0], "name": "spare", "base_url": ups["spare"].base_url, "model": "spare"})
        for name in TARGETS:
            ups[name].default = Fail(503)
        with serving(checkpoint, encoder, {}, targets=targets, fallback_order=["spare", *TARGETS],
                     feedback={"dir": str(tmp_path / "fb")}) as (client, _):
            r = chat(client, 1)
            assert r.status_code == 200 and r.headers["x-router-target"] == "spare"
            unnamed = client.post("/v1/feedback", json={"id": r.headers["x-router-request-id"], "score": 1})
            named = client.post("/v1/feedback", json={"id": r.headers["x-router-request-id"], "score": 0,
                                                      "target": "big"})
    assert unnamed.status_code == 400 and unnamed.json()["error"]["code"] == "unknown_target"
    assert "answered by 'spare', a fallback target the router does not score" in unnamed.json()["error"]["message"]
    assert named.status_code == 200 and named.json()["target"] == "big"


def test_feedback_journal_resumes_after_a_restart(checkpoint, encoder, upstreams, tmp_path):
    feedback = {"dir": str(tmp_path / "fb")}
    with serving(checkpoint, encoder, upstreams, feedback=feedback) as (client, _):
        ids = [chat(client, i).headers["x-router-request-id"] for i in range(3)]
        assert client.post("/v1/feedback", json={"id": ids[0], "score": 1}).status_code == 200
    with serving(checkpoint, encoder, upstreams, feedback=feedback) as (client, _):
        assert client.post("/v1/feedback", json={"id": ids[0], "score": 0}).status_code == 409
        assert client.post("/v1/feedback", json={"id": ids[1], "score": 0}).status_code == 200
    assert read_feedback(tmp_path / "fb").ids == ids[:2]


def test_feedback_off_says_how_to_turn_it_on(checkpoint, encoder, upstreams):
    with serving(checkpoint, encoder, upstreams) as (client, _):
        r = client.post("/v1/feedback", json={"id": "x", "score": 1})
    assert r.status_code == 404 and "feedback.dir" in r.json()["error"]["message"]


def _record(i: int, size: int = 200) -> dict:
    return {"id": f"rr-{i}", "aliases": [], "targets": ["a", "b"], "chosen": "a", "answered_by": "a",
            "shape": [1], "x": "A" * size}


def test_journal_keeps_routed_features_within_its_size_and_age(tmp_path):
    journal = FeedbackJournal(tmp_path, max_bytes=2000, segment_bytes=500).start()
    for i in range(40):  # ~250 bytes a line: two lines a segment, far more than 2000 bytes in all
        assert journal.record_routed(_record(i))
    journal.flush()
    total = sum(p.stat().st_size for p in tmp_path.glob("routed-*.jsonl"))
    assert total <= 2000 + 500
    with pytest.raises(UnknownRequestId):
        journal.feedback("rr-0", 1.0, None).result(5)  # its segment was deleted
    assert journal.feedback("rr-39", 1.0, None).result(5)["id"] == "rr-39"
    journal.close()

    aged = FeedbackJournal(tmp_path / "aged", retention_s=60, segment_bytes=10).start()
    aged.record_routed(_record(1))
    aged.flush()
    old = time.time() - 3600
    for path in (tmp_path / "aged").glob("routed-*.jsonl"):
        os.utime(path, (old, old))
    aged.record_routed(_record(2))  # opens a new segment, which prunes the expired one
    aged.flush()
    with pytest.raises(UnknownRequestId):
        aged.feedback("rr-1", 1.0, None).result(5)
    aged.close()


def test_recording_never_waits_for_the_disk(tmp_path):
    journal = FeedbackJournal(tmp_path, queue_size=3)  # not started: nothing drains the queue
    start = time.perf_counter()
    accepted = [journal.record_routed(_record(i)) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7 and journal.dropped == 7
    assert time.perf_counter() - start < 1.0


# --- hot reload ---------------------------------------------------------------------------------------------
def test_reload_needs_the_admin_key_and_refuses_a_foreign_encoder(checkpoint, encoder, upstreams, tmp_path,
                                                                  monkeypatch):
    from conftest import make_tiny_encoder

    from prefill_router.features import load_encoder

    other = train_tiny_router(load_encoder(str(make_tiny_encoder(tmp_path / "enc2", seed=1))), tmp_path / "r2")
    with serving(checkpoint, encoder, upstreams) as (client, _):
        off = client.post("/admin/reload")
    monkeypatch.setenv("PR_TEST_ADMIN", ADMIN)
    with serving(checkpoint, encoder, upstreams, admin={"keys_env": "PR_TEST_ADMIN"}) as (client, _):
        before = chat(client, 1).headers["x-router-target"]
        no_key = client.post("/admin/reload")
        wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
        auth = {"Authorization": f"Bearer {ADMIN}"}
        foreign = client.post("/admin/reload", json={"checkpoint": str(other)}, headers=auth)
        missing = client.post("/admin/reload", json={"checkpoint": str(tmp_path / "none")}, headers=auth)
        same = client.post("/admin/reload", headers=auth)
        after = chat(client, 1).headers["x-router-target"]
        with_encoder = client.post("/admin/reload", json={"checkpoint": str(other), "reload_encoder": True},
                                   headers=auth)
        health = client.get("/health").json()
        routed_by_other = client.post("/v1/route", json={"messages": question(1)}).json()
        prometheus = client.get("/metrics").text
    assert off.status_code == 403 and "admin.keys" in off.json()["error"]["message"]
    assert no_key.status_code == 401 and wrong.status_code == 401
    assert foreign.status_code == 409 and foreign.json()["error"]["code"] == "encoder_mismatch"
    assert "reload_encoder" in foreign.json()["error"]["message"]
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "checkpoint_invalid"
    assert same.status_code == 200, same.text
    assert same.json()["checkpoint"] == str(checkpoint) and same.json()["targets"] == TARGETS
    assert before == after
    assert metric(prometheus, "prefill_router_reloads_total", outcome="refused") == 2
    assert metric(prometheus, "prefill_router_reloads_total", outcome="ok") == 2
    # with reload_encoder, the other checkpoint comes with its own encoder and routes with it
    assert with_encoder.status_code == 200, with_encoder.text
    other_router = Router.load(other)
    assert health["encoder"] == other_router.encoder_identity != Router.load(checkpoint).encoder_identity
    expected = other_router.route(question(1))
    assert [routed_by_other["probabilities"][t] for t in TARGETS] == \
        pytest.approx([expected.probabilities[t] for t in TARGETS], abs=1e-5)


@pytest.mark.slow
def test_sighup_reloads_the_checkpoint_of_a_serving_process(checkpoint, encoder, upstreams, tmp_path):
    """`python -m prefill_router serve` in its own process: SIGHUP re-reads router.checkpoint; the new router
    decides from then on."""
    import shutil
    import signal

    from gateway_helpers import gateway_process

    served = tmp_path / "served"
    shutil.copytree(checkpoint, served)
    replacement = Router.load(train_tiny_router(encoder, tmp_path / "replacement", n=24), encoder=encoder)
    config = {"router": {"checkpoint": str(served), "quantize": None}, "targets": upstream_targets(upstreams)}
    with gateway_process(config, tmp_path) as (url, lines, proc), httpx.Client(base_url=url, timeout=30) as client:
        loaded = client.get("/health").json()["loaded_unix"]
        for name in ("router.safetensors", "router.json"):
            shutil.copy(tmp_path / "replacement" / name, served / name)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while client.get("/health").json()["loaded_unix"] == loaded and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/health").json()["loaded_unix"] > loaded, "".join(lines)
        decision = client.post("/v1/route", json={"messages": question(5)}).json()
    expected = replacement.route(question(5))
    assert decision["target"] == expected.target
    assert [decision["probabilities"][t] for t in TARGETS] == \
        pytest.approx([expected.probabilities[t] for t in TARGETS], abs=1e-5)
    assert sum("router reloaded" in line for line in lines) == 1  # logged once, naming the signal
    assert any("SIGHUP: router reloaded" in line for line in lines)


@pytest.mark.slow
def test_train_on_feedback_errors_are_one_line(checkpoint, encoder, upstreams, tmp_path, capsys):
    from conftest import make_tiny_encoder

    from prefill_router.cli import main
    from prefill_router.features import load_encoder

    def error(argv) -> str:
        capsys.readouterr()  # only what this command printed
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    out = str(tmp_path / "new")
    assert "--features and --dataset are required" in error(["train", "--out", out])
    assert "--from" in error(["train", "--feedback", str(tmp_path), "--out", out])
    assert "no feedback journal" in error(["train", "--feedback", str(tmp_path / "none"), "--from",
                                           str(checkpoint), "--out", out])
    journal = tmp_path / "fb"
    with serving(checkpoint, encoder, upstreams, feedback={"dir": str(journal)}) as (client, _):
        for i in range(6):
            r = chat(client, i)
            assert client.post("/v1/feedback", json={"id": r.headers["x-router-request-id"], "score": 1}).is_success
    other = train_tiny_router(load_encoder(str(make_tiny_encoder(tmp_path / "enc2", seed=1))), tmp_path / "r2")
    message = error(["train", "--feedback", str(journal), "--from", str(other), "--out", out])
    assert "encoder" in message and str(journal) in message
    assert not (tmp_path / "new" / "router.json").exists()


def test_a_decision_from_v1_route_takes_feedback_by_its_request_id(checkpoint, encoder, upstreams, tmp_path):
    """A caller that sends the request upstream itself (a LiteLLM plugin) scores the decision by its id."""
    with serving(checkpoint, encoder, upstreams, feedback={"dir": str(tmp_path / "journal")}) as (client, _):
        decision = client.post("/v1/route", json={"messages": question(4)}).json()
        scored = client.post("/v1/feedback", json={"id": decision["request_id"], "score": 1})
    assert decision["request_id"].startswith("rr-")
    assert scored.status_code == 200, scored.text
    assert scored.json()["target"] == decision["target"]
    rows = read_feedback(tmp_path / "journal")
    assert rows.ids == [decision["request_id"]] and rows.chosen == [decision["target"]]
