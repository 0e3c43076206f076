"""Routing metrics. Every function is pure NumPy and documents its exact definition.

Shapes used throughout:
    Y[N, K]      labels in [0, 1] (1 = target k answered prompt i correctly); NaN = target k was not run on i
    C[N, K]      cost in USD of sending prompt i to target k; NaN = unknown
    P[N, K]      predicted P(correct)
    choice[N]    the chosen target index per prompt

Missing labels are never counted as wrong. Where a routed prompt's chosen label is missing, the prompt is
left out of the accuracy and counted by `missing_choice_labels`, so a report can say how many were dropped.

Graded labels. A label may lie strictly between 0 and 1 (a judge's graded score, a share of unit tests
passed). It is read as the expected correctness of that answer:
- accuracy (routed, per target, best single, oracle, random, RouteLLM curves) averages the labels as they
  are, so accuracy is expected correctness;
- Brier and ECE compare P with the label as it is: the routers train on the labels as they are (BCE with soft
  targets), so P estimates the expected score and is scored against it;
- whatever needs two classes uses ONE binarisation rule, `binarise`: a label >= 0.5 (POSITIVE_THRESHOLD) is a
  positive (correct), anything below is a negative. ROC AUC (`per_target_auc`, the probes, refit's AUC) and
  the dataset statistics' "correct" counts use it.
On 0/1 labels all of these agree with the plain reading.

P-AUCCC (`p_auccc`), the area under the cost-coverage curve (NVIDIA's Model Router Toolkit reports it), is
defined on a router's operating points (cost_j, accuracy_j), j = 1..J, the utility-lambda sweep of one fold,
and a cost axis [c_lo, c_hi] (the harness uses the AIQ axis: the mean of each row's cheapest target to the
mean cost of the most expensive single target):
1. x_j = (cost_j - c_lo) / (c_hi - c_lo), clipped to [0, 1] (a point dearer than c_hi sits at x = 1);
2. points sorted by x; y_j = max of accuracy over points with x <= x_j (the running max: with a bigger budget
   a router can always use a cheaper operating point, so coverage never falls as cost grows);
3. the curve joins (x_j, y_j) by straight lines, is 0 left of the cheapest point (nothing is reachable
   there) and stays at its last value up to x = 1;
4. P-AUCCC = the area under it on [0, 1], which lies in [0, 1] (it is already divided by the x range).
Unlike AIQ it uses the running max of the points a router actually reaches, not their convex hull. When
c_hi == c_lo it is the best accuracy of the points costing at most c_hi (0 when there is none).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from prefill_router.errors import ConfigError, DataError

# the one AUC and the one binarisation rule: evaluation, probes and router training share them
# (re-exported, `as` marks it: the rule is documented in this module's docstring)
from prefill_router.utils import POSITIVE_THRESHOLD as POSITIVE_THRESHOLD
from prefill_router.utils import binarise as binarise
from prefill_router.utils import roc_auc

# ----------------------------------------------------------------------------------------------------------------
# input checks


def _matrix(name: str, a, k: int | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise DataError(f"{name} must be a 2-D array [N, K], got shape {a.shape}")
    if k is not None and a.shape[1] != k:
        raise DataError(f"{name} has {a.shape[1]} columns, expected {k}")
    return a


def _same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise DataError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _choice(choice, n: int, k: int) -> np.ndarray:
    choice = np.asarray(choice)
    if choice.shape != (n,):
        raise DataError(f"choice must have shape ({n},), got {choice.shape}")
    if choice.size and not np.issubdtype(choice.dtype, np.integer):
        if not np.all(np.equal(np.mod(choice, 1), 0)):
            raise DataError("choice must hold integer target indices")
        choice = choice.astype(np.int64)
    if choice.size and (choice.min() < 0 or choice.max() >= k):
        raise DataError(f"choice holds target indices outside [0, {k - 1}]")
    return choice.astype(np.int64)


def _picked(M: np.ndarray, choice: np.ndarray) -> np.ndarray:
    return M[np.arange(M.shape[0]), choice]


# ----------------------------------------------------------------------------------------------------------------
# prediction quality, per target


def per_target_auc(Y, P) -> np.ndarray:
    """[K] ROC AUC of P[:, k] against the label binarised by `binarise` (Y[:, k] >= 0.5 is a positive).

    Rows where Y[:, k] is NaN are skipped for that target; a target with one class only gets NaN.
    """
    Y = _matrix("Y", Y)
    P = _matrix("P", P)
    _same_shape("Y", Y, "P", P)
    return np.array([roc_auc(Y[:, k], P[:, k]) for k in range(Y.shape[1])])


def brier(Y, P) -> np.ndarray:
    """[K] Brier score per target: mean over labelled rows of (P[i, k] - Y[i, k])**2 (soft labels used as is).

    NaN for a target with no labelled rows.
    """
    Y = _matrix("Y", Y)
    P = _matrix("P", P)
    _same_shape("Y", Y, "P", P)
    sq = (P - Y) ** 2
    out = np.full(Y.shape[1], np.nan)
    for k in range(Y.shape[1]):
        col = sq[:, k][~np.isnan(sq[:, k])]
        if col.size:
            out[k] = col.mean()
    return out


def expected_calibration_error(Y, P, bins: int = 10) -> np.ndarray:
    """[K] expected calibration error per target with `bins` equal-width bins on [0, 1].

    ECE_k = sum over bins b of (n_b / n) * |mean(Y in b) - mean(P in b)|, over rows labelled for target k
    (soft labels used as is, so mean(Y in b) is the bin's expected correctness).
    A prediction p falls in bin min(floor(p * bins), bins - 1), so p = 1 lands in the last bin.
    """
    if int(bins) != bins or bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins!r}")
    Y = _matrix("Y", Y)
    P = _matrix("P", P)
    _same_shape("Y", Y, "P", P)
    out = np.full(Y.shape[1], np.nan)
    for k in range(Y.shape[1]):
        keep = ~(np.isnan(Y[:, k]) | np.isnan(P[:, k]))
        y, p = Y[keep, k], np.clip(P[keep, k], 0.0, 1.0)
        if not y.size:
            continue
        which = np.minimum((p * bins).astype(np.int64), bins - 1)
        total = 0.0
        for b in np.unique(which):
            in_b = which == b
            total += in_b.sum() / y.size * abs(y[in_b].mean() - p[in_b].mean())
        out[k] = total
    return out


# ----------------------------------------------------------------------------------------------------------------
# routing outcomes


def missing_choice_labels(Y, choice) -> int:
    """How many rows have a NaN label at their chosen target (these rows are left out of routed accuracy)."""
    Y = _matrix("Y", Y)
    return int(np.isnan(_picked(Y, _choice(choice, *Y.shape))).sum())


def routed_accuracy(Y, choice) -> float:
    """Mean of Y[i, choice[i]] over rows whose chosen label is present.

    Rows where the chosen target has no label (NaN) are excluded, not counted wrong; count them with
    `missing_choice_labels`. NaN when no row has a label.
    """
    Y = _matrix("Y", Y)
    got = _picked(Y, _choice(choice, *Y.shape))
    got = got[~np.isnan(got)]
    return float(got.mean()) if got.size else float("nan")


def routed_cost(C, choice) -> float:
    """Mean USD per query: mean of C[i, choice[i]] over rows whose chosen cost is known (NaN costs skipped)."""
    C = _matrix("C", C)
    got = _picked(C, _choice(choice, *C.shape))
    got = got[~np.isnan(got)]
    return float(got.mean()) if got.size else float("nan")


def routing_distribution(choice, K: int) -> np.ndarray:
    """[K] fraction of rows routed to each target."""
    choice = np.asarray(choice, dtype=np.int64)
    if choice.size and (choice.min() < 0 or choice.max() >= K):
        raise DataError(f"choice holds target indices outside [0, {K - 1}]")
    if not choice.size:
        return np.zeros(K)
    return np.bincount(choice, minlength=K) / choice.size


def target_accuracy(Y) -> np.ndarray:
    """[K] mean label per target over its labelled rows (NaN where a target has none)."""
    Y = _matrix("Y", Y)
    counts = (~np.isnan(Y)).sum(axis=0)
    sums = np.nansum(Y, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def target_cost(C) -> np.ndarray:
    """[K] mean USD per query per target over rows with a known cost (NaN where none is known)."""
    C = _matrix("C", C)
    counts = (~np.isnan(C)).sum(axis=0)
    sums = np.nansum(C, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def oracle(Y, C) -> tuple[float, float, np.ndarray]:
    """The per-query oracle: for each row, the cheapest target among those with the row's highest label.

    Missing labels are never chosen when a row has any label; a row with no label at all goes to its
    cheapest target (and, having no label, is left out of the accuracy). Unknown costs count as +inf when
    breaking ties. Returns (accuracy, mean cost in USD, choice[N]).
    """
    Y = _matrix("Y", Y)
    C = _matrix("C", C)
    _same_shape("Y", Y, "C", C)
    labels = np.where(np.isnan(Y), -np.inf, Y)
    best = labels.max(axis=1, initial=-np.inf)
    candidate = labels == best[:, None]
    candidate[~np.isfinite(best)] = True  # rows without any label: every target is a candidate
    # unknown costs rank after every known one but before non-candidates, so each row gets a valid index
    costs = np.where(np.isnan(C), np.finfo(np.float64).max, C)
    choice = np.argmin(np.where(candidate, costs, np.inf), axis=1).astype(np.int64)
    return routed_accuracy(Y, choice), routed_cost(C, choice), choice


def best_single(Y, C) -> tuple[int, float, float]:
    """The single target with the highest mean label (ties: lower mean cost, then lower index).

    Returns (index, its accuracy, its mean cost in USD) on these rows.
    """
    Y = _matrix("Y", Y)
    C = _matrix("C", C)
    _same_shape("Y", Y, "C", C)
    acc = target_accuracy(Y)
    cost = target_cost(C)
    if np.all(np.isnan(acc)):
        raise DataError("no target has any label, so there is no best single target")
    order = np.lexsort((np.arange(acc.size), np.nan_to_num(cost, nan=np.inf), -np.nan_to_num(acc, nan=-np.inf)))
    k = int(order[0])
    return k, float(acc[k]), float(cost[k])


def most_expensive(C) -> tuple[int, float]:
    """The target with the highest mean cost (ties: lower index). Returns (index, its mean cost in USD)."""
    cost = target_cost(C)
    if np.all(np.isnan(cost)):
        raise DataError("no target has a known cost")
    k = int(np.nanargmax(cost))
    return k, float(cost[k])


def random_router(Y, C) -> tuple[float, float]:
    """Expected (accuracy, mean cost in USD) of choosing a target uniformly at random for each row.

    Accuracy = mean of all labelled cells of Y (a random pick that lands on a missing label is excluded,
    as in `routed_accuracy`); cost = mean of all known cells of C.
    """
    Y = _matrix("Y", Y)
    C = _matrix("C", C)
    _same_shape("Y", Y, "C", C)
    acc = float(np.nanmean(Y)) if np.any(~np.isnan(Y)) else float("nan")
    cost = float(np.nanmean(C)) if np.any(~np.isnan(C)) else float("nan")
    return acc, cost


def gap_captured(router_acc: float, best_single_acc: float, oracle_acc: float) -> float:
    """(router acc - best single acc) / (oracle acc - best single acc); NaN when oracle equals best single."""
    denom = oracle_acc - best_single_acc
    if not np.isfinite(denom) or denom == 0:
        return float("nan")
    return float((router_acc - best_single_acc) / denom)


def cost_savings(router_cost: float, reference_cost: float) -> float:
    """1 - router cost / reference cost (0.74 = 74% cheaper); NaN when the reference costs nothing."""
    if not np.isfinite(reference_cost) or reference_cost == 0:
        return float("nan")
    return float(1.0 - router_cost / reference_cost)


def savings_vs_most_expensive(router_cost: float, C) -> float:
    """`cost_savings` against always calling the target with the highest mean cost on these rows."""
    return cost_savings(router_cost, most_expensive(C)[1])


def savings_vs_best_single(router_cost: float, Y, C) -> float:
    """`cost_savings` against always calling the best single target (by mean accuracy) on these rows."""
    return cost_savings(router_cost, best_single(Y, C)[2])


# ----------------------------------------------------------------------------------------------------------------
# RouteLLM two-model metrics (weak vs strong model, one score per prompt)


def _pair(y_weak, y_strong, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_weak = np.asarray(y_weak, dtype=np.float64).ravel()
    y_strong = np.asarray(y_strong, dtype=np.float64).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if not (y_weak.size == y_strong.size == score.size):
        raise DataError(f"y_weak, y_strong and score must have one entry per prompt; got "
                         f"{y_weak.size}, {y_strong.size}, {score.size}")
    keep = ~(np.isnan(y_weak) | np.isnan(y_strong) | np.isnan(score))
    if not keep.any():
        raise DataError("no prompt has both labels and a score")
    return y_weak[keep], y_strong[keep], score[keep]


def pgr(router_acc, weak_acc: float, strong_acc: float):
    """Performance gap recovered: (router acc - weak acc) / (strong acc - weak acc); NaN if strong == weak."""
    denom = strong_acc - weak_acc
    if denom == 0:
        return np.full_like(np.asarray(router_acc, dtype=np.float64), np.nan)[()]
    return (np.asarray(router_acc, dtype=np.float64) - weak_acc) / denom


def routellm_curve(y_weak, y_strong, score, num_results: int = 10) -> dict[str, np.ndarray]:
    """RouteLLM's threshold sweep: accuracy as a function of the fraction of calls sent to the strong model.

    Discretisation (routellm/evals/benchmarks.py): thresholds are the `num_results`-quantile bin edges of the
    scores (pandas qcut edges = linearly interpolated quantiles at 0, 1/num_results, ..., 1). At every edge but
    the last, a prompt goes to the strong model when score >= threshold; at the last (the maximum score) when
    score > threshold, so the sweep runs from 100% to 0% strong calls. Points are returned sorted by
    strong-call fraction, as RouteLLM sorts them before integrating (the order among equal fractions cannot
    change the integral). Unlike pandas' qcut, duplicate edges (many tied scores) are kept, not an error.

    Rows with a NaN label or score are dropped. Returns dict with `strong_fraction`, `accuracy`, `threshold`
    (arrays of num_results + 1 points), and `weak_accuracy`, `strong_accuracy` over the same rows.
    """
    if int(num_results) != num_results or num_results < 1:
        raise ConfigError(f"num_results must be a positive integer, got {num_results!r}")
    y_weak, y_strong, score = _pair(y_weak, y_strong, score)
    edges = np.quantile(score, np.linspace(0.0, 1.0, int(num_results) + 1))
    fractions, accs = [], []
    for i, t in enumerate(edges):
        strong = score >= t if i != len(edges) - 1 else score > t
        fractions.append(strong.mean())
        accs.append(np.where(strong, y_strong, y_weak).mean())
    order = np.argsort(np.asarray(fractions), kind="stable")
    return {
        "strong_fraction": np.asarray(fractions)[order],
        "accuracy": np.asarray(accs)[order],
        "threshold": edges[order],
        "weak_accuracy": float(y_weak.mean()),
        "strong_accuracy": float(y_strong.mean()),
    }


def apgr(y_weak, y_strong, score, num_results: int = 10) -> float:
    """Average performance gap recovered, as RouteLLM computes it.

    AUC = trapezoid integral of accuracy over strong-call fraction along `routellm_curve`; the weak and strong
    models' AUCs are their constant accuracies integrated over the same x range; APGR = (AUC - weak AUC) /
    (strong AUC - weak AUC). Since the sweep spans fractions 0 to 1 this equals the area under PGR(x) on [0, 1].
    """
    curve = routellm_curve(y_weak, y_strong, score, num_results)
    x, acc = curve["strong_fraction"], curve["accuracy"]
    width = x[-1] - x[0]
    auc = float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(x)))
    weak_auc = curve["weak_accuracy"] * width
    strong_auc = curve["strong_accuracy"] * width
    if strong_auc == weak_auc:
        return float("nan")
    return float((auc - weak_auc) / (strong_auc - weak_auc))


def cpt(y_weak, y_strong, score, pgr: float = 0.5, num_results: int = 10,
        rule: Literal["first_crossing", "routellm"] = "first_crossing") -> float:
    """Call-performance threshold: the fraction of strong-model calls needed to reach a given PGR.

    The target accuracy is weak + pgr * (strong - weak). On RouteLLM's sweep (`routellm_curve`), accuracy is
    linearly interpolated between points:
    - "first_crossing" (default): the smallest strong-call fraction at which the interpolated curve reaches
      the target; NaN if it never does.
    - "routellm": exactly RouteLLM's `np.interp(target, accuracy, strong_fraction)` on the points sorted by
      fraction. It equals "first_crossing" whenever accuracy rises with the fraction; otherwise np.interp
      (which assumes increasing x values) can return a point that is not a crossing. Kept for parity with
      RouteLLM's published numbers.
    Returns a fraction in [0, 1] (RouteLLM prints it as a percentage).
    """
    curve = routellm_curve(y_weak, y_strong, score, num_results)
    x, acc = curve["strong_fraction"], curve["accuracy"]
    target = curve["weak_accuracy"] + pgr * (curve["strong_accuracy"] - curve["weak_accuracy"])
    if rule == "routellm":
        return float(np.interp(target, acc, x))
    if rule != "first_crossing":
        raise ConfigError(f"rule must be 'first_crossing' or 'routellm', got {rule!r}")
    if acc[0] >= target:
        return float(x[0])
    for i in range(1, x.size):
        if acc[i] >= target:
            a0, a1 = acc[i - 1], acc[i]
            return float(x[i - 1] + (target - a0) / (a1 - a0) * (x[i] - x[i - 1]))
    return float("nan")


def routellm_summary(y_weak, y_strong, score, num_results: int = 10) -> dict[str, float]:
    """APGR and CPT(20%, 50%, 80%) with the weak and strong accuracies, all on the same rows."""
    curve = routellm_curve(y_weak, y_strong, score, num_results)
    out = {"weak_accuracy": curve["weak_accuracy"], "strong_accuracy": curve["strong_accuracy"],
           "apgr": apgr(y_weak, y_strong, score, num_results)}
    for level in (20, 50, 80):
        out[f"cpt{level}"] = cpt(y_weak, y_strong, score, level / 100, num_results)
    return out


# ----------------------------------------------------------------------------------------------------------------
# RouterBench AIQ


def _operating_points(costs, accs) -> tuple[np.ndarray, np.ndarray]:
    """(cost, accuracy) points as two float arrays, the points with a NaN left out; at least one must remain."""
    costs = np.asarray(costs, dtype=np.float64).ravel()
    accs = np.asarray(accs, dtype=np.float64).ravel()
    if costs.size != accs.size:
        raise DataError(f"costs has {costs.size} points but accs has {accs.size}")
    keep = ~(np.isnan(costs) | np.isnan(accs))
    costs, accs = costs[keep], accs[keep]
    if not costs.size:
        raise DataError("no (cost, accuracy) point without NaN")
    return costs, accs


def convex_hull(costs, accs) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing upper convex hull of (cost, accuracy) operating points, sorted by cost.

    These are the operating points worth having: mixing two of them at random realises any point on the
    segment between them, and no point is both more expensive and less accurate than another on the hull.
    The hull starts at the cheapest point (the most accurate of the cheapest) and ends at the cheapest of
    the most accurate points. NaN points are ignored.
    """
    costs, accs = _operating_points(costs, accs)
    order = np.lexsort((-accs, costs))  # by cost, then most accurate first
    # Pareto front: each kept point is strictly more accurate than every cheaper one
    front: list[tuple[float, float]] = []
    for i in order:
        if not front or accs[i] > front[-1][1]:
            front.append((costs[i], accs[i]))
    # upper hull (monotone chain): drop a middle point on or below the chord of its neighbours
    hull: list[tuple[float, float]] = []
    for c, a in front:
        while len(hull) >= 2:
            (c1, a1), (c2, a2) = hull[-2], hull[-1]
            if (c2 - c1) * (a - a1) - (a2 - a1) * (c - c1) >= 0:
                hull.pop()
            else:
                break
        hull.append((c, a))
    h = np.asarray(hull)
    return h[:, 0].copy(), h[:, 1].copy()


def aiq(costs, accs, cost_range: tuple[float, float] | None = None) -> float:
    """RouterBench's Average Improvement in Quality: area under the non-decreasing convex hull of the
    (cost, accuracy) points, integrated over [c_min, c_max] and divided by (c_max - c_min).

    By default [c_min, c_max] spans the points' own costs. Pass `cost_range` to compare several routers on
    one cost axis: beyond the hull's most expensive point the hull stays flat at its best accuracy (more
    budget never hurts), and below its cheapest point nothing is reachable, which counts as accuracy 0.
    With a single cost (c_min == c_max) the result is the hull's accuracy at that cost.
    """
    hc, ha = convex_hull(costs, accs)
    if cost_range is None:
        c = np.asarray(costs, dtype=np.float64)
        lo, hi = float(np.nanmin(c)), float(np.nanmax(c))
    else:
        lo, hi = map(float, cost_range)
        if not hi >= lo:
            raise ConfigError(f"cost_range must be (low, high) with high >= low, got {cost_range}")
    if hi == lo:
        return float(np.interp(lo, hc, ha)) if lo >= hc[0] else 0.0
    start = max(lo, hc[0])
    if start >= hi:
        return 0.0
    knots = np.concatenate([[start], hc[(hc > start) & (hc < hi)], [hi]])
    values = np.interp(knots, hc, ha)  # flat beyond the last hull point
    area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(knots)))
    return area / (hi - lo)


