"""Cost-quality sweeps and the k-fold harness, end to end on a small synthetic routing problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefill_router.evaluate import metrics
from prefill_router.evaluate.harness import Contender, evaluate_contenders, take_rows
from prefill_router.evaluate.report import Report
from prefill_router.evaluate.sweep import cheapest_point_reaching, cost_quality_curve

# ---- sweeps on 3 prompts x 2 targets, worked by hand
P3 = np.array([[0.9, 0.6],
               [0.55, 0.5],
               [0.4, 0.8]])
Y3 = np.array([[1.0, 1.0],
               [0.0, 1.0],
               [0.0, 1.0]])
C3 = np.array([[4.0, 1.0],
               [4.0, 1.0],
               [4.0, 1.0]])
# costs scaled by the row's priciest (4): target 0 pays lam, target 1 pays lam / 4. Row 0 leaves target 0 when
# 0.9 - lam < 0.6 - lam / 4, i.e. lam > 0.4; row 1 when lam > 0.0667; row 2 is always on target 1.


def test_cost_quality_curve_by_hand():
    curve = cost_quality_curve(P3, Y3, C3, "utility", grid=[0.0, 0.1, 0.5])
    assert curve.accuracy.tolist() == pytest.approx([2 / 3, 1.0, 1.0])  # lam 0: rows -> 0, 0, 1; 0.1: 0, 1, 1
    assert curve.cost.tolist() == pytest.approx([3.0, 2.0, 1.0])
    assert np.allclose(curve.distribution, [[2 / 3, 1 / 3], [1 / 3, 2 / 3], [0.0, 1.0]])
    point = cheapest_point_reaching(curve, 2 / 3)
    assert (point.param, point.cost) == (0.5, 1.0)
    point = cheapest_point_reaching(cost_quality_curve(P3, Y3, C3, "utility", grid=[0.0, 0.1]), 2 / 3)
    assert (point.param, point.cost) == (0.1, 2.0)
    assert cheapest_point_reaching(curve, 1.01) is None
    tol = cost_quality_curve(P3, Y3, C3, "tolerance", grid=[0.0, 0.1, 0.35])
    assert tol.cost.tolist() == pytest.approx([3.0, 2.0, 1.0])
    hc, ha = curve.hull()
    assert hc.tolist() == [1.0] and ha.tolist() == [1.0]  # the cheapest point is also the best


def test_utility_sweep_never_gets_dearer_as_lambda_grows():
    rng = np.random.default_rng(0)
    P, Y = rng.random((300, 4)), (rng.random((300, 4)) < 0.5).astype(float)
    C = np.array([0.1, 0.3, 1.0, 2.0]) * rng.uniform(0.5, 2, size=(300, 1))
    curve = cost_quality_curve(P, Y, C)
    assert np.all(np.diff(curve.cost) <= 1e-12)
    assert np.allclose(curve.distribution.sum(axis=1), 1.0)


# ---- the harness on synthetic data
def synthetic(n: int = 240, seed: int = 0):
    """Four targets of rising skill and price; a prompt's difficulty decides who gets it right."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(size=n)
    skill = np.array([-1.0, 0.0, 0.7, 1.5])
    Y = (rng.random((n, 4)) < 1 / (1 + np.exp(-(skill - difficulty[:, None])))).astype(float)
    C = np.array([0.0001, 0.0005, 0.002, 0.01]) * rng.uniform(0.5, 2.0, size=(n, 1))
    X = np.c_[difficulty + rng.normal(scale=0.3, size=n), rng.normal(size=n)]
    idx = rng.permutation(n)
    folds = [(np.setdiff1d(idx, part), part) for part in np.array_split(idx, 3)]
    return X, Y, C, folds


class MeanPredictor:
    """Predicts every target's training accuracy for every prompt."""

    def fit(self, X, Y):
        labelled = (~np.isnan(Y)).sum(axis=0)
        self.p = np.where(labelled > 0, np.nansum(Y, axis=0) / np.maximum(labelled, 1), np.nan)
        return self

    def predict_proba(self, X):
        return np.tile(self.p, (len(X), 1))


