"""Data with its own per-row costs and no price table: the cost model is each target's mean cost over the training
rows, a price table still wins, and `train` ships a policy that trades cost for accuracy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from prefill_router.cli import main
from prefill_router.data import CostModel, PriceTable, RoutingDataset, read_routing_data
from prefill_router.features import extract_to_store, load_encoder
from prefill_router.router import Router, train_router

SMALL = {"pca": 4, "calibration_folds": 2, "calibration_seeds": 1,
         "trunk": {"seeds": 2, "keep": 1, "max_epochs": 30, "patience": 5, "hidden": [16], "dropout": [0.0],
                   "threads": 1}}


def _dataset(C: np.ndarray, prices: PriceTable | None = None) -> RoutingDataset:
    n = len(C)
    Y = np.tile([1.0, 0.0], (n, 1))
    return RoutingDataset([str(i) for i in range(n)], [f"p{i}" for i in range(n)], ["big", "small"], Y, C,
                          input_tokens=np.full(n, 100.0), output_tokens=np.full((n, 2), np.nan), prices=prices)


def test_the_mean_cost_model_averages_known_costs_of_training_rows_only():
    C = np.array([[2.0, 0.1], [4.0, np.nan], [6.0, 0.3], [100.0, 100.0]])
    model = CostModel.from_row_costs(_dataset(C), train_rows=[0, 1, 2])
    np.testing.assert_allclose(model.estimate([5, 5000]), [[4.0, 0.2], [4.0, 0.2]])  # not the prompt's length
    again = CostModel.from_dict(json.loads(model.to_json()))  # as a checkpoint stores it
    np.testing.assert_allclose(again.estimate([1]), [[4.0, 0.2]])
    assert any("mean per-row cost" in note for note in model.notes)
    with pytest.raises(ValueError, match="no known cost for target"):
        CostModel.from_row_costs(_dataset(np.array([[1.0, np.nan]])))


def test_a_price_table_takes_precedence_over_row_costs():
    rng = np.random.default_rng(0)
    prices = PriceTable({"big": (10.0, 30.0), "small": (0.1, 0.3)}, source="table")
    ds = _dataset(np.tile([5.0, 5.0], (40, 1)), prices)  # row costs that say both cost the same
    ds.Y[::2, 1] = 1.0
    router = train_router(ds, rng.normal(size=(40, 1, 6)).astype(np.float32), None, SMALL)
    assert router.cost_model.prices.source == "table"
    C = router.estimate_costs(np.array([100.0]))[0]
    assert C[0] > 50 * C[1]  # the table's prices, not the equal row costs

    without = _dataset(np.tile([5.0, 1.0], (40, 1)))
    without.Y[::2, 1] = 1.0
    router = train_router(without, rng.normal(size=(40, 1, 6)).astype(np.float32), None, SMALL)
    np.testing.assert_allclose(router.estimate_costs(np.array([7.0])), [[5.0, 1.0]])


def _long_file_with_row_costs(path, n: int, seed: int = 0):
    """A long-format file: `small` (cheap) is right on one kind of prompt only, `big` (dear) on nearly all. Each row
    has its own cost (longer prompts cost more), in a column named `cost_usd`, and the file has its own split."""
    rng = np.random.default_rng(seed)
    rows, prompts = [], []
    for i in range(n):
        easy = i % 2 == 0
        words = " ".join(rng.choice(["apple", "pear", "plum"] if easy else ["quartz", "zinc", "xenon"], 4 + i % 5))
        prompt = f"{'easy' if easy else 'hard'} {words}"
        prompts.append(prompt)
        length = len(prompt)
        split = "test" if i % 4 in (1, 2) else "train"
        rows.append({"id": f"q{i}", "prompt": prompt, "target": "big", "score": int(rng.random() < 0.9),
                     "cost_usd": 1e-4 * length, "split": split})
        rows.append({"id": f"q{i}", "prompt": prompt, "target": "small", "score": int(easy),
                     "cost_usd": 2e-6 * length, "split": split})
    pd.DataFrame(rows).to_csv(path, index=False)
    return prompts


def test_train_on_row_costs_without_prices_ships_a_policy_that_saves_money(tiny_encoder_dir, tmp_path, capsys):
    data = tmp_path / "outcomes.csv"
    prompts = _long_file_with_row_costs(data, 160)
    store = tmp_path / "store"
    extract_to_store(prompts, load_encoder(str(tiny_encoder_dir)), store, poolings=["mean"], progress=False)
    out = tmp_path / "router"
    assert main(["train", "--dataset", str(data), "--features", str(store), "--id-col", "id", "--cost-col",
                 "cost_usd", "--split-col", "split", "--pca", "8", "--seeds", "2", "--keep", "1",
                 "--calibration-folds", "2", "--threads", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "without prices" not in captured.err
    router = Router.load(out)
    assert router.default_policy.startswith("utility:")  # it trades cost, as evaluate's default does
    assert router.cost_model.prices.source.startswith("mean per-row cost")

    # held-out rows are the file's test split; the router's spend there is compared with always calling `big`
    ds = read_routing_data(data, id_col="id", cost_col="cost_usd", split_col="split")
    _, test = ds.split_rows()
    holdout = router.metrics["holdout"]
    assert holdout["rows"] == test.size
    big = ds.targets.index("big")
    always_big = 1000 * float(np.nanmean(ds.C[test, big]))
    assert holdout["cost_per_1k_default_policy"] < 0.8 * always_big
    assert holdout["accuracy_default_policy"] >= holdout["best_single_accuracy"] - 0.1
