"""Prefill routing inside LiteLLM's proxy: `litellm --config config.yaml` started once, as a subprocess on a free
port on 127.0.0.1, in front of fake upstreams, with a tiny router checkpoint named in its config.yaml.

LiteLLM writes its spend log to its database (Postgres through Prisma), and Prisma fetches its engine binaries
from the internet at run time, which tests cannot do. So the proxy here runs without a database, and a logger in
the config computes each row with LiteLLM's own spend-log builder (`get_logging_payload`, what the proxy would
write to the database) and appends it to a file.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
pytest.importorskip("litellm", reason="needs LiteLLM: pip install 'prefill-router[litellm]'")

from gateway_helpers import TARGETS, question, train_tiny_router  # noqa: E402

from prefill_router.router import Router  # noqa: E402
from prefill_router.serve.fake_upstream import Fail  # noqa: E402

START_TIMEOUT_S = 240  # the proxy imports LiteLLM, torch and the checkpoint; a busy 2-core machine is slow
N = 5  # prompts per lambda
SPEND_LOGGER = '''
import json, os
from litellm.integrations.custom_logger import CustomLogger


class SpendRows(CustomLogger):
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload

        row = get_logging_payload(kwargs, response_obj, start_time, end_time)
        with open(os.environ["SPEND_ROWS_FILE"], "a", encoding="utf-8") as out:
            out.write(json.dumps(dict(row), default=str) + "\\n")


rows = SpendRows()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(upstreams, checkpoint: Path) -> dict:
    """A LiteLLM config: the routed group "router" (one deployment per target), a group per target, the plugin
    and its `prefill_router:` section, a fallback from "router" to "mid"."""
    def deployment(name, group):
        return {"model_name": group, "litellm_params": {"model": f"openai/{name}-upstream", "api_key": "unused",
                                                        "api_base": upstreams[name].base_url}}

    return {
        "model_list": [deployment(n, "router") for n in TARGETS] + [deployment(n, n) for n in TARGETS],
        "router_settings": {"plugins": ["prefill_router.integrations.litellm.routing"], "num_retries": 0,
                            "fallbacks": [{"router": ["mid"]}]},
        "litellm_settings": {"callbacks": ["prefill_router.integrations.litellm.routing", "spend_rows.rows"]},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        "prefill_router": {"checkpoint": str(checkpoint), "targets": {t: f"openai/{t}-upstream" for t in TARGETS}},
    }


@pytest.fixture(scope="module")
def checkpoint(tiny_encoder_dir, tmp_path_factory):
    from prefill_router.features import load_encoder

    return train_tiny_router(load_encoder(str(tiny_encoder_dir)), tmp_path_factory.mktemp("router"))


@pytest.fixture(scope="module")
def proxy(_running_upstreams, checkpoint, tmp_path_factory):
    """(base URL, master key, spend-rows file) of a LiteLLM proxy started once for this module."""
    litellm_cli = Path(sys.executable).parent / "litellm"
    if not litellm_cli.exists():
        pytest.skip(f"no litellm command beside {sys.executable}")
    folder = tmp_path_factory.mktemp("litellm-proxy")
    (folder / "config.yaml").write_text(yaml.safe_dump(proxy_config(_running_upstreams, checkpoint)))
    (folder / "spend_rows.py").write_text(SPEND_LOGGER)
    (folder / "home").mkdir()
    key, port, rows = f"sk-{secrets.token_hex(24)}", free_port(), folder / "spend-rows.jsonl"
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "SPEND_ROWS_FILE": str(rows), "HOME": str(folder / "home"),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    log = (folder / "proxy.log").open("wb")
    process = subprocess.Popen([str(litellm_cli), "--config", str(folder / "config.yaml"), "--host", "127.0.0.1",
                                "--port", str(port)], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the LiteLLM proxy exited ({process.returncode}):\n"
                            + (folder / "proxy.log").read_text(errors="replace")[-4000:])
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the LiteLLM proxy did not start in {START_TIMEOUT_S} s:\n"
                            + (folder / "proxy.log").read_text(errors="replace")[-4000:])
            time.sleep(1)
        yield url, key, rows
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def spend_rows(rows: Path, count: int) -> list[dict]:
    """The spend rows written so far, once there are `count` (logging runs after the reply)."""
    deadline = time.monotonic() + 30
    while True:
        found = [json.loads(line) for line in rows.read_text().splitlines()] if rows.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_routes_through_the_proxy_with_streaming_a_fallback_and_the_decision_in_the_spend_log(
        proxy, checkpoint, upstreams):
    url, key, rows = proxy
    reference = Router.load(checkpoint)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        # 1. a higher lambda (per request, in LiteLLM's metadata) sends less to the expensive target
        served, targets = {}, []
        for lam in (0.0, 50.0):
            before = {n: up.calls() for n, up in upstreams.items()}
            for i in range(N):
                r = client.post("/v1/chat/completions", json={"model": "router", "messages": question(i),
                                                              "metadata": {"prefill_router": {"lambda": lam}}})
                assert r.status_code == 200, r.text
                chosen = r.headers["x-prefill-router-target"]
                assert chosen == reference.route(question(i), policy="utility:0", lam=lam).target
                assert r.headers["x-prefill-router-policy"] == f"utility:{lam:g}"
                assert set(json.loads(r.headers["x-prefill-router-probabilities"])) == set(TARGETS)
                assert r.json()["choices"][0]["message"]["content"] == f"answer from {chosen}"
                targets.append((r.json()["id"], chosen))
            served[lam] = {n: up.calls() - before[n] for n, up in upstreams.items()}
            assert sum(served[lam].values()) == N
        assert served[50.0]["big"] < served[0.0]["big"]

        # 2. a stream carries the decision in its headers
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "router", "messages": question(1), "stream": True}) as r:
            assert r.status_code == 200
            chosen = r.headers["x-prefill-router-target"]
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in r.iter_lines() if line.startswith("data: {"))
        assert text == f"answer from {chosen}"

        # 3. the chosen target fails: LiteLLM falls back to "mid", the decision stays
        upstreams["big"].script(Fail(503))
        r = client.post("/v1/chat/completions", json={"model": "router", "messages": question(2),
                                                      "metadata": {"prefill_router": {"models": ["big"]}}})
        assert r.status_code == 200, r.text
        assert r.headers["x-prefill-router-target"] == "big"
        assert r.headers["x-litellm-model-group"] == "mid"
        assert r.json()["choices"][0]["message"]["content"] == "answer from mid"

        # 4. a bad per-request override is refused, naming the field, before any upstream is called
        calls = sum(up.calls() for up in upstreams.values())
        r = client.post("/v1/chat/completions", json={"model": "router", "messages": question(3),
                                                      "metadata": {"prefill_router": {"lambda": "cheap"}}})
        assert r.status_code == 400 and "metadata.prefill_router" in r.text and "lambda" in r.text, r.text
        assert sum(up.calls() for up in upstreams.values()) == calls

    # the spend log records each decision, beside the deployment that answered
    logged = {row["request_id"]: row for row in spend_rows(rows, 2 * N + 2)}
    for reply_id, chosen in targets:
        metadata = json.loads(logged[reply_id]["metadata"])
        decision = metadata["spend_logs_metadata"]["prefill_router"]
        assert decision["target"] == chosen and decision["request_id"].startswith("pr-")
        assert logged[reply_id]["model"] == f"openai/{chosen}-upstream"
    by_target = Counter(json.loads(row["metadata"])["spend_logs_metadata"]["prefill_router"]["target"]
                        for row in logged.values())
    assert by_target["big"] >= served[0.0]["big"] + 1  # the fallback's row records the router's choice, big
