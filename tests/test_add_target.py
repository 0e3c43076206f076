"""`prefill-router train --add-target NAME --labels FILE --from CKPT --out NEW`: a new target's head fitted on the
frozen trunk of a router trained here on the tiny random encoder. The old heads stay as they were, the new target
learns its (synthetic) signal, the checkpoint round-trips and serves, and bad input is refused in one line."""

from __future__ import annotations

import csv
import json

import httpx
import numpy as np
import pytest
from gateway_helpers import PRICES, TARGETS, running_upstreams

from prefill_router.cli import main
from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, PriceTable
from prefill_router.router import Router, train_router
from prefill_router.router.add_target import MIN_LABELS, add_target
from prefill_router.utils import roc_auc

NEW = "new-model"


def prompt(i: int) -> list[dict]:
    """Two kinds of prompt the tiny encoder tells apart: arithmetic (even i) and prose (odd i)."""
    text = (f"what is {i} + {3 * i}? 0123456789 = ( ) * /" if i % 2 == 0
            else "the quick brown fox jumps over the lazy dog " * (1 + i % 3))
    return [{"role": "user", "content": text}]


def new_target_right(i: int) -> float:
    """The new target answers prose and fails arithmetic: the opposite of the old target "small"."""
    return float(i % 2 == 1)


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    from prefill_router.features import load_encoder

    return load_encoder(str(tiny_encoder_dir))


@pytest.fixture(scope="module")
def checkpoint(encoder, tmp_path_factory):
    """A priced argmax router over big (always right), small (right on arithmetic) and mid (random)."""
    n = 80
    prompts = [prompt(i) for i in range(n)]
    rng = np.random.default_rng(0)
    Y = np.stack([np.ones(n), (np.arange(n) % 2 == 0).astype(float), rng.integers(0, 2, n).astype(float)], axis=1)
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([50.0, 50.0, 50.0]))
    data = RoutingDataset([str(i) for i in range(n)], prompts, TARGETS, Y,
                          cost_model.estimate(encoder.count_tokens(prompts)))
    router = train_router(data, encoder.encode(prompts, poolings=("mean",)), config={
        "pca": 8, "policy": "argmax", "calibration_folds": 0,
        "trunk": {"seeds": 2, "keep": 1, "max_epochs": 60, "hidden": [16], "dropout": [0.0], "threads": 1}},
        encoder=encoder, cost_model=cost_model)
    return router.save(tmp_path_factory.mktemp("router"))


def write_labels(path, ids, target=NEW, cost=None, extra_rows=()):
    """Long-layout labels: one row per prompt for `target` (10 % of the scores flipped, seeded), then `extra_rows`
    (prompt index, target, score) for other targets."""
    flip = np.random.default_rng(1).random(len(ids)) < 0.1
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt_id", "prompt", "target", "score"] + (["cost"] if cost is not None else []))
        for i, flipped in zip(ids, flip):
            score = abs(new_target_right(i) - flipped)
            w.writerow([f"p{i}", prompt(i)[0]["content"], target, score] + ([cost] if cost is not None else []))
        for i, other, score in extra_rows:
            w.writerow([f"p{i}", prompt(i)[0]["content"], other, score] + ([cost] if cost is not None else []))
    return path


