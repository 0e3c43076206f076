"""Metrics on matrices small enough that every expected value is worked out by hand in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefill_router.evaluate import metrics as m

NAN = float("nan")

# 4 prompts x 2 targets. Target 0 is cheap, target 1 dear; each is right on half the prompts.
Y = np.array([[1.0, 1.0],
              [0.0, 1.0],
              [1.0, 0.0],
              [0.0, 0.0]])
C = np.array([[1.0, 3.0],
              [1.0, 3.0],
              [2.0, 4.0],
              [2.0, 4.0]])


def test_roc_auc_by_pair_counting():
    # positives score 0.9, 0.4, 0.3; negatives 0.1, 0.4. Pairs won: 0.9 beats both (2), 0.4 beats 0.1 and
    # ties 0.4 (1.5), 0.3 beats 0.1 only (1) -> 4.5 of 6 pairs.
    assert m.roc_auc([1, 0, 1, 0, 1], [0.9, 0.1, 0.4, 0.4, 0.3]) == pytest.approx(0.75)


def test_per_target_auc_skips_missing_labels_thresholds_soft_labels_and_flags_one_class():
    Yk = np.array([[0.7, 1.0],   # soft label 0.7 counts as positive
                   [0.2, 1.0],
                   [NAN, 1.0],   # skipped for target 0
                   [0.9, 1.0]])
    P = np.array([[0.6, 0.1],
                  [0.5, 0.2],
                  [0.99, 0.3],
                  [0.4, 0.4]])
    auc = m.per_target_auc(Yk, P)
    # target 0 positives score 0.6, 0.4; the negative 0.5 -> pairs won 1 of 2
    assert auc[0] == pytest.approx(0.5)
    assert math.isnan(auc[1])  # only one class


def test_brier_and_ece_by_hand():
    Yk = np.array([[1.0], [0.0], [NAN]])
    P = np.array([[0.8], [0.4], [0.5]])
    assert m.brier(Yk, P)[0] == pytest.approx((0.2 ** 2 + 0.4 ** 2) / 2)

    p = np.array([0.1, 0.3, 0.6, 0.9, 1.0])[:, None]
    y = np.array([0, 1, 1, 1, 0], dtype=float)[:, None]
    # 2 bins. Low: mean p 0.2, mean y 0.5 -> 2/5 * 0.3. High (1.0 lands in the last bin): mean p 2.5/3,
    # mean y 2/3 -> 3/5 * 1/6.
    assert m.expected_calibration_error(y, p, bins=2)[0] == pytest.approx(2 / 5 * 0.3 + 3 / 5 * (2.5 / 3 - 2 / 3))
    with pytest.raises(ValueError, match="bins"):
        m.expected_calibration_error(y, p, bins=0)


def test_routed_accuracy_cost_and_distribution():
    choice = np.array([1, 1, 0, 0])
    assert m.routed_accuracy(Y, choice) == pytest.approx(3 / 4)
    assert m.routed_cost(C, choice) == pytest.approx((3 + 3 + 2 + 2) / 4)
    assert m.routing_distribution(np.array([0, 2, 2, 1]), 3).tolist() == [0.25, 0.25, 0.5]
    with pytest.raises(ValueError, match="outside"):
        m.routed_accuracy(Y, np.array([0, 2, 0, 0]))
    with pytest.raises(ValueError, match="shape"):
        m.routed_accuracy(Y, np.array([0, 1]))


def test_missing_chosen_label_is_excluded_and_counted():
    Yn = Y.copy()
    Yn[1, 1] = NAN
    choice = np.array([1, 1, 0, 0])
    assert m.routed_accuracy(Yn, choice) == pytest.approx(2 / 3)  # rows 0, 2, 3: 1, 1, 0
    assert m.missing_choice_labels(Yn, choice) == 1


def test_oracle_best_single_random_by_hand():
    acc, cost, choice = m.oracle(Y, C)
    # row 0 both right -> cheaper 0; row 1 only 1; row 2 only 0; row 3 none right -> cheaper 0
    assert choice.tolist() == [0, 1, 0, 0]
    assert acc == pytest.approx(3 / 4)
    assert cost == pytest.approx((1 + 3 + 2 + 2) / 4)

    k, acc, cost = m.best_single(Y, C)  # both 50%: the tie goes to the cheaper target
    assert (k, acc, cost) == (0, pytest.approx(0.5), pytest.approx(1.5))

    acc, cost = m.random_router(Y, C)
    assert acc == pytest.approx(4 / 8)
    assert cost == pytest.approx(20 / 8)


def test_oracle_never_picks_a_missing_label_when_another_exists():
    Yn = np.array([[0.0, NAN], [NAN, NAN]])
    Cn = np.array([[5.0, 1.0], [2.0, 1.0]])
    acc, cost, choice = m.oracle(Yn, Cn)
    assert choice.tolist() == [0, 1]  # row 1 has no label: cheapest target, left out of accuracy
    assert acc == pytest.approx(0.0)
    assert cost == pytest.approx((5 + 1) / 2)


def test_gap_captured_and_cost_savings():
    assert m.gap_captured(0.625, 0.5, 0.75) == pytest.approx(0.5)
    assert math.isnan(m.gap_captured(0.6, 0.5, 0.5))
    assert m.cost_savings(2.5, 3.5) == pytest.approx(2 / 7)
    # most expensive target by mean cost is target 1 (3.5 per query)
    assert m.most_expensive(C) == (1, pytest.approx(3.5))
    assert m.savings_vs_most_expensive(2.5, C) == pytest.approx(1 - 2.5 / 3.5)
    assert m.savings_vs_best_single(0.75, Y, C) == pytest.approx(1 - 0.75 / 1.5)


# ---- RouteLLM: 4 prompts, num_results=2 -> thresholds at the score quantiles 0, 0.5, 1
Y_WEAK = np.array([0, 0, 1, 1], dtype=float)
Y_STRONG = np.array([1, 1, 1, 0], dtype=float)
SCORE = np.array([0.9, 0.2, 0.5, 0.1])
# Edges: 0.1, median (0.2 + 0.5) / 2 = 0.35, and 0.9 (strict > at the last edge, so nothing goes strong).
#   t = 0.1  -> all strong: accuracy 3/4, fraction 1
#   t = 0.35 -> rows 0, 2 strong: 1, 0 (weak), 1, 1 (weak) = 3/4, fraction 1/2
#   t = 0.9  -> all weak: accuracy 1/2, fraction 0
# AUC = 0.5 * (0.5 + 0.75) / 2 + 0.5 * (0.75 + 0.75) / 2 = 0.6875; APGR = (0.6875 - 0.5) / (0.75 - 0.5)


def test_routellm_curve_apgr_and_cpt_by_hand():
    curve = m.routellm_curve(Y_WEAK, Y_STRONG, SCORE, num_results=2)
    assert curve["strong_fraction"].tolist() == [0.0, 0.5, 1.0]
    assert curve["accuracy"].tolist() == [0.5, 0.75, 0.75]
    assert m.apgr(Y_WEAK, Y_STRONG, SCORE, num_results=2) == pytest.approx(0.75)
    # PGR 50% needs accuracy 0.625, reached halfway along the first segment: fraction 0.25
    assert m.cpt(Y_WEAK, Y_STRONG, SCORE, pgr=0.5, num_results=2) == pytest.approx(0.25)
    assert m.cpt(Y_WEAK, Y_STRONG, SCORE, pgr=0.8, num_results=2) == pytest.approx(0.4)
    assert m.cpt(Y_WEAK, Y_STRONG, SCORE, pgr=0.5, num_results=2, rule="routellm") == pytest.approx(0.25)
    assert math.isnan(m.cpt(Y_WEAK, Y_STRONG, SCORE, pgr=1.5, num_results=2))
    summary = m.routellm_summary(Y_WEAK, Y_STRONG, SCORE, num_results=2)
    assert summary["cpt20"] == pytest.approx(0.1)
    assert m.pgr(0.625, 0.5, 0.75) == pytest.approx(0.5)


def test_routellm_thresholds_match_pandas_qcut_edges():
    pd = pytest.importorskip("pandas")
    scores = np.random.default_rng(3).random(101)
    _, edges = pd.qcut(scores, 10, retbins=True)
    curve = m.routellm_curve(np.zeros(101), np.ones(101), scores, num_results=10)
    assert np.allclose(np.sort(curve["threshold"]), edges)
    # a perfect-information score on weak=0, strong=1 everywhere: accuracy equals the strong fraction
    assert np.allclose(curve["accuracy"], curve["strong_fraction"])


def test_random_scores_give_apgr_near_one_half():
    rng = np.random.default_rng(0)
    n = 4000
    weak, strong = (rng.random(n) < 0.5).astype(float), (rng.random(n) < 0.8).astype(float)
    assert m.apgr(weak, strong, rng.random(n)) == pytest.approx(0.5, abs=0.06)


# ---- RouterBench AIQ
def test_convex_hull_and_aiq_by_hand():
    costs = [1.0, 2.0, 3.0, 4.0, 2.5]
    accs = [0.5, 0.6, 0.9, 0.8, 0.55]
    hc, ha = m.convex_hull(costs, accs)
    # (4, 0.8) and (2.5, 0.55) are dominated; (2, 0.6) lies under the chord (1, 0.5)-(3, 0.9), which reads 0.7
    assert hc.tolist() == [1.0, 3.0]
    assert ha.tolist() == [0.5, 0.9]
    # over [1, 4]: trapezoid 2 * (0.5 + 0.9) / 2 = 1.4, then flat 0.9 for one unit -> 2.3 / 3
    assert m.aiq(costs, accs) == pytest.approx(2.3 / 3)
    # on a wider common axis [0, 4] nothing is reachable below cost 1
    assert m.aiq(costs, accs, cost_range=(0.0, 4.0)) == pytest.approx(2.3 / 4)
    assert m.aiq([2.0], [0.7]) == pytest.approx(0.7)


def test_aiq_rewards_a_better_frontier():
    base = m.aiq([1, 2, 3], [0.5, 0.6, 0.7], cost_range=(1, 3))
    better = m.aiq([1, 2, 3], [0.5, 0.68, 0.7], cost_range=(1, 3))
    assert better > base


# ---- graded labels and the binarisation rule
def test_binarisation_rule_is_score_at_least_one_half():
    assert m.POSITIVE_THRESHOLD == 0.5
    assert m.binarise([0.0, 0.49, 0.5, 0.7, 1.0, NAN]).tolist() == [False, False, True, True, True, False]
    # AUC of graded labels is the AUC of the binarised ones, whatever the grades are
    soft = np.array([0.5, 0.45, 0.9, 0.0, 0.6])
    scores = np.array([0.2, 0.3, 0.8, 0.1, 0.05])
    assert m.roc_auc(soft, scores) == m.roc_auc(m.binarise(soft).astype(float), scores)
    # the 0.5 label is a positive, the 0.45 one a negative: positives 0.2, 0.8, 0.05 vs negatives 0.3, 0.1
    # -> pairs won: 0.2 beats 0.1 (1), 0.8 beats both (2), 0.05 none -> 3 of 6
    assert m.roc_auc(soft, scores) == pytest.approx(0.5)


def test_graded_labels_are_expected_correctness_in_accuracy_brier_and_ece():
    Yg = np.array([[0.7, 0.2], [0.4, NAN], [1.0, 0.9]])
    Cg = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    assert m.routed_accuracy(Yg, [0, 0, 1]) == pytest.approx((0.7 + 0.4 + 0.9) / 3)
    assert m.target_accuracy(Yg).tolist() == pytest.approx([(0.7 + 0.4 + 1.0) / 3, (0.2 + 0.9) / 2])
    acc, cost, choice = m.oracle(Yg, Cg)  # per row the highest grade; row 1 only has target 0
    assert choice.tolist() == [0, 0, 0] and acc == pytest.approx((0.7 + 0.4 + 1.0) / 3)
    P = np.full_like(Yg, 0.7)
    # Brier and ECE use the grade as is: a prediction equal to the grade costs nothing
    assert m.brier(Yg, P)[0] == pytest.approx((0.0 + 0.3 ** 2 + 0.3 ** 2) / 3)
    assert m.expected_calibration_error(Yg[:1], P[:1])[0] == pytest.approx(0.0)


# ---- P-AUCCC
def test_p_auccc_by_hand():
    # range (0, 4): x = 0.5, 0.75, 1.0; the dip at x = 0.75 is lifted by the running max to 0.6.
    # [0, 0.5]: nothing reachable (0); [0.5, 0.75]: 0.6 * 0.25 = 0.15; [0.75, 1]: (0.6 + 0.9) / 2 * 0.25
    costs, accs = [2.0, 3.0, 4.0], [0.6, 0.5, 0.9]
    assert m.p_auccc(costs, accs, cost_range=(0.0, 4.0)) == pytest.approx(0.15 + 0.1875)
    # a point dearer than the range sits at x = 1: the last segment now climbs to 1.0
    assert m.p_auccc(costs + [6.0], accs + [1.0], cost_range=(0.0, 4.0)) == pytest.approx(0.15 + 0.2)
    # the curve stays flat past its dearest point: (0, 0.5) and (2, 0.9) on (0, 4) -> 0.35 + 0.45
    assert m.p_auccc([0.0, 2.0], [0.5, 0.9], cost_range=(0.0, 4.0)) == pytest.approx(0.8)
    # default range: the points' own costs, [2, 4] -> x = 0, 0.5, 1 -> 0.3 + 0.375
    assert m.p_auccc(costs, accs) == pytest.approx(0.6 * 0.5 + (0.6 + 0.9) / 2 * 0.5)
    # NaN points are ignored
    assert m.p_auccc(costs + [NAN], accs + [1.0]) == pytest.approx(m.p_auccc(costs, accs))
    # a zero-width axis: the best accuracy affordable at that cost
    assert m.p_auccc(costs, accs, cost_range=(3.0, 3.0)) == pytest.approx(0.6)
    assert m.p_auccc(costs, accs, cost_range=(1.0, 1.0)) == 0.0


def test_p_auccc_differs_from_aiq_by_using_the_running_max_not_the_hull():
    # (1, 0.5), (2, 0.5), (3, 1.0) on (1, 3): the hull's chord reads 0.75 at cost 2, the running max 0.5
    costs, accs = [1.0, 2.0, 3.0], [0.5, 0.5, 1.0]
    assert m.aiq(costs, accs, cost_range=(1.0, 3.0)) == pytest.approx(0.75)
    assert m.p_auccc(costs, accs, cost_range=(1.0, 3.0)) == pytest.approx(0.25 + 0.375)
    # on a concave curve the two agree
    assert m.p_auccc([1.0, 2.0, 3.0], [0.5, 1.0, 1.0], (1.0, 3.0)) == pytest.approx(
        m.aiq([1.0, 2.0, 3.0], [0.5, 1.0, 1.0], (1.0, 3.0)))


def test_p_auccc_refuses_bad_input():
    with pytest.raises(ValueError, match="costs has 2 points but accs has 1"):
        m.p_auccc([1.0, 2.0], [0.5])
    with pytest.raises(ValueError, match="no \\(cost, accuracy\\) point"):
        m.p_auccc([NAN], [0.5])
    with pytest.raises(ValueError, match="cost_range"):
        m.p_auccc([1.0], [0.5], cost_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="cost_range"):
        m.p_auccc([1.0], [0.5], cost_range=(NAN, 1.0))
