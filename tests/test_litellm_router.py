"""Prefill routing inside an in-process `litellm.Router`: the real LiteLLM package, a tiny router checkpoint and
fake OpenAI-compatible upstreams on 127.0.0.1.

The plugin (`prefill_router.integrations.litellm.PrefillRouting`) narrows the "router" model group to the
deployments of the target the checkpoint chooses; LiteLLM then calls it, retries, falls back and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost map from the internet at import
litellm = pytest.importorskip("litellm", reason="needs LiteLLM: pip install 'prefill-router[litellm]'")

from gateway_helpers import PRICES, TARGETS, question, train_tiny_router  # noqa: E402
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402

from prefill_router.errors import ConfigError  # noqa: E402
from prefill_router.integrations.litellm import PrefillRouting  # noqa: E402
from prefill_router.router import Router  # noqa: E402
from prefill_router.serve.fake_upstream import Fail  # noqa: E402

N = 8  # prompts per lambda


def deployment(name: str, upstream, group: str) -> dict:
    """A LiteLLM deployment of one fake upstream, priced as PRICES (USD per million tokens in / out)."""
    usd_in, usd_out = PRICES[name]
    return {"model_name": group, "litellm_params": {
        "model": f"openai/{name}-upstream", "api_base": upstream.base_url, "api_key": "unused",
        "input_cost_per_token": usd_in / 1e6, "output_cost_per_token": usd_out / 1e6}}


def model_list(upstreams) -> list[dict]:
    """The routed group "router" (one deployment per target) and a group per target (for fallbacks)."""
    return ([deployment(n, up, "router") for n, up in upstreams.items()]
            + [deployment(n, up, n) for n, up in upstreams.items()])


TARGET_MODELS = {t: f"openai/{t}-upstream" for t in TARGETS}


class SpendRows(CustomLogger):
    """The spend-log row LiteLLM's proxy would write for each call (its own `get_logging_payload`)."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload

        self.rows.append(dict(get_logging_payload(kwargs, response_obj, start_time, end_time)))


@pytest.fixture(scope="module")
def checkpoint(tiny_encoder_dir, tmp_path_factory):
    from prefill_router.features import load_encoder

    return train_tiny_router(load_encoder(str(tiny_encoder_dir)), tmp_path_factory.mktemp("router"))


@pytest.fixture(scope="module")
def routing(checkpoint):
    return PrefillRouting(checkpoint=checkpoint, targets=TARGET_MODELS)


CALLBACK_LISTS = ("input_callback", "success_callback", "failure_callback", "_async_success_callback",
                  "_async_failure_callback", "callbacks")


@contextlib.contextmanager
def only_callbacks(*callbacks):
    """LiteLLM's global callbacks are these for the block only. Every list LiteLLM dispatches from is emptied
    first: it copies `litellm.callbacks` into its success and failure lists on first use, so an earlier test's
    loggers would otherwise stay registered."""
    saved = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS}
    litellm.logging_callback_manager._reset_all_callbacks()
    litellm.callbacks = list(callbacks)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(litellm, name, value)


@pytest.fixture
def callbacks(routing):
    """LiteLLM's global callback list holds the plugin (and a spend-row logger) for one test only."""
    spend = SpendRows()
    with only_callbacks(routing, spend):
        yield spend


def run(coroutine):
    return asyncio.run(coroutine)


async def ask(router, i: int, **metadata):
    return await router.acompletion(model="router", messages=question(i),
                                    metadata={"prefill_router": metadata} if metadata else {})


def test_routes_as_the_checkpoint_and_a_higher_lambda_sends_less_to_the_expensive_target(
        checkpoint, routing, upstreams, callbacks):
    reference = Router.load(checkpoint)
    router = litellm.Router(model_list=model_list(upstreams), plugins=[routing], num_retries=0)

    async def both(lam: float, calls: dict) -> list:
        replies = await asyncio.gather(*(ask(router, i, **{"lambda": lam}) for i in range(N)))
        calls[lam] = {n: up.calls() for n, up in upstreams.items()}
        return replies

    async def main() -> tuple[dict, dict]:
        calls: dict = {}
        return {lam: await asyncio.wait_for(both(lam, calls), 120) for lam in (0.0, 50.0)}, calls

    replies_at, calls_at = run(main())
    served = {}
    before = {n: 0 for n in TARGETS}
    for lam in (0.0, 50.0):
        replies = replies_at[lam]
        expected = [reference.route(question(i), policy="utility:0", lam=lam).target for i in range(N)]
        decisions = [r._hidden_params["prefill_router"] for r in replies]
        # every request went where the checkpoint sends it, and LiteLLM called exactly that upstream
        assert [d["target"] for d in decisions] == expected
        assert [r._hidden_params["litellm_model_name"] for r in replies] == [TARGET_MODELS[t] for t in expected]
        served[lam] = {n: calls_at[lam][n] - before[n] for n in TARGETS}
        before = calls_at[lam]
        assert served[lam] == {n: expected.count(n) for n in TARGETS}
        for d in decisions:
            assert set(d["probabilities"]) == set(TARGETS) and d["policy"] == f"utility:{lam:g}"
            assert d["lambda"] == lam and d["request_id"].startswith("pr-")
    assert served[50.0]["big"] < served[0.0]["big"]
    # the spend-log rows record each decision, and the deployment that answered
    rows = [row for row in callbacks.rows if row["model_group"] == "router"]
    assert len(rows) == 2 * N
    import json

    logged = Counter(json.loads(row["metadata"])["spend_logs_metadata"]["prefill_router"]["target"] for row in rows)
    assert logged == Counter({n: served[0.0][n] + served[50.0][n] for n in TARGETS if served[0.0][n] + served[50.0][n]})
    assert all(row["model"].endswith(json.loads(row["metadata"])["spend_logs_metadata"]["prefill_router"]["target"]
                                     + "-upstream") for row in rows)