def add(checkpoint, labels, out, *extra) -> int:
    return main(["train", "--add-target", NEW, "--labels", str(labels), "--from", str(checkpoint),
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def added(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("added")
    labels = write_labels(folder / "labels.csv", range(200, 260), extra_rows=[(200, "small", 1.0)])
    assert add(checkpoint, labels, folder / "router", "--price", "2,6") == 0
    return folder / "router"


def held_out_features(encoder):
    ids = list(range(1000, 1060))
    return ids, encoder.encode([prompt(i) for i in ids], poolings=("mean",))["mean"]


def test_old_heads_unchanged_and_new_target_present(checkpoint, added, encoder):
    old, new = Router.load(checkpoint), Router.load(added)
    assert new.targets == TARGETS + [NEW]
    assert new.default_policy == old.default_policy and new.hidden_states == old.hidden_states
    # every old tensor bit for bit: the trunks, the old output rows, the transform
    old_arrays = {**old.transform.state_arrays(), **old.predictor.state_arrays()}
    new_arrays = {**new.transform.state_arrays(), **new.predictor.state_arrays()}
    assert set(old_arrays) == set(new_arrays)
    for name, array in old_arrays.items():
        kept = new_arrays[name][: len(TARGETS)] if name.split(".")[-2] == "head" else new_arrays[name]
        np.testing.assert_array_equal(kept, array, err_msg=name)
    # so the old targets' P are the same function (a wider matmul may round the last float32 bit differently)
    _, X = held_out_features(encoder)
    np.testing.assert_allclose(new.predict_proba_features(X)[:, :3], old.predict_proba_features(X), rtol=0, atol=1e-6)
    info = new.training["added_targets"][-1]
    assert info["name"] == NEW and info["labels"] == 60 and info["source"].endswith("labels.csv")
    assert new.cost_model.prices[NEW].usd_per_m_input == 2.0 and new.cost_model.prices[NEW].usd_per_m_output == 6.0
    assert new.cost_model.median_output_tokens[-1] == 50.0  # no output lengths given: the old targets' median


def test_the_new_head_learned_its_signal(added, encoder):
    ids, X = held_out_features(encoder)
    P = Router.load(added).predict_proba_features(X)[:, -1]
    truth = [new_target_right(i) for i in ids]
    assert roc_auc(truth, P) > 0.75  # chance is 0.5; the new target is the old "small" turned around


def test_save_load_round_trip(added, tmp_path, encoder):
    router = Router.load(added)
    again = Router.load(router.save(tmp_path / "again"))
    _, X = held_out_features(encoder)
    np.testing.assert_array_equal(again.predict_proba_features(X), router.predict_proba_features(X))
    assert sorted(p.name for p in added.iterdir()) == ["router.json", "router.safetensors"]  # no pickle
    assert json.loads((added / "router.json").read_text())["targets"] == TARGETS + [NEW]


def test_a_second_target_can_be_added_after_the_first(added, tmp_path):
    labels = write_labels(tmp_path / "labels.csv", range(300, 340), target="third")
    assert main(["train", "--add-target", "third", "--labels", str(labels), "--from", str(added),
                 "--out", str(tmp_path / "r"), "--price", "1,1"]) == 0
    router = Router.load(tmp_path / "r")
    assert router.targets == TARGETS + [NEW, "third"]
    assert [a["name"] for a in router.training["added_targets"]] == [NEW, "third"]


def test_the_gateway_serves_the_new_target(added, encoder):
    from prefill_router.serve.app import create_app
    from prefill_router.serve.config import parse_gateway_config
    from prefill_router.serve.engine import RouterScorer
    from prefill_router.serve.server import BackgroundServer

    names = TARGETS + [NEW]
    with running_upstreams(names) as ups:
        prices = {**PRICES, NEW: (2.0, 6.0)}
        targets = [{"name": n, "base_url": up.base_url, "model": f"{n}-upstream", "timeout_s": 5,
                    "usd_per_m_input": prices[n][0], "usd_per_m_output": prices[n][1]} for n, up in ups.items()]
        config = parse_gateway_config({"router": {"checkpoint": str(added), "quantize": None}, "targets": targets})
        app = create_app(config, RouterScorer(Router.load(added, encoder=encoder)))
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            decided = client.post("/v1/route", json={"messages": prompt(7)}).json()
            reply = client.post("/v1/chat/completions", json={"model": "router", "messages": prompt(7),
                                                              "router": {"models": [NEW]}})
        answered = {n: len(up.requests) for n, up in ups.items()}
    assert set(decided["probabilities"]) == set(names)
    assert reply.status_code == 200 and reply.headers["x-router-target"] == NEW
    assert answered == {**{n: 0 for n in TARGETS}, NEW: 1}  # forwarded to the new target's upstream


def test_a_cost_column_prices_the_new_target(checkpoint, encoder, tmp_path):
    ids = range(200, 240)
    labels = write_labels(tmp_path / "labels.csv", ids, cost=0.002)
    assert add(checkpoint, labels, tmp_path / "r") == 0
    price = Router.load(tmp_path / "r").cost_model.prices[NEW]
    tokens = encoder.count_tokens([prompt(i) for i in ids])
    # total cost / total input tokens, per million; nothing per output token
    assert price.usd_per_m_input == pytest.approx(0.002 * len(ids) / np.sum(tokens) * 1e6)
    assert price.usd_per_m_output == 0.0


def test_the_library_call_leaves_the_router_as_it_was(checkpoint, encoder):
    router = Router.load(checkpoint)
    ids = list(range(200, 260))
    X = encoder.encode([prompt(i) for i in ids], poolings=("mean",))["mean"]
    y = np.array([new_target_right(i) for i in ids])
    y[::7] = np.nan  # unlabelled rows are dropped
    new = add_target(router, NEW, X, y, price=PriceTable(PRICES)["mid"], alphas=(0.1, 10.0))  # two: faster
    assert router.targets == TARGETS and router.predictor.n_targets == 3
    assert all(net.head.out_features == 3 for net in router.predictor.members)
    assert new.targets == TARGETS + [NEW] and new.training["added_targets"][0]["labels"] == int(np.isfinite(y).sum())


@pytest.fixture(scope="module")
def other_store(tmp_path_factory):
    """Features of the labels file extracted by a different tiny encoder (another seed)."""
    from conftest import make_tiny_encoder

    folder = tmp_path_factory.mktemp("other")
    labels = write_labels(folder / "labels.csv", range(200, 260))
    other = make_tiny_encoder(folder / "encoder", seed=1)
    assert main(["extract", "--dataset", str(labels), "--encoder", str(other), "--poolings", "mean",
                 "--threads", "1", "--no-progress", "--out", str(folder / "store")]) == 0
    return labels, folder / "store"


def test_features_from_a_store_of_the_same_encoder(checkpoint, tiny_encoder_dir, tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.csv", range(200, 260))
    assert main(["extract", "--dataset", str(labels), "--encoder", str(tiny_encoder_dir), "--poolings", "mean",
                 "--threads", "1", "--no-progress", "--out", str(tmp_path / "store")]) == 0
    assert add(checkpoint, labels, tmp_path / "r", "--price", "2,6", "--features", str(tmp_path / "store")) == 0
    assert Router.load(tmp_path / "r").targets == TARGETS + [NEW]


ERRORS = {
    "already a target": (lambda d: ["--add-target", "small", "--labels", str(write_labels(d / "l.csv", range(60))),
                                    "--price", "1,1"], "'small' is already a target of"),
    "no rows for the name": (lambda d: ["--add-target", "absent", "--labels", str(write_labels(d / "l.csv", range(60))),
                                        "--price", "1,1"], "no row scores target 'absent'"),
    "too few labels": (lambda d: ["--add-target", NEW, "--labels",
                                  str(write_labels(d / "l.csv", range(MIN_LABELS - 5))), "--price", "1,1"],
                       f"has {MIN_LABELS - 5} labelled prompt(s); adding a target needs at least {MIN_LABELS}"),
    "no price": (lambda d: ["--add-target", NEW, "--labels", str(write_labels(d / "l.csv", range(60)))],
                 f"'{NEW}' has no price, and this router prices its targets"),
    "bad price": (lambda d: ["--add-target", NEW, "--labels", str(write_labels(d / "l.csv", range(60))),
                             "--price", "cheap"], "--price: expected two numbers IN,OUT"),
    "labels without add-target": (lambda d: ["--labels", "x.csv"], "--labels and --price go with --add-target"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_line_and_writes_nothing(case, checkpoint, tmp_path, capsys):
    argv, expected = ERRORS[case]
    out = tmp_path / "out"
    rc = main(["train", *argv(tmp_path), "--from", str(checkpoint), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert expected in lines[0]
    assert not out.exists()


def test_a_store_of_another_encoder_is_refused(checkpoint, other_store, tmp_path, capsys):
    labels, store = other_store
    rc = add(checkpoint, labels, tmp_path / "out", "--price", "1,1", "--features", str(store))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --features:") and "was trained on encoder" in err and "differ in files" in err
    assert not (tmp_path / "out").exists()
