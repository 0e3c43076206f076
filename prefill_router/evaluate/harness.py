"""K-fold evaluation of named predictors, with the fixed baselines (random, best single, oracle) alongside.

    report = evaluate_contenders(ds.Y, ds.C, folds, [
        Contender("prefill-mlp", lambda: TrunkEnsemble(...), features),        # X: [N, D] floats
        Contender("knn-minilm", lambda: KNNPredictor(k=20), embeddings),        # X: [N, E] floats
        Contender("oracle-check", lambda: OraclePredictor(ds.Y), np.arange(ds.n)),  # X: row indices
    ], targets=ds.targets, groups=ds.groups)
    report.save("runs/eval")        # report.json, report.md, cost_quality.png

For every fold and contender: a fresh predictor from `make_predictor()` is fitted on the training rows and
predicts the test rows; every number is then computed on test rows only. The best single target is chosen on
training rows and scored on test rows. See `FOLD_METRICS` for what is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from prefill_router.errors import ConfigError, DataError
from prefill_router.evaluate import metrics
from prefill_router.evaluate.report import Report, ReportRow
from prefill_router.evaluate.sweep import DEFAULT_LAMBDAS, Curve, cheapest_point_reaching, cost_quality_curve
from prefill_router.router.base import Predictor
from prefill_router.router.policy import ArgmaxPolicy, UtilityPolicy, choose_default_policy, policy_from_spec

# What each fold reports (all on the fold's test rows). Rows that are not predictors leave NaN where a
# metric needs predictions.
FOLD_METRICS = {
    "accuracy": "routed accuracy of the argmax policy",
    "cost_per_1k": "mean USD per 1,000 queries of the argmax policy",
    "gap_captured": "(accuracy - best single) / (oracle - best single), best single chosen on training rows",
    "savings_vs_most_expensive": "1 - cost / cost of always calling the target with the highest mean cost",
    "savings_vs_best_single": "1 - cost / cost of always calling the best single target (chosen on training rows)",
    "mean_auc": "mean over targets of the per-target ROC AUC of the predicted probabilities",
    "mean_brier": "mean over targets of the Brier score of the predicted probabilities",
    "mean_ece": "mean over targets of the expected calibration error (10 equal-width bins)",
    "aiq": "RouterBench AIQ of the utility-lambda sweep, over the cost range [cheapest per-row choice, "
           "most expensive single target]",
    "savings_at_best_single_accuracy": "cost savings vs the most expensive target at the cheapest lambda of "
                                       "the test-row sweep whose accuracy reaches the best single target's",
    "cost_per_1k_at_best_single_accuracy": "USD per 1,000 queries at that point",
    "lambda_at_best_single_accuracy": "that lambda (chosen on test rows: an optimistic reading)",
    "p_auccc": "P-AUCCC: area under the running-max cost-coverage curve of the utility-lambda sweep on AIQ's "
               "cost axis, in [0, 1]",
    "lambda_train": "the default policy's lambda, chosen on training rows only by the rule of a trained "
                    "router (router.policy.choose_default_policy): utility at the largest lambda whose smoothed "
                    "accuracy on cross-fitted predictions of the training rows stays within one point of the "
                    "most accurate single target's; NaN where the default is that single target",
    "accuracy_at_lambda_train": "test accuracy of the default policy",
    "cost_per_1k_at_lambda_train": "test USD per 1,000 queries of the default policy",
    "savings_at_lambda_train": "test cost savings vs the most expensive target of the default policy",
    "savings_vs_best_single_at_lambda_train": "test cost savings vs always calling the best single target of "
                                              "the default policy",
    "gap_captured_at_lambda_train": "test gap captured by the default policy",
    "missing_labels": "test rows whose argmax-chosen target has no label (left out of accuracy)",
}

# The fixed rows every report has, in report order, before the contenders.
BASELINES = ("random", "best single", "oracle")


@dataclass
class Contender:
    """A named predictor to evaluate: `make_predictor()` returns a fresh, unfitted Predictor, and `X` holds
    its input for every row of the dataset (any row-indexable: a float array, an object array of prompts,
    a list, or row indices for an oracle)."""

    name: str
    make_predictor: Callable[[], Predictor]
    X: Any


def take_rows(X: Any, rows: np.ndarray) -> Any:
    """Rows `rows` of X: fancy indexing for arrays, a list comprehension for sequences."""
    if isinstance(X, np.ndarray) or hasattr(X, "__array__") and not isinstance(X, (list, tuple)):
        return np.asarray(X)[rows]
    return [X[int(i)] for i in rows]


def _row_count(X: Any) -> int:
    try:
        return len(X)
    except TypeError:
        raise DataError(f"contender input X must be row-indexable with a length, got {type(X).__name__}") from None


def _check_folds(folds: Sequence[tuple], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if not len(folds):
        raise ConfigError("folds is empty; pass at least one (train_idx, test_idx) pair")
    out = []
    for f, pair in enumerate(folds):
        try:
            train, test = pair
        except (TypeError, ValueError):
            raise ConfigError(f"fold {f} must be a (train_idx, test_idx) pair") from None
        train, test = np.asarray(train, dtype=np.int64).ravel(), np.asarray(test, dtype=np.int64).ravel()
        if not train.size or not test.size:
            raise ConfigError(f"fold {f} has {train.size} training and {test.size} test rows; both need rows")
        for name, idx in (("train", train), ("test", test)):
            if idx.min() < 0 or idx.max() >= n:
                raise ConfigError(f"fold {f} {name} indices fall outside [0, {n - 1}]")
        overlap = np.intersect1d(train, test)
        if overlap.size:
            raise ConfigError(f"fold {f}: {overlap.size} rows are in both train and test (e.g. row {overlap[0]})")
        out.append((train, test))
    return out


def _predict(contender: Contender, rows_fit: np.ndarray, rows_pred: list[np.ndarray], Y: np.ndarray,
             fold: int) -> tuple[Predictor, list[np.ndarray]]:
    predictor = contender.make_predictor()
    predictor.fit(take_rows(contender.X, rows_fit), Y[rows_fit])
    outs = []
    for rows in rows_pred:
        P = np.asarray(predictor.predict_proba(take_rows(contender.X, rows)), dtype=np.float64)
        if P.shape != (rows.size, Y.shape[1]):
            raise DataError(f"contender {contender.name!r}, fold {fold}: predict_proba returned shape {P.shape}, "
                             f"expected ({rows.size}, {Y.shape[1]})")
        outs.append(P)
    return predictor, outs


def _group_outcomes(Y: np.ndarray, C: np.ndarray, choice: np.ndarray | None,
                    groups: np.ndarray) -> dict[str, dict[str, float]]:
    """{group: {accuracy, cost_per_1k, n}} of a choice on these rows; choice None = uniform random."""
    out = {}
    for g in sorted(set(groups.tolist())):
        rows = groups == g
        if choice is None:
            acc, cost = metrics.random_router(Y[rows], C[rows])
        else:
            acc, cost = metrics.routed_accuracy(Y[rows], choice[rows]), metrics.routed_cost(C[rows], choice[rows])
        out[g] = {"accuracy": acc, "cost_per_1k": cost * 1000, "n": int(rows.sum())}
    return out


def _mean_finite(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _blank() -> dict[str, float]:
    return {name: float("nan") for name in FOLD_METRICS}


def _calibration_split(train: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Split training rows into (fit, calibrate) parts, or None for in-sample calibration."""
    n_cal = round(train.size * holdout)
    if holdout <= 0 or n_cal < 2 or train.size - n_cal < 2:
        return None
    shuffled = np.random.default_rng(seed).permutation(train)
    return np.sort(shuffled[n_cal:]), np.sort(shuffled[:n_cal])