class PeekPredictor:
    """Reads the true labels of the rows it is given (X = row indices): a check that rows stay aligned."""

    def __init__(self, Y):
        self.Y = Y

    def fit(self, X, Y):
        assert np.array_equal(self.Y[np.asarray(X)], Y, equal_nan=True)  # fitted on its own rows' labels
        return self

    def predict_proba(self, X):
        return np.nan_to_num(self.Y[np.asarray(X)], nan=0.0)


class DifficultyPredictor:
    """A per-target logistic curve in the first feature, fitted by a few Newton steps (NumPy only)."""

    def fit(self, X, Y):
        x = np.c_[np.ones(len(X)), np.asarray(X)[:, 0]]
        self.w = np.zeros((Y.shape[1], 2))
        for k in range(Y.shape[1]):
            w = np.zeros(2)
            for _ in range(25):
                p = 1 / (1 + np.exp(-x @ w))
                hess = x.T @ (x * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
                w -= np.linalg.solve(hess, x.T @ (p - Y[:, k]))
            self.w[k] = w
        return self

    def predict_proba(self, X):
        x = np.c_[np.ones(len(X)), np.asarray(X)[:, 0]]
        return 1 / (1 + np.exp(-x @ self.w.T))


class PromptLengthPredictor:
    """Takes a list of prompt strings, like a text baseline would."""

    def fit(self, X, Y):
        assert isinstance(X, list) and isinstance(X[0], str)
        self.p = np.nanmean(Y, axis=0)
        return self

    def predict_proba(self, X):
        return np.tile(self.p, (len(X), 1))


def test_harness_end_to_end(tmp_path):
    X, Y, C, folds = synthetic()
    n = len(Y)
    report = evaluate_contenders(
        Y, C, folds,
        [Contender("difficulty", DifficultyPredictor, X),
         Contender("mean", MeanPredictor, X),
         Contender("peek", lambda: PeekPredictor(Y), np.arange(n)),
         Contender("text", PromptLengthPredictor, [f"prompt {i}" for i in range(n)])],
        targets=["tiny", "small", "medium", "large"], groups=["even" if i % 2 == 0 else "odd" for i in range(n)],
        progress=False)

    assert report.n_folds == 3 and report.n_rows == n
    for f, (train, test) in enumerate(folds):
        oracle, best, rand = (report.row(name).folds[f] for name in ("oracle", "best single", "random"))
        assert oracle["accuracy"] >= best["accuracy"] >= rand["accuracy"]
        # fixed rows recomputed independently on the fold's test rows
        k_best = metrics.best_single(Y[train], C[train])[0]
        assert best["accuracy"] == pytest.approx(np.mean(Y[test, k_best]))
        top = C[test].mean(axis=0).max()
        assert oracle["savings_vs_most_expensive"] == pytest.approx(1 - metrics.oracle(Y[test], C[test])[1] / top)
        assert best["gap_captured"] == pytest.approx(0.0) and oracle["gap_captured"] == pytest.approx(1.0)
        even = test[test % 2 == 0]
        by_group = report.row("best single").by_group[f]
        assert by_group["even"]["accuracy"] == pytest.approx(np.mean(Y[even, k_best]))
        assert by_group["even"]["n"] == even.size
        assert by_group["odd"]["cost_per_1k"] == pytest.approx(C[test[test % 2 == 1], k_best].mean() * 1000)
        assert report.row("oracle").by_group[f]["odd"]["accuracy"] >= by_group["odd"]["accuracy"]
        assert oracle["savings_vs_best_single"] == pytest.approx(
            1 - metrics.oracle(Y[test], C[test])[1] / C[test, k_best].mean())

        # labels as predictions: argmax with cheaper-on-ties is exactly the oracle
        peek = report.row("peek").folds[f]
        assert peek["accuracy"] == pytest.approx(oracle["accuracy"])
        assert peek["cost_per_1k"] == pytest.approx(oracle["cost_per_1k"])
        assert peek["gap_captured"] == pytest.approx(1.0)
        assert peek["mean_auc"] == pytest.approx(1.0)
        assert peek["mean_brier"] == pytest.approx(0.0) and peek["mean_ece"] == pytest.approx(0.0)
        rows, P = report.row("peek").predictions[f]  # held-out predictions stay available in memory
        assert np.array_equal(rows, test) and np.array_equal(P, Y[test])

        # training means as predictions: always the training-best target, so exactly the best single row
        mean = report.row("mean").folds[f]
        assert mean["accuracy"] == pytest.approx(best["accuracy"])
        assert mean["gap_captured"] == pytest.approx(0.0)
        assert mean["mean_auc"] == pytest.approx(0.5)
        assert report.row("text").folds[f]["accuracy"] == pytest.approx(best["accuracy"])

        # a real signal beats a constant on ranking and on the cost-quality frontier
        learned = report.row("difficulty").folds[f]
        assert learned["mean_auc"] > 0.6
        assert learned["aiq"] > mean["aiq"]
        # the default policy: a utility weight >= 0, or (NaN) the best single target, whose accuracy it then has
        if np.isnan(learned["lambda_train"]):
            assert learned["accuracy_at_lambda_train"] == pytest.approx(best["accuracy"])
        else:
            assert learned["lambda_train"] >= 0

    # the dumbest hull can't beat the oracle's
    assert report.row("peek").stat("aiq")[0] >= report.row("difficulty").stat("aiq")[0]
    # the train-calibrated lambda reaches best-single accuracy on training rows; on test, roughly
    assert report.row("difficulty").stat("accuracy_at_lambda_train")[0] == pytest.approx(
        report.row("best single").stat("accuracy")[0], abs=0.1)

    paths = report.save(tmp_path / "eval")
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["rows"]] == ["random", "best single", "oracle", "difficulty", "mean", "peek",
                                                 "text"]
    assert len(data["rows"][3]["curves"]) == 3
    md = paths["markdown"].read_text()
    for name in ("| oracle |", "| difficulty |", "gap captured", "AIQ", "| large |", f"| even | {(n + 1) // 2} |"):
        assert name in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = Report.from_json(paths["json"])
    assert again.row("oracle").by_group == report.row("oracle").by_group
    assert again.summary()["difficulty"]["aiq"]["mean"] == pytest.approx(report.summary()["difficulty"]["aiq"]["mean"])


