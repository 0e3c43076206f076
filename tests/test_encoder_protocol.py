"""The PrefillEncoder protocol (features/protocol.py): the local encoder implements it, Router depends on it,
refuses an object that does not, and routes with one tokenization per call."""

from __future__ import annotations

import numpy as np
import pytest

from prefill_router.data import CostModel, PriceTable, RoutingDataset
from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features import load_encoder
from prefill_router.features.protocol import MEMBERS, PrefillEncoder, require_encoder
from prefill_router.router import Router, train_router

TARGETS = ["big", "small"]
SMALL = {"pca": 4, "policy": "argmax",
         "trunk": {"seeds": 2, "keep": 1, "max_epochs": 4, "patience": 2, "batch_size": 16, "threads": 1}}


@pytest.fixture(scope="module")
def trained(tiny_encoder_dir):
    encoder = load_encoder(str(tiny_encoder_dir))
    prompts = [f"what is {i} plus {i % 5}? " + "fox " * (i % 4) for i in range(40)]
    rng = np.random.default_rng(0)
    Y = (rng.random((40, 2)) < 0.5).astype(float)
    ds = RoutingDataset([str(i) for i in range(40)], prompts, TARGETS, Y, np.tile([1e-3, 1e-5], (40, 1)))
    cost_model = CostModel(PriceTable({"big": (10.0, 30.0), "small": (0.1, 0.3)}), TARGETS, np.array([40.0, 40.0]))
    features = encoder.encode(prompts, poolings=("mean",), layers=[1, 2])
    router = train_router(ds, features, None, {**SMALL, "layers": [1, 2]}, hidden_states=[1, 2], encoder=encoder,
                          cost_model=cost_model)
    return router, encoder


def test_the_local_encoder_implements_the_protocol(trained):
    _, encoder = trained
    assert isinstance(encoder, PrefillEncoder) and require_encoder(encoder) is encoder
    assert set(MEMBERS) >= {"identity", "encode", "count_tokens", "last_token_counts", "max_tokens", "spec"}


class _NotAnEncoder:
    def encode(self, prompts, **kw):
        return {}


def test_router_refuses_an_object_that_is_not_an_encoder(trained, tmp_path):
    router, _ = trained
    with pytest.raises(ConfigError) as info:
        router.attach_encoder(_NotAnEncoder())
    message = str(info.value)
    assert message.startswith("encoder: _NotAnEncoder is not an encoder the router can use")
    for member in ("identity", "count_tokens", "last_token_counts", "max_tokens"):
        assert member in message
    assert "encode," not in message  # it has encode
    folder = router.save(tmp_path / "router")
    with pytest.raises(ConfigError, match="encoder: object is not an encoder"):
        Router.load(folder, encoder=object())


def test_routing_tokenizes_each_prompt_once_and_reads_the_call_s_counts(trained):
    router, encoder = trained
    router.attach_encoder(encoder)
    calls = []
    original = encoder.tokenize

    def counting(prompts):
        calls.append(len(prompts))
        return original(prompts)

    encoder.tokenize = counting
    try:
        prompts = ["a short one", "the quick brown fox " * 40]  # the second passes the 128-token context
        decisions = router.route_batch(prompts)
    finally:
        del encoder.tokenize
    assert calls == [2]  # one tokenization for the batch: the counts come from the same call
    counts = encoder.count_tokens(prompts)
    assert counts[1] > encoder.max_tokens >= counts[0]
    assert [d.truncated for d in decisions] == [False, True]
    expected = counts * 10.0 / 1e6 + 40 * 30.0 / 1e6
    np.testing.assert_allclose([d.estimated_cost["big"] for d in decisions], expected)


class _Stale:
    """Implements the protocol but breaks its contract: last_token_counts is not of the latest call."""

    spec, max_tokens, num_hidden_states, hidden_size = None, 128, 3, 32

    def __init__(self, inner):
        self.inner = inner

    def identity(self):
        return self.inner.identity()

    def encode(self, prompts, *, poolings=("mean",), layers=None):
        return self.inner.encode(prompts, poolings=poolings, layers=layers)

    def count_tokens(self, prompts):
        return self.inner.count_tokens(prompts)

    @property
    def last_token_counts(self):
        return np.zeros(0, dtype=np.int64)


def test_a_broken_last_token_counts_is_named(trained):
    router, encoder = trained
    stale = _Stale(encoder)
    router.attach_encoder(stale)
    try:
        with pytest.raises(EncoderError, match="last_token_counts holds 0 counts after encoding 1 prompts"):
            router.route("hello")
    finally:
        router.attach_encoder(encoder)