@dataclass
class _Fold:
    """One fold's test rows and the reference values every report row of that fold is measured against."""

    index: int
    train: np.ndarray
    test: np.ndarray
    Y: np.ndarray  # test rows' labels
    C: np.ndarray  # test rows' costs
    groups: np.ndarray | None  # test rows' groups
    best_choice: np.ndarray  # the best single target (chosen on training rows) for every test row
    best_acc: float
    best_cost: float
    oracle_acc: float
    oracle_cost: float
    oracle_choice: np.ndarray
    top_cost: float  # mean cost of the most expensive target
    cost_range: tuple[float, float]  # AIQ's cost axis

    @classmethod
    def of(cls, index: int, train: np.ndarray, test: np.ndarray, Y: np.ndarray, C: np.ndarray,
           groups: np.ndarray | None) -> _Fold:
        Yte, Cte = Y[test], C[test]
        best_choice = np.full(test.size, metrics.best_single(Y[train], C[train])[0])
        oracle_acc, oracle_cost, oracle_choice = metrics.oracle(Yte, Cte)
        _, top_cost = metrics.most_expensive(Cte)
        # AIQ's common cost axis: from always taking each row's cheapest target to the dearest single target
        row_cheapest = np.where(np.isnan(Cte), np.inf, Cte).min(axis=1)
        return cls(index, train, test, Yte, Cte, groups[test] if groups is not None else None, best_choice,
                   metrics.routed_accuracy(Yte, best_choice), metrics.routed_cost(Cte, best_choice),
                   oracle_acc, oracle_cost, oracle_choice, top_cost,
                   (float(row_cheapest[np.isfinite(row_cheapest)].mean()), top_cost))

    def outcome(self, acc: float, cost: float) -> dict[str, float]:
        """A report row's fold metrics for this accuracy and mean cost; the prediction metrics stay NaN."""
        row = _blank()
        row.update(accuracy=acc, cost_per_1k=cost * 1000,
                   gap_captured=metrics.gap_captured(acc, self.best_acc, self.oracle_acc),
                   savings_vs_most_expensive=metrics.cost_savings(cost, self.top_cost),
                   savings_vs_best_single=metrics.cost_savings(cost, self.best_cost))
        return row

    def choice_outcome(self, choice: np.ndarray) -> dict[str, float]:
        return self.outcome(metrics.routed_accuracy(self.Y, choice), metrics.routed_cost(self.C, choice))


