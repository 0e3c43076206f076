"""Compute-aware layer choice (router/layers.py): `layers="auto"` picks the fewest encoder layers whose
out-of-fold AUC keeps up with the best depth, within a budget when one is set, and the router then runs only
those layers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefill_router.cli import main
from prefill_router.data.dataset import RoutingDataset
from prefill_router.errors import ConfigError
from prefill_router.features import extract_to_store, load_encoder
from prefill_router.router import Router, train_router
from prefill_router.router.layers import depth_candidates

SMALL = {"pca": None, "policy": "argmax", "calibration_folds": 3, "calibration_seeds": 2,
         "trunk": {"seeds": 2, "keep": 1, "max_epochs": 40, "patience": 5, "hidden": [16], "dropout": [0.0],
                   "threads": 1}}


def signal_at(state: int, n: int = 400, states: int = 4, hidden: int = 6, seed: int = 0):
    """Features [n, states, hidden] where only hidden state `state` tells who is right."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, states, hidden)).astype(np.float32)
    Y = np.stack([(X[:, state, k] + 0.3 * rng.normal(size=n) > 0) for k in range(3)], axis=1).astype(float)
    ds = RoutingDataset([str(i) for i in range(n)], ["-"] * n, ["a", "b", "c"], Y, np.ones_like(Y))
    return ds, X


def test_depth_candidates_cut_the_held_states_at_each_depth():
    assert depth_candidates([12, 0, 6]) == [[0], [0, 6], [0, 6, 12]]


def test_auto_takes_the_shallowest_depth_that_holds_the_signal():
    ds, X = signal_at(state=2)
    router = train_router(ds, X, config={**SMALL, "layers": "auto", "layer_tolerance": 0.03})
    choice = router.metrics["layer_choice"]
    aucs = {c["layers_run"]: c["oof_auc"] for c in choice["candidates"]}
    assert aucs[2] > aucs[1] + 0.1  # the signal arrives at state 2
    assert router.hidden_states == [0, 1, 2] and choice["layers_run"] == 2
    assert router.predict_proba_features(X[:, :3]).shape == (ds.n, 3)
    json.dumps(router.metrics)  # the record goes into router.json


def test_a_layer_budget_caps_the_depth_even_at_a_loss():
    ds, X = signal_at(state=3)
    router = train_router(ds, X, config={**SMALL, "layers": "auto", "layer_budget": 1})
    assert max(router.hidden_states) <= 1
    assert [c["layers_run"] for c in router.metrics["layer_choice"]["candidates"]] == [0, 1]
    with pytest.raises(ConfigError, match="layer_budget"):
        train_router(ds, X[:, 2:], hidden_states=[2, 3], config={**SMALL, "layers": "auto", "layer_budget": 1})


@pytest.mark.slow
def test_train_command_layers_auto_writes_a_router_that_runs_only_its_layers(tiny_encoder_dir, tmp_path, capsys):
    """End to end: extract at states 0-4 of a 4-layer encoder, `train --layers auto`, then route: the
    checkpoint records the choice and routing runs no layer past its deepest state."""
    from conftest import make_tiny_encoder

    folder = make_tiny_encoder(tmp_path / "enc", layers=4)
    n = 60
    prompts = [f"what is {i} + {i % 7}? " + "fox " * (i % 5) for i in range(n)]
    rows = [{"prompt_id": f"q{i}", "prompt": p, "a": i % 2, "b": int(i % 3 == 0)} for i, p in enumerate(prompts)]
    data = tmp_path / "labels.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    store = tmp_path / "store"
    extract_to_store(prompts, load_encoder(str(folder)), store, poolings=["mean"], layers=[0, 1, 2, 3, 4],
                     progress=False)
    out = tmp_path / "router"
    assert main(["train", "--dataset", str(data), "--features", str(store), "--layers", "auto", "--layer-budget",
                 "2", "--calibration-folds", "2", "--pca", "8", "--seeds", "2", "--keep", "1", "--policy", "argmax",
                 "--holdout", "0.2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "out-of-fold AUC by layers run" in printed
    router = Router.load(out, encoder=load_encoder(str(folder)))
    assert max(router.hidden_states) <= 2
    assert router.training["config"]["layers"] == router.hidden_states
    ran = [0] * 4
    for i, layer in enumerate(router.encoder.model.get_decoder().layers):
        layer.register_forward_hook(lambda *_, i=i: ran.__setitem__(i, ran[i] + 1))
    router.route(prompts[0])
    deepest = max(router.hidden_states)
    assert all(ran[:deepest]) and not any(ran[deepest:])