def test_a_request_allow_list_and_a_bad_override(routing, upstreams, callbacks):
    router = litellm.Router(model_list=model_list(upstreams), plugins=[routing], num_retries=0)

    async def main() -> tuple[list, list]:
        replies = await asyncio.gather(*(ask(router, i, models=["small", "mid"], **{"lambda": 0}) for i in range(6)))
        refused = await asyncio.gather(ask(router, 1, **{"lambda": -1}), ask(router, 1, preset="cheap"),
                                       return_exceptions=True)
        return replies, refused

    replies, refused = run(main())
    assert {r._hidden_params["prefill_router"]["target"] for r in replies} <= {"small", "mid"}
    assert upstreams["big"].calls() == 0
    assert all(isinstance(e, Exception) for e in refused), refused
    assert "metadata.prefill_router" in str(refused[0]) and "lambda" in str(refused[0])
    assert "preset" in str(refused[1])  # presets are a gateway's; this plugin routes with a checkpoint
    assert sum(up.calls() for up in upstreams.values()) == 6  # refused before any upstream was called


def test_a_failing_target_falls_back_and_keeps_the_decision(routing, upstreams, callbacks):
    router = litellm.Router(model_list=model_list(upstreams), plugins=[routing], num_retries=0,
                            fallbacks=[{"router": ["mid"]}])
    upstreams["big"].script(Fail(503))
    reply = run(ask(router, 3, models=["big"]))
    assert reply._hidden_params["prefill_router"]["target"] == "big"  # what the router chose ...
    assert reply._hidden_params["litellm_model_name"] == TARGET_MODELS["mid"]  # ... and who answered
    assert reply._hidden_params["additional_headers"]["x-litellm-model-group"] == "mid"
    assert (upstreams["big"].calls(), upstreams["mid"].calls()) == (1, 1)
    assert reply.choices[0].message.content == "answer from mid"


def test_a_key_budget_buys_more_answers_at_a_higher_lambda(routing, upstreams, callbacks, tmp_path, monkeypatch):
    """LiteLLM's in-process BudgetManager (its virtual keys need the proxy's database): one budget per key, spent
    at each deployment's own prices; the key routed with a higher lambda gets more answers for it."""
    monkeypatch.chdir(tmp_path)  # BudgetManager keeps its ledger in ./user_cost.json
    monkeypatch.setattr(litellm, "model_cost", dict(litellm.model_cost))  # the prices below last for this test
    litellm.register_model({model: {"input_cost_per_token": PRICES[t][0] / 1e6, "litellm_provider": "openai",
                                    "output_cost_per_token": PRICES[t][1] / 1e6, "mode": "chat"}
                            for t, model in TARGET_MODELS.items()})
    router = litellm.Router(model_list=model_list(upstreams), plugins=[routing], num_retries=0)
    budgets = litellm.BudgetManager(project_name="prefill-router-test")
    one_big = PRICES["big"][0] * 200 / 1e6  # about two big answers (a question is ~30 tokens, its answer 3)

    async def spend_until_refused(key: str, lam: float) -> int:
        budgets.create_budget(total_budget=one_big, user=key)
        answered = 0
        for i in range(40):
            if budgets.get_current_cost(user=key) >= budgets.get_total_budget(key):
                break
            reply = await ask(router, i, **{"lambda": lam})
            budgets.update_cost(user=key, completion_obj=reply)
            answered += 1
        return answered

    async def main() -> tuple[int, int]:
        return await spend_until_refused("key-best", 0.0), await spend_until_refused("key-cheap", 50.0)

    best, cheap = run(main())
    assert budgets.get_current_cost(user="key-best") >= budgets.get_total_budget("key-best")  # spent, then refused
    assert cheap > best