@dataclass
class _Result:
    """One report row as the folds accumulate: per fold its metrics, routing distribution and per-group outcome
    and, for a router, its cost-quality curve and held-out predictions."""

    name: str
    kind: str  # "router" or "baseline"
    folds: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    distributions: list[list[float]] = field(default_factory=list)
    predictions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    by_group: list[dict] = field(default_factory=list)

    def record(self, fold: _Fold, row: dict[str, float], choice: np.ndarray | None) -> None:
        """Add one fold's row; choice None = uniform random routing."""
        k = fold.Y.shape[1]
        if choice is not None:
            row["missing_labels"] = metrics.missing_choice_labels(fold.Y, choice)
        self.folds.append(row)
        self.distributions.append([1.0 / k] * k if choice is None
                                  else metrics.routing_distribution(choice, k).tolist())
        if fold.groups is not None:
            self.by_group.append(_group_outcomes(fold.Y, fold.C, choice, fold.groups))

    def report_row(self) -> ReportRow:
        return ReportRow(self.name, self.kind, self.folds, self.curves, self.distributions, self.predictions,
                         self.by_group)


def _record_baselines(fold: _Fold, random: _Result, best: _Result, oracle: _Result) -> None:
    random.record(fold, fold.outcome(*metrics.random_router(fold.Y, fold.C)), None)
    best.record(fold, fold.outcome(fold.best_acc, fold.best_cost), fold.best_choice)
    oracle.record(fold, fold.outcome(fold.oracle_acc, fold.oracle_cost), fold.oracle_choice)


def _test_and_calibration(contender: Contender, fold: _Fold, Y: np.ndarray, calibration_folds: int,
                          calibration_holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P of the test rows, P of the calibration rows, the calibration rows) for one contender and fold.

    The fits run in a fixed order (the test fit first when cross-fitting, last with a hold-out): predictors
    that draw on shared random state depend on it, and reports are compared across versions."""
    train, test, f = fold.train, fold.test, fold.index
    if calibration_folds >= 2:  # cross-fitted: every training row predicted by a model that did not see it
        _, (Pte,) = _predict(contender, train, [test], Y, f)
        Pcal = np.full((train.size, Y.shape[1]), np.nan)
        parts = np.array_split(np.random.default_rng(seed + f).permutation(train.size), calibration_folds)
        for part in parts:
            _, (Pcal[part],) = _predict(contender, np.delete(train, part), [train[part]], Y, f)
        return Pte, Pcal, train
    split = _calibration_split(train, calibration_holdout, seed + f)
    if split is not None:
        fit_rows, cal_rows = split
        _, (Pcal,) = _predict(contender, fit_rows, [cal_rows], Y, f)
        _, (Pte,) = _predict(contender, train, [test], Y, f)
        return Pte, Pcal, cal_rows
    _, (Pte, Pcal) = _predict(contender, train, [test, train], Y, f)
    return Pte, Pcal, train


def _probability_metrics(fold: _Fold, Pte: np.ndarray) -> dict[str, float]:
    return {"mean_auc": _mean_finite(metrics.per_target_auc(fold.Y, Pte)),
            "mean_brier": _mean_finite(metrics.brier(fold.Y, Pte)),
            "mean_ece": _mean_finite(metrics.expected_calibration_error(fold.Y, Pte))}


def _best_single_point(fold: _Fold, curve: Curve) -> dict[str, float]:
    """Where the test-row sweep first reaches the best single target's accuracy; empty if it never does."""
    point = cheapest_point_reaching(curve, fold.best_acc)
    if point is None:
        return {}
    return {"savings_at_best_single_accuracy": metrics.cost_savings(point.cost, fold.top_cost),
            "cost_per_1k_at_best_single_accuracy": point.cost * 1000,
            "lambda_at_best_single_accuracy": point.param}


