"""Router checkpoints (safetensors + JSON) and routing end to end with the tiny random encoder."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from prefill_router.data import CostModel, PriceTable, RoutingDataset
from prefill_router.errors import CheckpointError, ConfigError
from prefill_router.router import RouteDecision, Router, train_router
from prefill_router.router.checkpoint import CONFIG_FILE, TENSORS_FILE

TARGETS = ["big", "small", "mid"]
PRICES = {"big": (10.0, 30.0), "small": (0.1, 0.3), "mid": (1.0, 3.0)}
SMALL = {"pca": 6, "calibration_folds": 2, "calibration_seeds": 1,
         "trunk": {"seeds": 3, "keep": 2, "max_epochs": 8, "patience": 4, "batch_size": 32, "threads": 1}}


def _dataset(n: int, prompts=None, seed: int = 0):
    rng = np.random.default_rng(seed)
    Y = np.stack([rng.random(n) < 0.8, rng.random(n) < 0.4, rng.random(n) < 0.6], axis=1).astype(float)
    Y[rng.random((n, 3)) < 0.1] = np.nan
    C = np.tile([3e-3, 3e-5, 3e-4], (n, 1))
    prompts = prompts or [f"prompt {i}" for i in range(n)]
    return RoutingDataset([str(i) for i in range(n)], prompts, TARGETS, Y, C)


@pytest.fixture(scope="module")
def array_router(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 3, 8)).astype(np.float32)
    ds = _dataset(160)
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([40.0, 40.0, 40.0]))
    router = train_router(ds, X, np.arange(120), SMALL, hidden_states=[0, 6, 12], cost_model=cost_model)
    folder = router.save(tmp_path_factory.mktemp("ckpt"))
    return router, folder, X


def test_save_load_predict_is_bit_identical(array_router):
    router, folder, X = array_router
    loaded = Router.load(folder)
    assert loaded.targets == TARGETS and loaded.hidden_states == [0, 6, 12] and loaded.pooling == "mean"
    P = router.predict_proba_features(X[120:])
    assert np.array_equal(P, loaded.predict_proba_features(X[120:]))
    C = np.tile([3e-3, 3e-5, 3e-4], (40, 1))
    for policy in (None, "argmax", "utility:0.5", "tolerance:0.1"):
        assert np.array_equal(router.choose(P, C, policy=policy), loaded.choose(P, C, policy=policy))
    # saving the loaded router again gives the same tensors
    again = loaded.save(folder.parent / "again")
    assert (again / TENSORS_FILE).read_bytes() == (folder / TENSORS_FILE).read_bytes()


def test_checkpoint_json_holds_the_contract(array_router):
    _, folder, _ = array_router
    meta = json.loads((folder / CONFIG_FILE).read_text())
    for key in ("format", "targets", "encoder", "features", "transform", "trunk", "cost_model", "policy",
                "metrics", "tensors_sha256"):
        assert key in meta
    chosen = meta["metrics"]["default_policy"]  # how "auto" chose the default, on out-of-fold predictions
    assert len(chosen["oof_auc"]) == 3 and chosen["best_single"] == 0  # "big" is the most accurate target
    assert meta["policy"]["default"] == (f"utility:{chosen['lambda']:g}" if chosen["reached"] else "fixed:0")
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in folder.iterdir())


def test_checkpoint_files_follow_the_umask(array_router, tmp_path):
    # A gateway that runs as another user (group) must be able to read what `train` wrote.
    router, _, _ = array_router
    old = os.umask(0o027)
    try:
        folder = router.save(tmp_path / "shared")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {CONFIG_FILE: 0o640, TENSORS_FILE: 0o640}


def test_truncated_tensors_are_refused_naming_the_file(array_router, tmp_path):
    _, folder, _ = array_router
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_FILE).write_bytes((folder / CONFIG_FILE).read_bytes())
    (bad / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=TENSORS_FILE):
        Router.load(bad)
    # without the recorded hash the tensors cannot be checked: refused, naming the missing field
    meta = json.loads((folder / CONFIG_FILE).read_text())
    del meta["tensors_sha256"]
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    (bad / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="tensors_sha256"):
        Router.load(bad)


def tampered(folder, out, change):
    """A copy of the checkpoint in `folder` with each float tensor replaced by `change(name, array)`, and the
    tensors' SHA-256 in router.json updated to match (only the content check can refuse it)."""
    from safetensors.numpy import load_file, save_file

    from prefill_router.utils import file_sha256

    out.mkdir()
    arrays = {name: change(name, a) if np.issubdtype(a.dtype, np.floating) else a
              for name, a in load_file(str(folder / TENSORS_FILE)).items()}
    save_file(arrays, str(out / TENSORS_FILE))
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["tensors_sha256"] = file_sha256(out / TENSORS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    return out


def test_non_finite_tensors_are_refused_even_with_a_matching_hash(array_router, tmp_path):
    _, folder, _ = array_router
    bad = tampered(folder, tmp_path / "nan", lambda name, a: np.full_like(a, np.nan))
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        Router.load(bad)


def test_training_without_prices_warns_and_defaults_to_argmax():
    rng = np.random.default_rng(1)
    ds = _dataset(80)
    ds = RoutingDataset(ds.prompt_ids, ds.prompts, ds.targets, ds.Y, np.zeros_like(ds.Y))
    with pytest.warns(UserWarning, match="without prices"):
        router = train_router(ds, rng.normal(size=(80, 1, 8)).astype(np.float32), None, SMALL)
    assert router.default_policy == "argmax"


def test_bad_json_and_missing_files_are_refused(array_router, tmp_path):
    _, folder, _ = array_router
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes())
    (bad / CONFIG_FILE).write_text('{"format": "prefill-router-checkpoint/1", "targets": [')
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        Router.load(bad)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    del meta["trunk"]
    (bad / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trunk"):
        Router.load(bad)
    with pytest.raises(CheckpointError, match="file not found"):
        Router.load(tmp_path / "nowhere")


def test_policy_errors_are_clear(array_router):
    router, _, _ = array_router
    with pytest.raises(ConfigError, match="unknown policy"):
        router.resolve_policy("fastest")
    with pytest.raises(ConfigError, match="lam"):
        router.resolve_policy("tolerance:0.1", lam=0.3)


def test_train_router_refuses_mismatched_inputs():
    ds = _dataset(20)
    with pytest.raises(ConfigError, match="rows"):
        train_router(ds, np.zeros((19, 2, 4), np.float32), config=SMALL)
    with pytest.raises(ConfigError, match=r"layers.*\[7\]"):
        train_router(ds, np.zeros((20, 2, 4), np.float32), config={**SMALL, "layers": [7]})
    with pytest.raises(ConfigError, match="pca"):
        train_router(ds, np.zeros((20, 2, 4), np.float32), config={**SMALL, "pca": 0})


# ---- end to end with the tiny encoder ------------------------------------------------------------------

def _question(i: int):
    return [{"role": "user", "content": f"question {i}: what is {i} + {2 * i}? " + "the quick fox " * (i % 5)}]


@pytest.fixture(scope="module")
def encoder_checkpoint(tiny_encoder_dir, tmp_path_factory):
    from prefill_router.features import load_encoder

    encoder = load_encoder(str(tiny_encoder_dir))
    prompts = [_question(i) for i in range(60)]
    features = encoder.encode(prompts, poolings=("mean",))
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([40.0, 40.0, 40.0]))
    ds = _dataset(60, prompts)
    router = train_router(ds, features, None, {**SMALL, "layers": [1, 2]}, encoder=encoder, cost_model=cost_model)
    return router.save(tmp_path_factory.mktemp("enc-ckpt")), encoder


