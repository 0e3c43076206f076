"""Routing policies: tie-breaking, tolerance, the utility trade-off, lambda calibration and spec parsing."""

from __future__ import annotations

import numpy as np
import pytest

from prefill_router.errors import ConfigError
from prefill_router.router.base import Policy
from prefill_router.router.policy import (
    DEFAULT_MAX_ACCURACY_DROP,
    ArgmaxPolicy,
    TolerancePolicy,
    UtilityPolicy,
    calibrate_lambda,
    choose_default_policy,
    policy_from_spec,
)

P = np.array([[0.8, 0.8],
              [0.9, 0.5],
              [0.6, 0.7]])
C = np.array([[2.0, 1.0],
              [1.0, 2.0],
              [1.0, 3.0]])


def test_policies_follow_the_protocol():
    for policy in (ArgmaxPolicy(), TolerancePolicy(0.1), UtilityPolicy(0.2)):
        assert isinstance(policy, Policy)


def test_argmax_breaks_ties_towards_the_cheaper_target():
    assert ArgmaxPolicy().choose(P, C).tolist() == [1, 0, 1]


def test_tolerance_takes_the_cheapest_target_near_the_best():
    # tol 0.15: row 0 both tie -> cheaper 1; row 1 only 0.9 is >= 0.75; row 2 both >= 0.55 -> cheaper 0
    assert TolerancePolicy(0.15).choose(P, C).tolist() == [1, 0, 0]
    assert TolerancePolicy(0.0).choose(P, C).tolist() == ArgmaxPolicy().choose(P, C).tolist()
    assert TolerancePolicy(1.0).choose(P, C).tolist() == [1, 0, 0]  # always the cheapest


def test_utility_trades_probability_for_cost():
    row_p, row_c = P[2:], C[2:]
    # costs scaled by the row's priciest (3): utilities 0.6 - lam/3 and 0.7 - lam. Equal at lam = 0.15.
    assert UtilityPolicy(0.1).choose(row_p, row_c).tolist() == [1]
    assert UtilityPolicy(0.15).choose(row_p, row_c).tolist() == [0]  # the tie goes to the cheaper
    assert UtilityPolicy(0.2).choose(row_p, row_c).tolist() == [0]
    # a fixed scale of 1 USD: 0.6 - lam and 0.7 - 3 lam, equal at lam = 0.05
    assert UtilityPolicy(0.04, cost_scale=1.0).choose(row_p, row_c).tolist() == [1]
    assert UtilityPolicy(0.06, cost_scale=1.0).choose(row_p, row_c).tolist() == [0]
    assert UtilityPolicy(0.0).choose(P, C).tolist() == ArgmaxPolicy().choose(P, C).tolist()


def test_unknown_costs_and_probabilities():
    Pn = np.array([[np.nan, 0.4], [0.5, 0.5]])
    Cn = np.array([[1.0, 2.0], [np.nan, 2.0]])
    # NaN P is never the argmax; an unknown cost loses a tie to a known one
    assert ArgmaxPolicy().choose(Pn, Cn).tolist() == [1, 1]
    assert UtilityPolicy(0.0).choose(Pn, Cn).tolist() == [1, 1]
    assert UtilityPolicy(0.5).choose(Pn, Cn).tolist() == [1, 1]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="C has shape"):
        ArgmaxPolicy().choose(P, C[:2])


def _synthetic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    P = rng.random((n, 3))
    C = np.array([0.001, 0.004, 0.02]) * rng.uniform(0.5, 2.0, size=(n, 1))
    return P, C


def _mean_cost(P, C, lam):
    choice = UtilityPolicy(lam).choose(P, C)
    return C[np.arange(len(C)), choice].mean()


def test_calibrate_lambda_meets_a_budget_with_the_smallest_lambda():
    P, C = _synthetic(400, 0)
    top = _mean_cost(P, C, 0.0)
    budget = 0.4 * top
    lam = calibrate_lambda(P, C, budget=budget)
    assert lam > 0
    assert _mean_cost(P, C, lam) <= budget
    assert _mean_cost(P, C, lam * (1 - 1e-6)) > budget  # any smaller lambda overspends
    # a budget that argmax already meets needs no trade-off
    assert calibrate_lambda(P, C, budget=top * 1.01) == 0.0