def _default_policy(fold: _Fold, Pte: np.ndarray, Pcal: np.ndarray, Ycal: np.ndarray, Ccal: np.ndarray,
                    grid: np.ndarray, cost_scale: float | None) -> dict[str, float]:
    """The test outcome of the default policy a trained router would choose on these calibration rows
    (router.policy.choose_default_policy)."""
    spec, facts = choose_default_policy(Pcal, Ycal, Ccal, lambdas=grid, cost_scale=cost_scale)
    lam = facts.get("lambda", float("nan"))  # NaN: the default is the best single target
    choice = (UtilityPolicy(lam, cost_scale) if facts["reached"] else policy_from_spec(spec)).choose(Pte, fold.C)
    acc, cost = metrics.routed_accuracy(fold.Y, choice), metrics.routed_cost(fold.C, choice)
    return {"lambda_train": lam, "accuracy_at_lambda_train": acc, "cost_per_1k_at_lambda_train": cost * 1000,
            "savings_at_lambda_train": metrics.cost_savings(cost, fold.top_cost),
            "savings_vs_best_single_at_lambda_train": metrics.cost_savings(cost, fold.best_cost),
            "gap_captured_at_lambda_train": metrics.gap_captured(acc, fold.best_acc, fold.oracle_acc)}


def _record_router(result: _Result, fold: _Fold, Pte: np.ndarray, Pcal: np.ndarray, Ycal: np.ndarray,
                   Ccal: np.ndarray, grid: np.ndarray, cost_scale: float | None) -> None:
    """Score one contender's held-out predictions on one fold and add them to its result."""
    choice = ArgmaxPolicy().choose(Pte, fold.C)
    row = fold.choice_outcome(choice)
    row.update(_probability_metrics(fold, Pte))
    curve = cost_quality_curve(Pte, fold.Y, fold.C, "utility", grid, cost_scale)
    row["aiq"] = curve.aiq(fold.cost_range)
    row["p_auccc"] = curve.p_auccc(fold.cost_range)  # on AIQ's cost axis, so the two compare
    row.update(_best_single_point(fold, curve))
    row.update(_default_policy(fold, Pte, Pcal, Ycal, Ccal, grid, cost_scale))
    result.predictions.append((fold.test, Pte))
    result.record(fold, row, choice)
    result.curves.append(curve.to_dict())


