"""The fast fallback scorer: the token-embedding mean (features/embedding_mean.py) and the scorer trained on it in
the router's own checkpoint (router/fallback.py), with its own default policy."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from prefill_router.data import CostModel, PriceTable, RoutingDataset
from prefill_router.errors import CheckpointError, ConfigError
from prefill_router.features.embedding_mean import EmbeddingMean
from prefill_router.features.encoder import load_encoder
from prefill_router.router import Router, train_router
from prefill_router.router.checkpoint import CONFIG_FILE
from prefill_router.router.policy import UtilityPolicy

TARGETS = ["big", "small", "mid"]
PRICES = {"big": (10.0, 30.0), "small": (0.1, 0.3), "mid": (1.0, 3.0)}
SMALL = {"pca": 6, "calibration_folds": 2, "calibration_seeds": 1,
         "trunk": {"seeds": 2, "keep": 1, "max_epochs": 5, "patience": 3, "batch_size": 32, "threads": 1}}
WORDS = "the quick brown fox jumps over lazy dog what is capital of france paris rome question answer".split()
CHAT = [{"role": "system", "content": "answer the question"},
        {"role": "user", "content": "what is the capital of france? A. paris B. rome"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "the quick brown fox " * 15}]


def _prompts(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 25)))) for _ in range(n)]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    return load_encoder(str(tiny_encoder_dir))


def test_embedding_mean_is_the_encoders_hidden_state_0_mean(tiny_encoder_dir, encoder):
    prompts = [*_prompts(6), CHAT]
    X, tokens = EmbeddingMean.of(encoder)(prompts)
    expected = encoder.encode(prompts, poolings=["mean"], layers=[0])["mean"][:, 0]
    np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(tokens, encoder.count_tokens(prompts))
    # With a routing window the chat's history is left out and the long turn truncated, in both.
    windowed = load_encoder(str(tiny_encoder_dir), max_route_tokens=24)
    X, tokens = EmbeddingMean.of(windowed)([CHAT])
    assert tokens[0] > 24  # the window's length before truncation, as the main router counts input tokens
    np.testing.assert_allclose(X, windowed.encode([CHAT], poolings=["mean"], layers=[0])["mean"][:, 0],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(X, EmbeddingMean.of(encoder)([CHAT])[0], atol=1e-4)


def test_a_long_prompt_is_read_from_its_head_and_tail_only(encoder):
    """Past LONG_CHARS_PER_TOKEN characters per token only two pieces are tokenized; the tokens kept are still
    exactly the encoder's (so are the features), and the length before truncation is estimated closely."""
    from prefill_router.features.embedding_mean import LONG_CHARS_PER_TOKEN

    rng = np.random.default_rng(7)
    long = [" ".join(rng.choice(WORDS, size=900)) + "?  A. paris\n\nB. rome", [CHAT[0], {"role": "user", "content":
            "0123456789 + " * 150 + "what is the capital of france?"}]]
    featurizer = EmbeddingMean.of(encoder)
    assert featurizer._pieces_exact
    calls = []
    original = featurizer._encode
    featurizer._encode = lambda text, special: calls.append(len(text)) or original(text, special)
    X, tokens = featurizer(long)
    rendered = [len(encoder.tokenizer.apply_chat_template(
        [{"role": "user", "content": p}] if isinstance(p, str) else p, tokenize=False, add_generation_prompt=True))
        for p in long]
    assert min(rendered) > LONG_CHARS_PER_TOKEN * encoder.max_tokens and max(calls) < min(rendered) / 2
    np.testing.assert_allclose(X, encoder.encode(long, poolings=["mean"], layers=[0])["mean"][:, 0],
                               rtol=1e-5, atol=1e-6)
    exact = encoder.count_tokens(long)
    assert np.all(np.abs(tokens - exact) <= 0.1 * exact)


def test_the_word_cache_tokenizes_as_the_rust_tokenizer_does(encoder):
    """ByteLevelWords (pre-tokens split as the tokenizer splits them, each one's ids kept) gives the tokenizer's
    own ids, on text with runs of spaces and newlines, digits, punctuation, accents, emoji and special tokens."""
    from prefill_router.features.embedding_mean import ByteLevelWords

    backend = encoder.tokenizer.backend_tokenizer
    words = ByteLevelWords.of(backend)
    assert words is not None
    texts = ["<|im_start|>user\nwhat is   the capital of france?<|im_end|>\n<|im_start|>assistant\n",
             "  leading spaces, trailing\t\t\n\n", "0123456789 + 12.5e-3 = ( x ) ! ?", "café naïve 日本語 😀 ümlaut",
             "it's they're we've I'm you'll he'd", "a\n \n  b<pad><unk>c", " ".join(WORDS) * 3, ""]
    for text in texts * 2:  # the second time from the cache
        assert words(text) == backend.encode(text, add_special_tokens=False).ids, text


