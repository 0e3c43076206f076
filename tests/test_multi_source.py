"""A router on several feature sources, as a user builds one: `extract --poolings mean,surprise`, then
`train --add-source surprise --add-source minilm`; the checkpoint round-trips, routes with one encoder call, and
serves through the gateway (real HTTP servers on 127.0.0.1)."""

from __future__ import annotations

import csv
import json

import httpx
import numpy as np
import pytest
from gateway_helpers import PRICES, TARGETS, running_upstreams, upstream_targets

from prefill_router.cli import main
from prefill_router.features import FeatureSet, load_encoder
from prefill_router.features.surprise import SURPRISE, SURPRISE_STATS
from prefill_router.router import Router
from prefill_router.router.transform import SourceTransform

N = 60


def _prompt(i: int) -> str:
    return f"question {i}: what is {i} + {2 * i}? " + "the quick brown fox " * (i % 4)


@pytest.fixture(scope="module")
def built(tiny_encoder_dir, tmp_path_factory):
    """(data file, store, checkpoint) made through the CLI."""
    folder = tmp_path_factory.mktemp("multi")
    data = folder / "labels.csv"
    rng = np.random.default_rng(0)
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "prompt", "big", "small", "mid"])
        for i in range(N):
            w.writerow([f"q{i}", _prompt(i), 1, i % 2, int(rng.integers(0, 2))])
    prices = folder / "prices.csv"
    prices.write_text("target,usd_per_m_input,usd_per_m_output\n" +
                      "".join(f"{t},{a},{b}\n" for t, (a, b) in PRICES.items()))
    store, ckpt = folder / "store", folder / "ckpt"
    assert main(["extract", "--dataset", str(data), "--encoder", str(tiny_encoder_dir), "--poolings",
                 "mean,surprise", "--layers", "1,2", "--dtype", "float32", "--no-progress", "--out", str(store)]) == 0
    assert main(["train", "--dataset", str(data), "--prices", str(prices), "--features", str(store),
                 "--add-source", "surprise", "--add-source", "minilm", "--pca", "6", "--seeds", "2", "--keep", "1",
                 "--calibration-folds", "2", "--out", str(ckpt)]) == 0
    return data, store, ckpt


def test_the_checkpoint_records_each_source_and_round_trips(built, tiny_encoder_dir, tmp_path):
    _, store, ckpt = built
    meta = json.loads((ckpt / "router.json").read_text())
    assert [s["pooling"] for s in meta["features"]["sources"]] == ["mean", SURPRISE, "minilm"]
    assert meta["features"]["sources"][0]["hidden_states"] == [1, 2]
    assert sorted(p.name for p in ckpt.iterdir()) == ["router.json", "router.safetensors"]  # no pickle
    router = Router.load(ckpt)
    assert isinstance(router.transform, SourceTransform)
    assert router.transform.widths == (2 * 32, len(SURPRISE_STATS), 384)
    again = Router.load(router.save(tmp_path / "again"))
    X = np.random.default_rng(1).normal(size=(5, sum(router.transform.widths))).astype(np.float32)
    np.testing.assert_array_equal(again.predict_proba_features(X), router.predict_proba_features(X))


def test_routing_computes_every_source_from_one_encoder_call(built, tiny_encoder_dir):
    _, store, ckpt = built
    encoder = load_encoder(str(tiny_encoder_dir))
    router = Router.load(ckpt, encoder=encoder)
    calls = []
    original = encoder.encode

    def counting(prompts, **kw):
        calls.append(kw)
        return original(prompts, **kw)

    encoder.encode = counting
    try:
        prompts = [_prompt(i) for i in range(5)]
        X, _, _, _ = router.encode(prompts)
    finally:
        encoder.encode = original
    assert len(calls) == 1 and sorted(calls[0]["poolings"]) == ["mean", SURPRISE]
    # the features the router computes are the ones it was trained on: the store's, then the embedding
    fs = FeatureSet.open(store)
    rows = fs.rows_of(prompts)
    np.testing.assert_allclose(X[:, :64], fs.get("mean", rows=rows).reshape(5, -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(X[:, 64:74], fs.get(SURPRISE, rows=rows).reshape(5, -1), rtol=1e-4, atol=1e-4)
    assert np.allclose(np.linalg.norm(X[:, 74:], axis=1), 1, atol=1e-4)  # MiniLM embeddings are unit norm
    assert router.layers_run is None  # the surprise statistics read the final state: every layer runs


def test_the_gateway_serves_a_multi_source_router(built):
    from prefill_router.serve.app import create_app
    from prefill_router.serve.config import parse_gateway_config
    from prefill_router.serve.engine import RouterScorer
    from prefill_router.serve.server import BackgroundServer

    _, _, ckpt = built
    with running_upstreams(TARGETS) as ups:
        config = parse_gateway_config({"router": {"checkpoint": str(ckpt)}, "targets": upstream_targets(ups)})
        app = create_app(config, RouterScorer(Router.load(ckpt), quantize="int8"))
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            decided = client.post("/v1/route", json={"messages": [{"role": "user", "content": _prompt(3)}]})
            reply = client.post("/v1/chat/completions", json={"model": "router", "messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": _prompt(4)}]})
            health = client.get("/health").json()
    assert decided.status_code == 200 and set(decided.json()["probabilities"]) == set(TARGETS)
    assert reply.status_code == 200 and reply.headers["x-router-target"] in TARGETS
    assert health["runtime"]["layers_run"] is None