def test_calibrate_lambda_on_one_row_by_hand():
    # the row switches to the cheap target at lam = 0.15 (see test_utility_trades_probability_for_cost)
    assert calibrate_lambda(P[2:], C[2:], budget=1.0) == pytest.approx(0.15, rel=1e-6)


def test_calibrate_lambda_is_fitted_on_training_rows_only():
    P, C = _synthetic(600, 1)
    train, test = np.arange(400), np.arange(400, 600)
    budget = 0.3 * _mean_cost(P[train], C[train], 0.0)
    lam = calibrate_lambda(P[train], C[train], budget=budget)
    assert _mean_cost(P[train], C[train], lam) <= budget
    # held-out rows land near the budget but are not forced under it
    assert _mean_cost(P[test], C[test], lam) == pytest.approx(budget, rel=0.35)


def test_calibrate_lambda_to_a_traffic_share():
    P, C = _synthetic(500, 2)
    lam = calibrate_lambda(P, C, share=(2, 0.1))  # at most 10% to the priciest target
    share = np.mean(UtilityPolicy(lam).choose(P, C) == 2)
    assert share <= 0.1
    assert np.mean(UtilityPolicy(lam * (1 - 1e-6)).choose(P, C) == 2) > 0.1
    lam = calibrate_lambda(P, C, share=(0, 0.6))  # at least 60% to the cheapest
    assert np.mean(UtilityPolicy(lam).choose(P, C) == 0) >= 0.6


def test_calibrate_lambda_errors_name_the_problem():
    P, C = _synthetic(50, 3)
    with pytest.raises(ConfigError, match="below the cheapest achievable"):
        calibrate_lambda(P, C, budget=1e-9)
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate_lambda(P, C)
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate_lambda(P, C, budget=1.0, share=(0, 0.5))
    with pytest.raises(ConfigError, match="outside"):
        calibrate_lambda(P, C, share=(7, 0.5))
    with pytest.raises(ConfigError, match="fraction"):
        calibrate_lambda(P, C, share=(0, 1.5))


def test_policy_from_spec():
    assert policy_from_spec("argmax") == ArgmaxPolicy()
    assert policy_from_spec(" tolerance:0.05 ") == TolerancePolicy(0.05)
    assert policy_from_spec("utility:0.3") == UtilityPolicy(0.3)
    assert policy_from_spec("utility:0.3").spec() == "utility:0.3"
    for bad, message in [("", "non-empty"), ("utility", "needs a number"), ("utility:abc", "must be a number"),
                         ("greedy:1", "unknown policy 'greedy'"), ("argmax:3", "takes no argument"),
                         ("tolerance:-1", ">= 0"), ("utility:nan", ">= 0")]:
        with pytest.raises(ConfigError, match=message):
            policy_from_spec(bad)


def test_default_policy_is_utility_at_the_largest_weight_keeping_best_single_accuracy():
    rng = np.random.default_rng(0)
    n = 2000
    # target 0: expensive, right 80 %; target 1: cheap, right where an informative P says so
    Y = np.stack([rng.random(n) < 0.8, rng.random(n) < 0.5], axis=1).astype(float)
    P = np.clip(np.stack([np.full(n, 0.8), 0.5 + 0.45 * (2 * Y[:, 1] - 1)], axis=1)
                + rng.normal(0, 0.1, (n, 2)), 0, 1)
    C = np.tile([1.0, 0.1], (n, 1))
    grid = np.linspace(0, 2, 41)
    rows = np.arange(n)
    accuracy = np.array([Y[rows, UtilityPolicy(float(lam)).choose(P, C)].mean() for lam in grid])
    for drop in (0.0, DEFAULT_MAX_ACCURACY_DROP, 0.05):
        spec, info = choose_default_policy(P, Y, C, lambdas=grid, max_drop=drop)
        assert spec == f"utility:{info['lambda']:g}" and info["best_single"] == 0 and info["reached"]
        assert info["cost_per_query"] < 1.0  # some traffic moved to the cheap target
        level = Y[:, 0].mean() - drop
        i = int(np.flatnonzero(grid == info["lambda"])[0])
        assert info["smoothed_accuracy"] >= level - 1e-12
        # every larger weight is below the level on average from there on: no later stretch was skipped
        assert all(accuracy[j:].mean() < level for j in range(i + 1, len(grid)))
    default, _ = choose_default_policy(P, Y, C, lambdas=grid)
    exact, _ = choose_default_policy(P, Y, C, lambdas=grid, max_drop=0.0)
    looser, _ = choose_default_policy(P, Y, C, lambdas=grid, max_drop=0.05)
    lam = [float(spec.split(":")[1]) for spec in (exact, default, looser)]
    assert lam[0] <= lam[1] <= lam[2] and lam[0] < lam[2]  # a looser bound saves more