@pytest.fixture(scope="module")
def trained(encoder, tmp_path_factory):
    """A router on the tiny encoder's mean states 0..2; its fallback comes from state 0 of the same features."""
    n = 120
    prompts = _prompts(n)
    X = encoder.encode(prompts, poolings=["mean"])["mean"]
    rng = np.random.default_rng(1)
    longer = np.array([len(p) for p in prompts]) > 60  # a learnable pattern: "small" fails long prompts
    Y = np.stack([rng.random(n) < 0.85, ~longer & (rng.random(n) < 0.9), rng.random(n) < 0.6], 1).astype(float)
    ds = RoutingDataset([str(i) for i in range(n)], prompts, TARGETS, Y, np.tile([3e-3, 3e-5, 3e-4], (n, 1)))
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([40.0, 40.0, 40.0]))
    router = train_router(ds, X, np.arange(n), SMALL, hidden_states=[0, 1, 2], cost_model=cost_model,
                          encoder=encoder)
    return router, router.save(tmp_path_factory.mktemp("ckpt")), prompts


def test_fallback_round_trips_through_the_checkpoint_with_its_own_policy(trained, encoder):
    router, folder, prompts = trained
    assert router.fallback is not None
    P, tokens = router.predict_fallback(prompts[:10])
    assert P.shape == (10, 3) and P.dtype == np.float64 and tokens.dtype == np.float64
    assert np.array_equal(tokens, encoder.count_tokens(prompts[:10]))
    meta = json.loads((folder / CONFIG_FILE).read_text())
    chosen = meta["fallback"]["metrics"]["default_policy"]  # chosen on its own out-of-fold predictions
    assert meta["fallback"]["policy"]["default"] == router.fallback.policy
    assert router.fallback.policy == (f"utility:{chosen['lambda']:g}" if chosen["reached"] else "fixed:0")
    assert len(meta["fallback"]["metrics"]["oof_auc"]) == 3

    loaded = Router.load(folder, encoder=encoder)
    P2, tokens2 = loaded.predict_fallback(prompts[:10])
    assert np.array_equal(P, P2) and np.array_equal(tokens, tokens2)
    assert loaded.fallback.policy == router.fallback.policy
    assert loaded.describe_policy(scorer="fallback") == router.describe_policy(scorer="fallback")
    # The main router's policy is untouched by the scorer argument's default.
    assert loaded.resolve_policy().spec() == router.resolve_policy().spec() == router.default_policy


def test_choose_applies_the_fallback_default_or_an_explicit_policy(trained):
    router, _, prompts = trained
    P, tokens = router.predict_fallback(prompts)
    C = router.estimate_costs(tokens)
    assert np.array_equal(router.choose(P, C, scorer="fallback"),
                          router.resolve_policy(router.fallback.policy).choose(P, C))
    assert np.array_equal(router.choose(P, C, lam=0.7, scorer="fallback"), UtilityPolicy(0.7).choose(P, C))
    assert np.array_equal(router.choose(P, C, policy="argmax", scorer="fallback"), P.argmax(1))
    with pytest.raises(ConfigError, match="scorer"):
        router.choose(P, C, scorer="fast")


def test_the_pipeline_summary_reports_the_fallback_beside_the_main_router(trained):
    from prefill_router.cli.pipeline import _fallback_section

    router, _, _ = trained
    section = _fallback_section(router)
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert router.describe_policy(scorer="fallback") in rows["fallback scorer"]
    assert router.describe_policy() in rows["prefill router"]


def test_predict_fallback_runs_no_model_forward(trained, encoder):
    router, _, prompts = trained
    calls = []
    hooks = [module.register_forward_pre_hook(lambda *args: calls.append(1))
             for module in (encoder.model, encoder.model.get_input_embeddings())]
    try:
        router.predict_fallback(prompts[:5] + [CHAT])
        assert calls == []
        router.encode(prompts[:1])  # the hooks do see a forward
        assert calls
    finally:
        for hook in hooks:
            hook.remove()