def test_route_end_to_end_with_the_tiny_encoder(encoder_checkpoint):
    folder, encoder = encoder_checkpoint
    router = Router.load(folder, encoder=encoder)
    calls = []
    original = encoder.encode

    def counting(prompts, **kw):
        calls.append(len(prompts))
        return original(prompts, **kw)

    encoder.encode = counting
    try:
        prompts = [_question(i) for i in range(100, 105)] + ["plain text prompt"]
        decisions = router.route_batch(prompts)
    finally:
        encoder.encode = original
    assert calls == [6]                                       # one encoder forward for the whole batch
    assert len(decisions) == 6 and all(isinstance(d, RouteDecision) for d in decisions)
    tokens = encoder.count_tokens(prompts)
    for d, n_tok in zip(decisions, tokens):
        assert d.target in TARGETS and set(d.probabilities) == set(TARGETS)
        assert all(0 < p < 1 for p in d.probabilities.values())
        # estimated cost = input tokens x input price + 40 median output tokens x output price
        expected = n_tok * 10.0 / 1e6 + 40 * 30.0 / 1e6
        assert d.estimated_cost["big"] == pytest.approx(expected)
        assert d.latency_ms > 0 and d.truncated is False
    single = router.route(prompts[0])
    for t in TARGETS:
        assert single.probabilities[t] == pytest.approx(decisions[0].probabilities[t], abs=1e-5)
    # a large cost weight sends everything to the cheapest target
    assert {d.target for d in router.route_batch(prompts, policy="utility:1000")} == {"small"}
    assert router.route(prompts[0], lam=1000).target == "small"


