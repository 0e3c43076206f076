"""RemoteEncoder against a real encoder server on 127.0.0.1 (the reference app over the tiny encoder)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features import load_encoder

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from prefill_router.features.remote import PrefillEncoder, RemoteEncoder, create_encoder_app  # noqa: E402


class ServerThread:
    """uvicorn on an ephemeral 127.0.0.1 port, in a background thread."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("encoder server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def encoder_server(tiny_encoder_dir):
    local = load_encoder(str(tiny_encoder_dir))
    with ServerThread(create_encoder_app(local, api_key="k")) as server:
        yield server, local


PROMPTS = ["what is the capital of france?", "the quick brown fox " * 8,
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2 ?"}], "option A"]


def test_remote_features_equal_local_ones(encoder_server):
    server, local = encoder_server
    with RemoteEncoder(server.url, api_key="k", max_prompts=3) as remote:  # 4 prompts: two requests
        assert isinstance(remote, PrefillEncoder) and isinstance(local, PrefillEncoder)
        assert remote.identity() == local.identity()
        assert (remote.num_hidden_states, remote.hidden_size, remote.max_tokens) == \
               (local.num_hidden_states, local.hidden_size, local.max_tokens)
        got = remote.encode(PROMPTS, poolings=["last", "mean"], layers=[0, -1])
        want = local.encode(PROMPTS, poolings=["last", "mean"], layers=[0, -1])
        assert set(got) == {"last", "mean"}
        for pooling in want:
            assert got[pooling].dtype == np.float32 and got[pooling].shape == (4, 2, local.hidden_size)
            np.testing.assert_allclose(got[pooling], want[pooling], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(remote.count_tokens(PROMPTS), local.count_tokens(PROMPTS))
        # last_token_counts: the lengths the latest encode measured, with no further request
        remote.encode(PROMPTS, poolings=["mean"], layers=[1])
        np.testing.assert_array_equal(remote.last_token_counts, local.count_tokens(PROMPTS))
        assert remote.spec is None  # loaded by URL; a checkpoint falls back to the identity
        np.testing.assert_array_equal(remote.count_tokens(PROMPTS[:1]), local.count_tokens(PROMPTS[:1]))
        assert remote.encode(PROMPTS[:2], layers="all")["mean"].shape == (2, local.num_hidden_states, 32)


def test_remote_errors_name_the_problem(encoder_server, tmp_path):
    server, _ = encoder_server
    with pytest.raises(EncoderError, match="401"):
        RemoteEncoder(server.url, api_key="wrong")
    with RemoteEncoder(server.url, api_key="k", max_prompts=2) as remote:
        # The bad prompt is row 3 of the caller's list although it is row 1 of the second request.
        with pytest.raises(EncoderError, match="row 3: empty prompt"):
            remote.encode(["a", "b", "c", "   "])
        with pytest.raises(EncoderError, match="not a hidden-state index"):
            remote.encode(["a"], layers=[99])
        with pytest.raises(EncoderError, match="poolings"):
            remote.encode(["a"], poolings=["max"])
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(EncoderError, match="unreachable"):
        RemoteEncoder(dead, timeout=2)
    with pytest.raises(ConfigError, match="url"):
        RemoteEncoder("encoder-host:8100")


def test_a_router_routes_the_same_through_the_remote_encoder(encoder_server, tmp_path):
    """What the gateway would do with an HTTP-hosted encoder: Router.load(..., encoder=RemoteEncoder(url))."""
    from prefill_router.data import RoutingDataset
    from prefill_router.router import Router, train_router

    server, local = encoder_server
    rng = np.random.default_rng(0)
    prompts = [f"question {i}: what is {i} + {2 * i}? " + "the quick fox " * (i % 5) for i in range(40)]
    Y = (rng.random((40, 2)) < [0.8, 0.4]).astype(float)
    costs = np.tile([1e-3, 1e-5], (40, 1))
    ds = RoutingDataset([str(i) for i in range(40)], prompts, ["big", "small"], Y, costs)
    trunk = {"seeds": 2, "keep": 1, "max_epochs": 4, "patience": 2, "batch_size": 16, "threads": 1}
    config = {"pca": 4, "calibration_folds": 2, "calibration_seeds": 1, "trunk": trunk, "layers": [1, 2]}
    features = local.encode(prompts, poolings=("mean",))
    folder = train_router(ds, features, None, config, encoder=local).save(tmp_path / "router")
    asked = ["what is 7 + 14?", "the quick fox " * 3, "fox jumps " * 200]  # the last one is truncated
    with RemoteEncoder(server.url, api_key="k") as remote:
        via_http = Router.load(folder, encoder=remote).route_batch(asked)
    in_process = Router.load(folder, encoder=local).route_batch(asked)
    for a, b in zip(via_http, in_process, strict=True):
        assert a.target == b.target and a.truncated == b.truncated
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert [d.truncated for d in via_http] == [False, False, True]