def test_predict_fallback_is_safe_beside_the_encoder_thread(trained):
    router, _, prompts = trained
    expected = router.predict_fallback(prompts[:20])[0]
    results, errors = [], []

    def fallback_calls():
        try:
            for i in range(20):
                results.append((i, router.predict_fallback([prompts[i]])[0][0]))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=fallback_calls) for _ in range(3)]
    for worker in workers:
        worker.start()
    for _ in range(3):
        router.encode(prompts[:8])  # the encoder runs meanwhile, tokenizing with its own tokenizer
    for worker in workers:
        worker.join()
    assert not errors and len(results) == 60
    for i, row in results:
        np.testing.assert_allclose(row, expected[i], rtol=1e-12)  # one row or twenty: BLAS rounding only


def test_checkpoint_without_a_fallback_still_loads(trained, tmp_path, encoder):
    _, folder, prompts = trained
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((folder / CONFIG_FILE).read_text())
    del meta["fallback"]  # as written before the fallback scorer existed
    (old / CONFIG_FILE).write_text(json.dumps(meta))
    (old / "router.safetensors").write_bytes((folder / "router.safetensors").read_bytes())
    loaded = Router.load(old, encoder=encoder)
    assert loaded.fallback is None
    assert loaded.route(prompts[0]).target in TARGETS
    with pytest.raises(CheckpointError, match="no fallback scorer"):
        loaded.predict_fallback(prompts[:1])
    with pytest.raises(ConfigError, match="no fallback scorer"):
        loaded.resolve_policy(scorer="fallback")


def test_no_fallback_without_state_0_or_when_turned_off(encoder):
    n = 40
    prompts = _prompts(n, seed=3)
    X = encoder.encode(prompts, poolings=["mean"], layers=[1, 2])["mean"]
    Y = (np.random.default_rng(0).random((n, 3)) < 0.5).astype(float)
    ds = RoutingDataset([str(i) for i in range(n)], prompts, TARGETS, Y, np.tile([3e-3, 3e-5, 3e-4], (n, 1)))
    config = {**SMALL, "policy": "argmax"}
    assert train_router(ds, X, None, config, hidden_states=[1, 2]).fallback is None
    # Given explicitly (as `train` computes it when the store lacks state 0), it is fitted with the policy given.
    means = EmbeddingMean.of(encoder)(prompts)[0]
    router = train_router(ds, X, None, config, hidden_states=[1, 2], fallback_features=means)
    assert router.fallback is not None and router.fallback.policy == "argmax"
    assert train_router(ds, X, None, {**config, "fallback": False}, hidden_states=[1, 2],
                        fallback_features=means).fallback is None


def test_train_command_fits_and_reports_the_fallback_from_the_encoders_embeddings(tiny_encoder_dir, tmp_path,
                                                                                  capsys):
    """The store holds states 1 and 2 only: `train` computes the token-embedding mean from the store's encoder
    (tokenizer and embedding table), fits the fallback, and prints it beside the main router, held-out included."""
    import csv

    from prefill_router.cli import main

    n = 80
    prompts = _prompts(n, seed=5)
    data, prices = tmp_path / "labels.csv", tmp_path / "prices.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "prompt", *TARGETS])
        for i, p in enumerate(prompts):
            w.writerow([f"q{i}", p, int(i % 5 != 0), int(len(p) < 60), i % 2])
    prices.write_text("target,usd_per_m_input,usd_per_m_output\n" +
                      "".join(f"{t},{a},{b}\n" for t, (a, b) in PRICES.items()))
    store, out = tmp_path / "store", tmp_path / "ckpt"
    assert main(["extract", "--dataset", str(data), "--encoder", str(tiny_encoder_dir), "--poolings", "mean",
                 "--layers", "1,2", "--dtype", "float32", "--no-progress", "--out", str(store)]) == 0
    assert main(["train", "--dataset", str(data), "--prices", str(prices), "--features", str(store), "--pca", "6",
                 "--seeds", "2", "--keep", "1", "--calibration-folds", "2", "--holdout", "0.25",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fallback scorer (token-embedding mean, no encoder layer run): default policy" in printed
    router = Router.load(out, encoder=load_encoder(str(tiny_encoder_dir)))
    held = router.metrics["holdout"]["fallback"]
    assert 0 <= held["accuracy_default_policy"] <= 1 and held["cost_per_1k_default_policy"] > 0
    assert router.predict_fallback(prompts[:2])[0].shape == (2, 3)
    assert main(["train", "--dataset", str(data), "--prices", str(prices), "--features", str(store), "--pca", "6",
                 "--seeds", "2", "--keep", "1", "--calibration-folds", "2", "--no-fallback",
                 "--out", str(tmp_path / "plain")]) == 0
    assert Router.load(tmp_path / "plain").fallback is None