def _check_inputs(Y, C, folds: Sequence[tuple], contenders: Sequence[Contender], targets: Sequence[str] | None,
                  groups: Sequence[str] | None, calibration_holdout: float):
    """Y and C as float arrays, target names, checked folds and groups as an object array (or None)."""
    if not 0 <= calibration_holdout < 1:
        raise ConfigError(f"calibration_holdout must be in [0, 1), got {calibration_holdout!r}")
    Y = np.asarray(Y, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != C.shape:
        raise DataError(f"Y and C must share one [N, K] shape; got {Y.shape} and {C.shape}")
    n, k = Y.shape
    targets = list(targets) if targets is not None else [f"target_{j}" for j in range(k)]
    if len(targets) != k:
        raise DataError(f"targets names {len(targets)} entries, Y has {k} columns")
    names = [c.name for c in contenders]
    clash = sorted({n_ for n_ in names if names.count(n_) > 1} | (set(names) & set(BASELINES)))
    if clash:
        raise ConfigError(f"contender names must be unique and differ from the fixed rows {sorted(BASELINES)}: "
                          f"{clash}")
    for c in contenders:
        if _row_count(c.X) != n:
            raise DataError(f"contender {c.name!r}: X has {_row_count(c.X)} rows, Y has {n}")
    checked_folds = _check_folds(folds, n)
    group_array = None
    if groups is not None:
        group_array = np.asarray([str(g) for g in groups], dtype=object)
        if group_array.shape != (n,):
            raise DataError(f"groups has {group_array.size} entries, Y has {n} rows")
    return Y, C, targets, checked_folds, group_array


def _notes(calibration_folds: int, calibration_holdout: float, cost_scale: float | None,
           notes: Sequence[str]) -> list[str]:
    if calibration_folds >= 2:
        calibration = f"{calibration_folds}-fold cross-fitted predictions of each fold's training rows."
    elif calibration_holdout > 0:
        calibration = f"a {calibration_holdout:.0%} hold-out of each fold's training rows."
    else:
        calibration = "in-sample predictions of each fold's training rows."
    return [
        "All numbers are on held-out (test) rows, mean ± std (ddof=1) across folds.",
        "Best single target chosen on training rows; most expensive target = highest mean cost on test rows.",
        "default policy (lambda_train): chosen on " + calibration,
        "Router accuracy and cost use the argmax policy; curves sweep the utility policy P - lambda * C / "
        + ("(row's priciest cost)." if cost_scale is None else f"{cost_scale:g} USD."),
        *notes,
    ]


def evaluate_contenders(Y, C, folds: Sequence[tuple], contenders: Sequence[Contender], *,
                        targets: Sequence[str] | None = None, lambdas=None, cost_scale: float | None = None,
                        calibration_folds: int = 3, calibration_holdout: float = 0.2, seed: int = 0,
                        groups: Sequence[str] | None = None,
                        notes: Sequence[str] = (), progress: bool = True) -> Report:
    """Evaluate every contender on every fold, with random, best single and oracle rows. Returns a Report.

    Y[N, K] labels in [0, 1] (NaN = not run), C[N, K] USD per query, folds = [(train_idx, test_idx), ...].
    `lambdas` is the utility-policy grid (default sweep.DEFAULT_LAMBDAS); `cost_scale` goes to UtilityPolicy.
    The default policy (lambda_train) is chosen on predictions of each fold's training rows: cross-fitted over
    `calibration_folds` parts (as a trained router does; `calibration_folds` extra fits per fold and
    contender); with calibration_folds < 2, on a `calibration_holdout` share of them (one extra fit), or on
    in-sample predictions when that is 0 too (cheapest, optimistic for predictors that overfit).
    `groups` (one category per row, e.g. RoutingDataset.groups) adds per-group accuracy and cost per fold.
    Each router row keeps its held-out predictions in memory as `ReportRow.predictions` [(test_idx, P)].
    """
    Y, C, targets, checked, group_array = _check_inputs(Y, C, folds, contenders, targets, groups,
                                                        calibration_holdout)
    grid = DEFAULT_LAMBDAS if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    baselines = [_Result(name, "baseline") for name in BASELINES]
    routers = [_Result(c.name, "router") for c in contenders]
    target_points: list[dict] = []

    steps = tqdm(total=len(checked) * max(len(contenders), 1), desc="evaluate", disable=not progress)
    for f, (train, test) in enumerate(checked):
        fold = _Fold.of(f, train, test, Y, C, group_array)
        target_points.append({"accuracy": metrics.target_accuracy(fold.Y).tolist(),
                              "cost": metrics.target_cost(fold.C).tolist()})
        _record_baselines(fold, *baselines)
        for contender, result in zip(contenders, routers):
            steps.set_postfix_str(f"fold {f + 1}/{len(checked)} {contender.name}")
            Pte, Pcal, cal_rows = _test_and_calibration(contender, fold, Y, calibration_folds,
                                                        calibration_holdout, seed)
            _record_router(result, fold, Pte, Pcal, Y[cal_rows], C[cal_rows], grid, cost_scale)
            steps.update(1)
    steps.close()

    return Report(targets=targets, n_rows=Y.shape[0], n_folds=len(checked),
                  rows=[r.report_row() for r in baselines + routers],
                  notes=_notes(calibration_folds, calibration_holdout, cost_scale, notes),
                  target_points=target_points, metric_help=dict(FOLD_METRICS))