# ----------------------------------------------------------------------------------------------------------------
# P-AUCCC


def p_auccc(costs, accs, cost_range: tuple[float, float] | None = None) -> float:
    """P-AUCCC: the area under the monotone cost-coverage curve of (cost, accuracy) operating points, on a cost
    axis normalised to [0, 1]. See the module docstring for the exact definition.

    By default the axis spans the points' own costs; pass `cost_range` (c_lo, c_hi) to compare routers on one
    axis (the harness passes AIQ's). NaN points are ignored.
    """
    costs, accs = _operating_points(costs, accs)
    if cost_range is None:
        lo, hi = float(costs.min()), float(costs.max())
    else:
        lo, hi = map(float, cost_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi >= lo):
            raise ConfigError(f"cost_range must be finite (low, high) with high >= low, got {cost_range}")
    if hi == lo:
        affordable = accs[costs <= hi]
        return float(affordable.max()) if affordable.size else 0.0
    x = np.clip((costs - lo) / (hi - lo), 0.0, 1.0)
    order = np.argsort(x, kind="stable")
    x, y = x[order], np.maximum.accumulate(accs[order])
    # points that share an x keep the best accuracy among them (the running max already holds it at the last)
    last = np.append(x[1:] != x[:-1], True)
    x, y = x[last], y[last]
    # flat from the dearest point to x = 1; nothing (0) left of the cheapest one, so that part adds no area
    knots, values = np.append(x, 1.0), np.append(y, y[-1])
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(knots)))
