"""Routing policies: turn predicted P(correct)[N, K] and cost C[N, K] (USD) into one target index per row.

    ArgmaxPolicy()          the most likely target; ties go to the cheaper one
    TolerancePolicy(tol)    the cheapest target whose P is within `tol` of the row's best P
    UtilityPolicy(lam)      maximise P - lam * C / scale (scale: the row's most expensive target by default)
    FixedPolicy(k)          always target k (what a router falls back to when routing would lose accuracy)

`policy_from_spec("utility:0.3")` builds one from a short string (CLI, config, request model names).
`choose_default_policy` picks the policy a trained router uses by default: utility at the largest weight whose
smoothed accuracy on (out-of-fold) training rows stays within `max_drop` (one point by default) of the best
single target's, or that single target when routing loses more even at weight 0. `calibrate_lambda` picks
the weight that meets a budget or a traffic share instead.

Unknown costs (NaN) rank after every known cost; a target whose P is NaN is never chosen unless the whole
row is NaN, in which case the cheapest target is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from prefill_router.errors import ConfigError, DataError


def _inputs(P: ArrayLike, C: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    P = np.asarray(P, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    if P.ndim != 2:
        raise DataError(f"P must be a 2-D array [N, K], got shape {P.shape}")
    if C.shape != P.shape:
        raise DataError(f"C has shape {C.shape} but P has shape {P.shape}")
    return P, C


def _cheapest_among(candidate: np.ndarray, P: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Per row, the cheapest candidate; equal costs go to the higher P, then the lower index."""
    if not P.shape[0]:
        return np.zeros(0, dtype=np.int64)
    candidate = candidate.copy()
    candidate[~candidate.any(axis=1)] = True
    # unknown costs rank after every known cost, but still before non-candidates
    costs = np.where(candidate, np.where(np.isnan(C), np.finfo(np.float64).max, C), np.inf)
    tied = costs == costs.min(axis=1, keepdims=True)
    probs = np.where(np.isnan(P), np.finfo(np.float64).min, P)
    choice: np.ndarray = np.argmax(np.where(tied, probs, -np.inf), axis=1).astype(np.int64)
    return choice  # argmax: the first, i.e. lowest, index among ties


@dataclass(frozen=True)
class ArgmaxPolicy:
    """Pick the target with the highest P; exact ties go to the cheaper target."""

    def choose(self, P: ArrayLike, C: ArrayLike) -> np.ndarray:
        P, C = _inputs(P, C)
        probs = np.where(np.isnan(P), -np.inf, P)
        best = probs.max(axis=1, initial=-np.inf)
        return _cheapest_among(probs == best[:, None], P, C)

    def spec(self) -> str:
        return "argmax"


@dataclass(frozen=True)
class TolerancePolicy:
    """Pick the cheapest target whose P >= (row max P) - tol. tol = 0 is argmax; tol >= 1 is always-cheapest."""

    tol: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.tol) or self.tol < 0:
            raise ConfigError(f"tolerance must be a finite number >= 0, got {self.tol!r}")

    def choose(self, P: ArrayLike, C: ArrayLike) -> np.ndarray:
        P, C = _inputs(P, C)
        probs = np.where(np.isnan(P), -np.inf, P)
        best = probs.max(axis=1, initial=-np.inf)
        return _cheapest_among(probs >= best[:, None] - self.tol, P, C)

    def spec(self) -> str:
        return f"tolerance:{self.tol:g}"


