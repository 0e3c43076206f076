"""The whole feedback loop on real sockets: serve, route 200 requests, post feedback on each, retrain from the
journal with the CLI, reload under load with no failed request, and check the decisions moved the way the
feedback says. A tiny random encoder and a router trained here; fake upstreams on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from gateway_helpers import (
    TARGETS,
    metric,
    question,
    running_upstreams,
    train_tiny_router,
    upstream_targets,
    usage_cost,
)

from prefill_router.cli import main
from prefill_router.router import Router
from prefill_router.serve.app import create_app
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.server import BackgroundServer

ADMIN = {"Authorization": "Bearer e2e-admin"}


def fresh(i: int) -> list[dict]:
    return question(1000 + i)


@pytest.mark.slow
def test_feedback_retrain_and_reload_under_load(tiny_encoder_dir, tmp_path):
    from prefill_router.features import load_encoder

    encoder = load_encoder(str(tiny_encoder_dir))
    old_ckpt = train_tiny_router(encoder, tmp_path / "router-1")
    old = Router.load(old_ckpt, encoder=encoder)
    # The world changed after training: the target the old router picks least on new prompts now answers
    # everything right, the others nothing. The feedback says so; the decisions must follow.
    before = [old.route(fresh(i)).target for i in range(40)]
    winner = min(TARGETS, key=before.count)
    truth = {t: float(t == winner) for t in TARGETS}
    journal, new_ckpt = tmp_path / "feedback", tmp_path / "router-2"
    with running_upstreams(TARGETS) as ups:
        config = parse_gateway_config({
            "router": {"checkpoint": str(old_ckpt), "quantize": None}, "targets": upstream_targets(ups),
            "batching": {"max_batch_size": 4, "max_wait_ms": 1}, "feedback": {"dir": str(journal)},
            "admin": {"keys": ["e2e-admin"]}})
        app = create_app(config, RouterScorer(old))
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            # 1. 200 routed requests; the allow-list spreads them over the targets, so feedback reaches each
            usage_by_target = {t: [] for t in TARGETS}
            replies = []
            for i in range(200):
                allowed = [None, ["small"], ["mid"], ["big"]][i % 4]
                r = client.post("/v1/chat/completions", json={"model": "router", "messages": question(i),
                                                              **({"router": {"models": allowed}} if allowed else {})})
                assert r.status_code == 200, r.text
                replies.append(r)
                usage_by_target[r.headers["x-router-target"]].append(r.json()["usage"])
            # 2. feedback on each: what the (changed) world says of the target that answered
            for r in replies:
                f = client.post("/v1/feedback", json={"id": r.headers["x-router-request-id"],
                                                      "score": truth[r.headers["x-router-target"]]})
                assert f.status_code == 200, f.text
            assert [client.post("/v1/route", json={"messages": fresh(i)}).json()["target"]
                    for i in range(40)] == before

            # /v1/stats and Prometheus agree with the usage the upstreams reported
            stats, prometheus = client.get("/v1/stats").json(), client.get("/metrics").text
            for t in TARGETS:
                tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage_by_target[t])
                usd = sum(usage_cost(t, u) for u in usage_by_target[t])
                assert stats["targets"][t]["prompt_tokens"] + stats["targets"][t]["completion_tokens"] == tokens
                assert metric(prometheus, "prefill_router_upstream_tokens_total", target=t) == tokens
                assert stats["targets"][t]["usd"] == pytest.approx(usd)
                assert metric(prometheus, "prefill_router_spend_usd_total", target=t) == pytest.approx(usd)
            assert stats["feedback"]["recorded"] == 200

            # 3. retrain from the journal (features stored by the gateway: no encoder involved)
            assert main(["train", "--feedback", str(journal), "--from", str(old_ckpt), "--out", str(new_ckpt),
                         "--refit", "heads"]) == 0
            report = json.loads((new_ckpt / "feedback_report.json").read_text())
            assert report["accepted"] and report["new"]["log_loss"] < report["old"]["log_loss"]
            assert report["held_out_rows"] == 40 and report["train_rows"] == 160
            new = Router.load(new_ckpt, encoder=encoder)

            # 4. reload under load: every request answered, each routed wholly by the old or the new router
            outcomes, stop = [], threading.Event()

            def load(worker: int) -> None:
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    j = 0
                    while not stop.is_set():
                        i = worker * 10_000 + j
                        started = time.monotonic()
                        r = c.post("/v1/chat/completions", json={"model": "router", "messages": fresh(i)})
                        outcomes.append((i, started, r.status_code, r.headers.get("x-router-chosen"),
                                         r.headers.get("x-router-probabilities")))
                        j += 1

            workers = [threading.Thread(target=load, args=(w,)) for w in range(3)]
            for w in workers:
                w.start()
            time.sleep(1.0)
            reload = client.post("/admin/reload", json={"checkpoint": str(new_ckpt)}, headers=ADMIN)
            reloaded_at = time.monotonic()
            time.sleep(1.0)
            stop.set()
            for w in workers:
                w.join()
            after = [client.post("/v1/route", json={"messages": fresh(i)}).json()["target"] for i in range(40)]

    assert reload.status_code == 200, reload.text
    failed = [o for o in outcomes if o[2] != 200]
    assert not failed, failed[:3]
    started_after = [o for o in outcomes if o[1] > reloaded_at]
    assert len(outcomes) - len(started_after) > 0 and len(started_after) > 0
    print(f"reload under load: {len(outcomes)} requests, {len(started_after)} started after the reload answered, "
          f"{len(failed)} failed")
    prompts = [fresh(o[0]) for o in outcomes]
    P_old = old.predict_batch(prompts)[0]
    P_new = new.predict_batch(prompts)[0]
    for (_, started, _, chosen, header), p_old, p_new in zip(outcomes, P_old, P_new):
        served = np.array([json.loads(header)[t] for t in TARGETS])
        by_new = np.allclose(served, p_new, atol=1e-4)
        assert by_new or np.allclose(served, p_old, atol=1e-4)  # never a mix of the two routers
        assert chosen == TARGETS[int(np.argmax(p_new if by_new else p_old))]
        if started > reloaded_at:
            assert by_new  # nothing is routed by the old router once the reload has answered

    # 5. the decisions moved where the feedback points
    assert before.count(winner) <= 13 and after.count(winner) >= 36
    assert np.mean(P_new[:, TARGETS.index(winner)]) > np.mean(P_old[:, TARGETS.index(winner)]) + 0.3