def test_default_policy_is_not_stopped_by_one_unlucky_row():
    """Accuracy against the weight: one early dip below the level (the first row moved to the cheap target
    is wrong there), then five rows the cheap target gets right, then a steady fall. Stopping at the first dip
    would keep the expensive target; the smoothed curve sees the stretch above the level and takes it."""
    n = 100
    Y = np.zeros((n, 2))
    Y[:90, 0] = 1  # the expensive target is right on 90 %
    Y[90:95, 1] = 1  # the cheap one is right on five rows the expensive one misses
    P = np.zeros((n, 2))
    P[:, 0] = 0.5
    P[0, 1] = 0.45  # moved first (a row the cheap target gets wrong): the dip
    P[90:95, 1] = np.linspace(0.44, 0.40, 5)  # moved next: the recovery
    P[1:61, 1] = np.linspace(0.39, 0.10, 60)  # then the fall
    C = np.tile([1.0, 0.1], (n, 1))
    grid = np.linspace(0, 1, 201)
    spec, info = choose_default_policy(P, Y, C, lambdas=grid, max_drop=0.0)
    assert info["reached"], spec
    choice = policy_from_spec(spec).choose(P, C)
    assert (choice[90:95] == 1).all() and choice[0] == 1
    assert Y[np.arange(n), choice].mean() >= Y[:, 0].mean()


def test_default_policy_is_the_best_single_target_when_routing_loses_accuracy():
    rng = np.random.default_rng(1)
    n = 1000
    Y = np.stack([rng.random(n) < 0.3, np.ones(n)], axis=1).astype(float)  # target 1 is always right
    P = rng.random((n, 2))  # noise: argmax sends some rows to target 0 and loses accuracy
    C = np.tile([0.1, 1.0], (n, 1))
    spec, info = choose_default_policy(P, Y, C, lambdas=[0.0, 0.5, 1.0])
    assert spec == "fixed:1" and not info["reached"]
    assert (policy_from_spec(spec).choose(P, C) == 1).all()


@pytest.mark.slow
def test_a_router_trained_on_shipped_mmlu_pro_saves_money_by_default_and_obeys_lambda():
    """The default ("auto") policy of a router trained on shipped MMLU-Pro rows (pro vs flash): on held-out
    prompts, within its one-point bound (chosen on training rows) plus one point of held-out noise of the best
    single model's accuracy, at a lower cost; larger lambdas move traffic
    to the cheaper model. Features: TF-IDF + SVD fitted on the training rows (fast, and informative enough:
    the policy, not the encoder, is under test here)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    from prefill_router.data import load_mmlu_pro, train_test_split
    from prefill_router.router import train_router

    ds = load_mmlu_pro(targets=["gemini-1.5-pro-002", "gemini-1.5-flash-002"])
    train, test = train_test_split(ds, test_size=0.3, seed=0, stratify=True)
    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2).fit([ds.prompts[i] for i in train])
    svd = TruncatedSVD(64, random_state=0).fit(tfidf.transform([ds.prompts[i] for i in train]))
    X = svd.transform(tfidf.transform(ds.prompts)).astype(np.float32)[:, None, :]
    router = train_router(ds, X, train, {"pca": None, "calibration_seeds": 2, "trunk": {
        "seeds": 3, "keep": 2, "max_epochs": 40, "patience": 5, "threads": 1}})
    assert router.default_policy.startswith("utility:")

    P, C, Y = router.predict_proba_features(X[test]), ds.C[test], ds.Y[test]
    rows = np.arange(test.size)
    flash = ds.targets.index("gemini-1.5-flash-002")
    shares = [np.mean(router.choose(P, C, lam=lam) == flash) for lam in (0.0, 0.3, 1.0)]
    assert shares[0] < shares[1] < shares[2], shares

    best = int(np.argmax(np.nanmean(ds.Y[train], axis=0)))
    choice = router.choose(P, C)
    accuracy, cost = Y[rows, choice].mean(), C[rows, choice].mean()
    assert accuracy >= Y[:, best].mean() - DEFAULT_MAX_ACCURACY_DROP - 0.01
    assert cost < C[:, best].mean()