def test_long_prompt_is_flagged_truncated(encoder_checkpoint):
    folder, encoder = encoder_checkpoint
    router = Router.load(folder, encoder=encoder)
    decision = router.route("fox jumps " * 200)
    assert decision.truncated is True


def test_router_loads_the_encoder_named_in_the_checkpoint(encoder_checkpoint):
    folder, encoder = encoder_checkpoint
    router = Router.load(folder)                              # no encoder passed: loaded from the spec
    prompt = _question(3)
    expected = Router.load(folder, encoder=encoder).route(prompt).probabilities
    got = router.route(prompt).probabilities
    assert got == pytest.approx(expected, abs=1e-6)


def test_mismatched_encoder_is_refused_naming_both(encoder_checkpoint, tmp_path):
    from conftest import make_tiny_encoder

    from prefill_router.features import load_encoder

    folder, encoder = encoder_checkpoint
    other = load_encoder(str(make_tiny_encoder(tmp_path / "other", seed=1)))
    with pytest.raises(CheckpointError, match="encoder mismatch") as info:
        Router.load(folder, encoder=other)
    # both identities in full, the training one first, as JSON with sorted keys
    trained = json.dumps(encoder.identity(), sort_keys=True, default=str)
    given = json.dumps(other.identity(), sort_keys=True, default=str)
    assert trained != given
    assert f"trained on features of encoder {trained} but the encoder given is {given}" in str(info.value)


def test_training_record_takes_notes_and_spec_as_arguments(tmp_path):
    """What `prefill-router train` records about its store goes in through train_router, not by patching."""
    rng = np.random.default_rng(1)
    spec = {"model": "/abs/encoder", "template": "chat"}
    router = train_router(_dataset(40), rng.normal(size=(40, 2, 4)).astype(np.float32), None,
                          {**SMALL, "policy": "argmax"}, hidden_states=[3, 5], encoder_spec=spec,
                          notes={"features_store": "/abs/store", "rows_without_features": 2})
    meta = json.loads((router.save(tmp_path / "r") / CONFIG_FILE).read_text())
    assert meta["encoder"]["spec"] == spec
    assert meta["training"]["features_store"] == "/abs/store" and meta["training"]["rows_without_features"] == 2
    assert meta["training"]["config"]["layers"] == [3, 5]  # "all" resolved to the states the router reads


def test_checkpoint_module_still_exports_the_split_parts():
    from prefill_router.router import checkpoint, persistence, runtime, train

    assert checkpoint.Router is runtime.Router and checkpoint.train_router is train.train_router
    assert checkpoint.CONFIG_FILE == persistence.CONFIG_FILE == "router.json"


@pytest.mark.parametrize("value", [1e30, 0.0])
def test_a_checkpoint_with_saturated_or_constant_outputs_is_refused(array_router, tmp_path, value):
    """Finite weights that pass the NaN check but make P meaningless (all 1e30: saturated; all 0: constant)."""
    _, folder, _ = array_router
    bad = tampered(folder, tmp_path / "absurd",
                   lambda name, a: np.full_like(a, value) if name.startswith("trunk") else a)
    with pytest.raises(CheckpointError, match="saturated|same probabilities"):
        Router.load(bad)
    Router.load(folder)  # the trained one passes the same check


def test_a_deeply_nested_router_json_is_a_named_error(array_router, tmp_path):
    _, folder, _ = array_router
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes())
    (deep / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Router.load(deep)