@dataclass(frozen=True)
class UtilityPolicy:
    """Pick the target maximising P - lam * C / scale; ties go to the cheaper target.

    Why a scale: C is USD per query (often 1e-5 .. 1e-2), which would make raw lam values unreadable. By
    default scale is each row's most expensive known cost, so lam = 0.3 reads "calling the priciest target
    is worth 0.3 of a probability point"; lam = 0 is argmax and a large lam approaches always-cheapest.
    Pass `cost_scale` (USD) to use one fixed scale for every row instead (lam is then P per cost_scale USD).
    For a fixed row, the chosen cost never increases as lam grows, which `calibrate_lambda` relies on.
    """

    lam: float
    cost_scale: float | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.lam) or self.lam < 0:
            raise ConfigError(f"utility lambda must be a finite number >= 0, got {self.lam!r}")
        if self.cost_scale is not None and not (np.isfinite(self.cost_scale) and self.cost_scale > 0):
            raise ConfigError(f"cost_scale must be a positive number of USD, got {self.cost_scale!r}")

    def choose(self, P: ArrayLike, C: ArrayLike) -> np.ndarray:
        P, C = _inputs(P, C)
        scaled = scale_costs(C, self.cost_scale)
        probs = np.where(np.isnan(P), -np.inf, P)
        # lam * inf would be NaN at lam = 0; an unknown cost then simply does not count
        with np.errstate(invalid="ignore"):
            penalty = np.where(np.isinf(scaled), np.inf if self.lam > 0 else 0.0, self.lam * scaled)
        utility = probs - penalty
        best = utility.max(axis=1, initial=-np.inf)
        # a tiny slack so float rounding cannot split ties unpredictably
        return _cheapest_among(utility >= best[:, None] - 1e-12, P, C)

    def spec(self) -> str:
        return f"utility:{self.lam:g}"


@dataclass(frozen=True)
class FixedPolicy:
    """Always target k: the router's default when, on training rows, no routing kept the best single
    target's accuracy. A cost weight given per request (`router:<lambda>`) still routes."""

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or self.k < 0:
            raise ConfigError(f"fixed policy needs a target index >= 0, got {self.k!r}")

    def choose(self, P: ArrayLike, C: ArrayLike) -> np.ndarray:
        P, C = _inputs(P, C)
        if self.k >= P.shape[1]:
            raise ConfigError(f"fixed:{self.k} names target index {self.k}, but there are {P.shape[1]} targets")
        return np.full(P.shape[0], self.k, dtype=np.int64)

    def spec(self) -> str:
        return f"fixed:{self.k}"


# What policy_from_spec builds: each has choose(P, C) -> [N] target indices.
Policy = ArgmaxPolicy | TolerancePolicy | UtilityPolicy | FixedPolicy


