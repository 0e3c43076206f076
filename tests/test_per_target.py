"""Per-target feature selection (router/per_target.py): it picks each target's view on training rows only."""

from __future__ import annotations

import numpy as np

from prefill_router.evaluate.harness import evaluate_contenders
from prefill_router.evaluate.prefill import FitCache, per_target_contender
from prefill_router.router.per_target import PerTargetSelector
from prefill_router.utils import roc_auc


def _views(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"A": rng.normal(size=(n, 8)), "B": rng.normal(size=(n, 8)), "C": rng.normal(size=(n, 8))}


def test_each_target_gets_the_view_that_carries_its_signal():
    views = _views(400)
    Y = np.stack([views["A"][:, 0] > 0, views["B"][:, 1] > 0, views["C"][:, 2] > 0], 1).astype(float)
    Y[::7, 1] = np.nan  # a target not run on some prompts: missing, not wrong
    selector = PerTargetSelector(pcas=(4, 8), folds=3).fit(views, Y)
    assert [c["view"] for c in selector.choices] == ["A", "B", "C"]
    fresh = _views(300, seed=2)  # other rows, same feature distribution
    truth = np.stack([fresh["A"][:, 0] > 0, fresh["B"][:, 1] > 0, fresh["C"][:, 2] > 0], 1)
    assert all(roc_auc(truth[:, k], selector.predict_proba(fresh)[:, k]) > 0.8 for k in range(3))


def test_selection_inside_the_harness_sees_training_rows_only():
    """Training rows carry the label in view A; held-out rows, three times as many, carry it in view B, more
    strongly. A selection that saw held-out rows would choose B; one that sees training rows only chooses A and
    then fails on the held-out rows."""
    n_train, n_test = 150, 450
    views = _views(n_train + n_test)
    train, test = np.arange(n_train), np.arange(n_train, n_train + n_test)
    y = np.where(np.arange(n_train + n_test) < n_train, views["A"][:, 0] > 0.3 * views["B"][:, 0],
                 views["B"][:, 0] > 0)
    Y = np.stack([y, y], 1).astype(float)
    C = np.tile([1e-4, 1e-3], (len(Y), 1))
    cache = FitCache()
    contender = per_target_contender(views, Y, [0, 1], "views", PerTargetSelector(pcas=(4,), folds=3), cache)
    evaluate_contenders(Y, C, [(train, test)], [contender], calibration_folds=0, calibration_holdout=0,
                        progress=False)
    fitted = [model for model in cache.store.values() if isinstance(model, PerTargetSelector)]
    assert len(fitted) == 1 and [c["view"] for c in fitted[0].choices] == ["A", "A"]
    P = fitted[0].predict_proba({k: v[test] for k, v in views.items()})
    assert roc_auc(Y[test, 0], P[:, 0]) < 0.65  # A carries no held-out signal
    # the counterfactual: a selection shown every row picks B, so the check above can fail
    leaky = PerTargetSelector(pcas=(4,), folds=3).fit(views, Y)
    assert [c["view"] for c in leaky.choices] == ["B", "B"]