def test_bad_sources_are_refused_with_one_line(built, capsys, tmp_path):
    data, store, _ = built
    assert main(["train", "--dataset", str(data), "--features", str(store), "--add-source", "bogus",
                 "--out", str(tmp_path / "unused")]) != 0
    assert "bogus" in capsys.readouterr().err
    assert main(["train", "--dataset", str(data), "--features", str(store), "--add-source", "last",
                 "--out", str(tmp_path / "unused")]) != 0
    assert "holds no 'last' pooling" in capsys.readouterr().err


def test_a_second_encoder_is_a_source_that_routing_loads_and_serves(built, tmp_path):
    """Two encoders at once (the steadiest operating point in bench/quality.py): a store of a second encoder
    is added with `--add-source mean=STORE`; the checkpoint records how to load it, and routing runs both."""
    from conftest import make_tiny_encoder

    from prefill_router.serve.app import create_app
    from prefill_router.serve.config import parse_gateway_config
    from prefill_router.serve.engine import RouterScorer
    from prefill_router.serve.server import BackgroundServer

    data, store, _ = built
    second_dir = make_tiny_encoder(tmp_path / "second", hidden=16, layers=3, seed=3)
    second_store, ckpt = tmp_path / "second-store", tmp_path / "ckpt"
    assert main(["extract", "--dataset", str(data), "--encoder", str(second_dir), "--poolings", "mean",
                 "--layers", "2,3", "--dtype", "float32", "--no-progress", "--out", str(second_store)]) == 0
    assert main(["train", "--dataset", str(data), "--features", str(store), "--add-source",
                 f"mean={second_store}", "--pca", "6", "--seeds", "2", "--keep", "1", "--policy", "argmax",
                 "--out", str(ckpt)]) == 0
    source = json.loads((ckpt / "router.json").read_text())["features"]["sources"][1]
    assert source["hidden_states"] == [2, 3] and source["encoder"]["spec"]["model"] == str(second_dir)
    router = Router.load(ckpt)  # both encoders load from the checkpoint's specs at the first call
    prompts = [_prompt(i) for i in range(4)]
    X, _, _, _ = router.encode(prompts)
    fs = FeatureSet.open(second_store)
    np.testing.assert_allclose(X[:, 64:], fs.get("mean", rows=fs.rows_of(prompts)).reshape(4, -1),
                               rtol=1e-4, atol=1e-5)
    expected = router.route(_prompt(9)).probabilities
    with running_upstreams(TARGETS) as ups:
        config = parse_gateway_config({"router": {"checkpoint": str(ckpt), "max_route_tokens": 64},
                                       "targets": upstream_targets(ups)})
        scorer = RouterScorer(router, max_route_tokens=64)
        with BackgroundServer(create_app(config, scorer)) as server, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            decided = client.post("/v1/route", json={"messages": [{"role": "user", "content": _prompt(9)}]})
            long = client.post("/v1/route", json={"messages": [{"role": "user", "content": "fox " * 3000}]})
    assert decided.status_code == 200, decided.text
    assert decided.json()["probabilities"] == pytest.approx(expected, abs=1e-5)  # a short prompt: no window cut
    assert long.status_code == 200 and long.json()["truncated"] is True
    # both encoders read the gateway's 64-token window, not the prompt's thousands of tokens
    served = scorer.router
    assert served.encoder.max_tokens == 64 and served._source_encoder(1, served.sources[1]).max_tokens == 64
    assert router._source_encoder(1, router.sources[1]).max_tokens == 128  # the router given keeps its own