def scale_costs(C: ArrayLike, cost_scale: float | None = None) -> np.ndarray:
    """C divided by `cost_scale`, or by each row's largest known cost when None. Unknown costs become +inf;
    a row with no known cost (or all zero) becomes all zeros, so its choice falls back to P alone."""
    C = np.asarray(C, dtype=np.float64)
    known = ~np.isnan(C)
    if cost_scale is None:
        scale = np.where(known, C, -np.inf).max(axis=1, initial=-np.inf)[:, None]
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)
    else:
        scale = float(cost_scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = C / scale
    out = np.where(known, out, np.inf)
    no_scale = np.isnan(np.broadcast_to(scale, C.shape)) if cost_scale is None else np.zeros(C.shape, bool)
    return np.where(no_scale, 0.0, out)


def policy_from_spec(spec: str) -> Policy:
    """Build a policy from "argmax", "tolerance:<tol>", "utility:<lambda>" (for example "utility:0.3") or
    "fixed:<target index>"."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"policy spec must be a non-empty string like 'argmax', 'tolerance:0.05' or "
                          f"'utility:0.3', got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name == "argmax":
        if arg.strip():
            raise ConfigError(f"policy 'argmax' takes no argument, got {spec!r}")
        return ArgmaxPolicy()
    if name in ("tolerance", "utility"):
        if not arg.strip():
            raise ConfigError(f"policy '{name}' needs a number after ':', e.g. '{name}:0.1'; got {spec!r}")
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(f"policy '{name}' argument must be a number, got {arg.strip()!r} in {spec!r}") from None
        return TolerancePolicy(value) if name == "tolerance" else UtilityPolicy(value)
    if name == "fixed":
        try:
            return FixedPolicy(int(arg))
        except ValueError:
            raise ConfigError(f"policy 'fixed' needs a target index, e.g. 'fixed:0'; got {spec!r}") from None
    raise ConfigError(f"unknown policy {name!r} in {spec!r}; known: argmax, tolerance:<tol>, utility:<lambda>, "
                      f"fixed:<target index>")


# The utility weights swept by calibration and by the evaluation's cost-quality curves.
DEFAULT_LAMBDAS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61)])


# How much accuracy the default ("auto") policy may give up against always calling the best single target, as a
# fraction (0.01: one point). At 0 a router trained on a few thousand prompts mostly falls back to that target:
# the flat top of the cost-accuracy curve, where savings are nearly free, sits within noise of the level.
DEFAULT_MAX_ACCURACY_DROP = 0.01


def choose_default_policy(P: ArrayLike, Y: ArrayLike, C: ArrayLike, *,
                          max_drop: float = DEFAULT_MAX_ACCURACY_DROP,
                          lambdas: Sequence[float] | None = None,
                          cost_scale: float | None = None) -> tuple[str, dict]:
    """The default policy of a trained router, as a spec, and facts about it on these rows.

    The level to keep is the accuracy of always calling the most accurate single target on these rows, less
    `max_drop` (a fraction: 0.01 is one point). The utility weight is swept over the grid; raising it never
    raises cost, and accuracy falls as it grows, but the measured curve is noisy: a single unlucky row can dip
    it below the level early, and a lucky stretch can lift it back later. So the curve is smoothed by a
    non-increasing isotonic fit (pool-adjacent-violators: each dip is averaged with its neighbours, not
    trusted alone), and the choice is the largest weight whose smoothed accuracy keeps the level. When even
    the smoothed curve starts below the level, the default is that single target ("fixed:<k>"): the router
    then costs what the best model costs, and loses nothing.

    Use out-of-fold (or held-out) predictions of TRAINING rows: in-sample P are overconfident. Y may hold NaN
    (not run); those pairs count in neither accuracy.
    """
    from sklearn.isotonic import IsotonicRegression

    P, C = _inputs(P, C)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.shape != P.shape or not P.shape[0]:
        raise ConfigError(f"Y has shape {Y.shape} but P has shape {P.shape} (and at least one row is needed)")
    if not 0 <= max_drop < 1:
        raise ConfigError(f"max_drop must be a fraction in [0, 1), got {max_drop!r}")
    grid = np.sort(DEFAULT_LAMBDAS if lambdas is None else np.asarray(lambdas, dtype=np.float64).ravel())
    labelled = np.isfinite(Y)
    # A target with no label on these rows cannot be the best single one.
    target_acc = np.where(labelled.any(axis=0), np.where(labelled, Y, 0).sum(axis=0) / np.maximum(
        labelled.sum(axis=0), 1), -np.inf)
    best = int(np.argmax(target_acc))
    level = float(target_acc[best]) - max_drop - 1e-12
    rows = np.arange(len(P))
    facts = {"rule": f"utility at the largest lambda whose smoothed accuracy keeps best-single accuracy - "
                     f"{max_drop:g} on out-of-fold training rows; else the best single target",
             "max_drop": max_drop, "best_single": best, "best_single_accuracy": float(target_acc[best]),
             "best_single_cost_per_query": _mean_known(C[:, best])}
    choices = [UtilityPolicy(float(lam), cost_scale).choose(P, C) for lam in grid]
    accuracy = np.array([_mean_known(Y[rows, choice]) for choice in choices])
    known = np.flatnonzero(np.isfinite(accuracy))
    smoothed = np.full(len(grid), -np.inf)
    if known.size:
        smoothed[known] = IsotonicRegression(increasing=False).fit_transform(known, accuracy[known])
    kept = np.flatnonzero(smoothed >= level)
    if not kept.size:
        return f"fixed:{best}", {**facts, "accuracy": facts["best_single_accuracy"],
                                 "cost_per_query": facts["best_single_cost_per_query"], "reached": False}
    i = int(kept[-1])
    lam = float(grid[i])
    return f"utility:{lam:g}", {**facts, "lambda": lam, "accuracy": float(accuracy[i]),
                                "smoothed_accuracy": float(smoothed[i]),
                                "cost_per_query": _mean_known(C[rows, choices[i]]), "reached": True}


def _mean_known(values: np.ndarray) -> float:
    """The mean of the non-NaN values (NaN: unknown), NaN when there are none, without nanmean's warning."""
    known = values[~np.isnan(values)]
    return float(known.mean()) if known.size else float("nan")


def _chosen_cost(P: np.ndarray, C: np.ndarray, lam: float, cost_scale: float | None) -> float:
    choice = UtilityPolicy(lam, cost_scale).choose(P, C)
    return _mean_known(C[np.arange(len(choice)), choice])


def _share(P: np.ndarray, C: np.ndarray, lam: float, cost_scale: float | None, target: int) -> float:
    return float(np.mean(UtilityPolicy(lam, cost_scale).choose(P, C) == target))


def calibrate_lambda(P_train: ArrayLike, C_train: ArrayLike, *, budget: float | None = None,
                     share: tuple[int, float] | None = None, cost_scale: float | None = None,
                     max_lambda: float = 1e9, iterations: int = 100) -> float:
    """The utility weight lam (see `UtilityPolicy`) meeting a constraint on training rows, by bisection.

    budget=<USD>: the smallest lam whose mean chosen cost per query is <= budget. Raises ConfigError when
        even always choosing each row's cheapest target costs more.
    share=(k, fraction): the smallest lam at which the fraction of rows routed to target k reaches
        `fraction` from the side lam = 0 starts on (<= fraction when raising lam moves traffic away from k,
        as for the most expensive target; >= fraction when it moves traffic towards k, as for the cheapest).
        This assumes that fraction moves one way as lam grows, true for the most and least expensive targets.
    Use only training rows here; apply the returned lam to held-out rows.
    """
    P, C = _inputs(P_train, C_train)
    if (budget is None) == (share is None):
        raise ConfigError("calibrate_lambda needs exactly one of budget=<USD per query> or "
                          "share=(target_index, fraction)")
    if not P.shape[0]:
        raise DataError("calibrate_lambda needs at least one training row")

    if budget is not None:
        if not np.isfinite(budget) or budget < 0:
            raise ConfigError(f"budget must be a finite USD amount >= 0, got {budget!r}")

        def met(lam: float) -> bool:
            return _chosen_cost(P, C, lam, cost_scale) <= budget

        floor = _chosen_cost(P, C, max_lambda, cost_scale)
        if not met(max_lambda):
            raise ConfigError(f"budget {budget:g} USD per query is below the cheapest achievable mean cost "
                              f"{floor:g} USD on these rows")
    else:
        try:
            assert share is not None  # exactly one of budget and share is given (checked above)
            k, fraction = int(share[0]), float(share[1])
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"share must be (target_index, fraction), got {share!r}") from None
        if not 0 <= k < P.shape[1]:
            raise ConfigError(f"share target index {k} is outside [0, {P.shape[1] - 1}]")
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"share fraction must be in [0, 1], got {fraction!r}")
        start = _share(P, C, 0.0, cost_scale, k)
        end = _share(P, C, max_lambda, cost_scale, k)
        falling = end <= start

        def met(lam: float) -> bool:
            s = _share(P, C, lam, cost_scale, k)
            return s <= fraction if falling else s >= fraction

        if not met(max_lambda):
            side = "at most" if falling else "at least"
            raise ConfigError(f"no lambda routes {side} {fraction:g} of rows to target {k}: its share moves "
                              f"from {start:g} (lambda 0) to {end:g} (lambda {max_lambda:g})")

    if met(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while not met(hi):  # grow geometrically before bisecting, so small lambdas keep their precision
        lo, hi = hi, hi * 4
        if hi >= max_lambda:
            hi = max_lambda
            break
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if met(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * max(hi, 1e-12):
            break
    return float(hi)