def test_config_errors_name_the_problem(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"\['nope'\] are not targets"):
        PrefillRouting(checkpoint=checkpoint, targets={"big": "openai/a", "nope": "openai/b"})
    with pytest.raises(ConfigError, match="exactly one of 'checkpoint'"):
        PrefillRouting(checkpoint=checkpoint, gateway_url="http://127.0.0.1:1", targets=TARGET_MODELS)
    with pytest.raises(ConfigError, match="mapped to both"):
        PrefillRouting(checkpoint=checkpoint, targets={"big": "openai/a", "small": "openai/a"})
    with pytest.raises(ConfigError, match="targets"):
        PrefillRouting(checkpoint=checkpoint, targets={"big": "openai/a"})
    with pytest.raises(ConfigError, match="default_target 'x'"):
        PrefillRouting(checkpoint=checkpoint, targets=TARGET_MODELS, default_target="x")
    config = tmp_path / "config.yaml"
    config.write_text("model_list: []\n")
    with pytest.raises(ConfigError, match="no top-level 'prefill_router:' section"):
        PrefillRouting.from_litellm_config(config)
    beside = checkpoint.parent / "litellm.yaml"  # a relative checkpoint is read from the config's folder
    beside.write_text(f"prefill_router:\n  checkpoint: {checkpoint.name}\n  targets: {TARGET_MODELS}\n  lambda: 2\n")
    loaded = PrefillRouting.from_litellm_config(beside)
    assert loaded.router is not None and loaded.router.targets == TARGETS and loaded.config.lam == 2


@pytest.fixture
def gateway(checkpoint, upstreams, tmp_path):
    """The URL of a running gateway (the same router, served, with feedback on)."""
    from gateway_helpers import gateway_config

    from prefill_router.serve.app import build_gateway
    from prefill_router.serve.config import parse_gateway_config
    from prefill_router.serve.server import BackgroundServer

    config = parse_gateway_config(gateway_config(upstreams, feedback={"dir": str(tmp_path / "feedback")}))
    with BackgroundServer(build_gateway(config, Router.load(checkpoint))) as server:
        yield server.url


def test_routes_through_a_running_gateway(gateway, upstreams, callbacks):
    """`gateway_url`: the decision comes from the gateway's POST /v1/route."""
    import httpx

    remote = PrefillRouting(gateway_url=gateway, targets=TARGET_MODELS)
    router = litellm.Router(model_list=model_list(upstreams), plugins=[remote], num_retries=0)

    async def main() -> dict:
        return {lam: [await ask(router, i, **{"lambda": lam}) for i in range(N)] for lam in (0.0, 50.0)}

    replies = run(main())
    with httpx.Client(base_url=gateway, timeout=60) as client:
        for lam, answered in replies.items():
            for i, reply in enumerate(answered):
                decision = reply._hidden_params["prefill_router"]
                direct = client.post("/v1/route", json={"model": "router", "messages": question(i),
                                                        "router": {"lambda": lam}}).json()
                assert decision["source"] == "gateway" and decision["target"] == direct["target"]
                assert decision["probabilities"] == pytest.approx(direct["probabilities"])
                assert reply._hidden_params["litellm_model_name"] == TARGET_MODELS[decision["target"]]
    big = {lam: sum(r._hidden_params["prefill_router"]["target"] == "big" for r in rs) for lam, rs in replies.items()}
    assert big[50.0] < big[0.0]


def test_a_scorer_sends_feedback_to_the_gateway(gateway, upstreams):
    """The callback posts the scorer's score for each routed answer to the gateway's /v1/feedback."""
    import httpx
    from gateway_helpers import metric

    scored = []

    def scorer(kwargs, reply):
        scored.append(reply.choices[0].message.content)
        return 1.0 if "big" in scored[-1] else 0.0

    remote = PrefillRouting(gateway_url=gateway, targets=TARGET_MODELS, scorer=scorer)
    with only_callbacks(remote):
        router = litellm.Router(model_list=model_list(upstreams), plugins=[remote], num_retries=0)

        async def main() -> list:
            replies = [await ask(router, i) for i in range(4)]
            await asyncio.sleep(2)  # LiteLLM runs success callbacks after the reply
            return replies

        replies = run(main())
    if not replies[0]._hidden_params["prefill_router"].get("request_id"):
        pytest.skip("this gateway's /v1/route returns no request_id, so feedback cannot name the decision")
    assert len(scored) == 4
    with httpx.Client(base_url=gateway, timeout=60) as client:
        assert metric(client.get("/metrics").text, "prefill_router_feedback_total", outcome="recorded") == 4