def test_harness_rejects_bad_inputs():
    X, Y, C, folds = synthetic(60)
    ok = [Contender("mean", MeanPredictor, X)]
    with pytest.raises(ValueError, match="both train and test"):
        evaluate_contenders(Y, C, [(np.arange(40), np.arange(30, 60))], ok, progress=False)
    with pytest.raises(ValueError, match="X has 10 rows"):
        evaluate_contenders(Y, C, folds, [Contender("short", MeanPredictor, X[:10])], progress=False)
    with pytest.raises(ValueError, match="unique"):
        evaluate_contenders(Y, C, folds, [Contender("oracle", MeanPredictor, X)], progress=False)

    class Wrong:
        def fit(self, X, Y):
            return self

        def predict_proba(self, X):
            return np.zeros((len(X), 2))

    with pytest.raises(ValueError, match="'wrong', fold 0: predict_proba returned shape"):
        evaluate_contenders(Y, C, folds, [Contender("wrong", Wrong, X)], progress=False)
    with pytest.raises(ValueError, match="folds is empty"):
        evaluate_contenders(Y, C, [], ok, progress=False)


def test_missing_labels_are_reported_not_scored_as_wrong():
    X, Y, C, folds = synthetic(90, seed=4)
    Y = Y.copy()
    Y[:, 3] = np.nan  # the dearest target was never run
    report = evaluate_contenders(Y, C, folds, [Contender("mean", MeanPredictor, X)], calibration_folds=0,
                                 calibration_holdout=0,
                                 progress=False)
    assert "in-sample" in report.to_markdown()
    for f in range(len(folds)):
        assert report.row("oracle").folds[f]["missing_labels"] == 0
        assert report.row("mean").folds[f]["missing_labels"] == 0  # NaN-mean target is never argmax


def test_take_rows_handles_arrays_and_lists():
    rows = np.array([2, 0])
    assert take_rows(np.arange(5) * 10, rows).tolist() == [20, 0]
    assert take_rows(["a", "b", "c"], rows) == ["c", "a"]
