"""Cost-quality sweeps: run a policy over a grid of its parameter and record accuracy and cost at each point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefill_router.errors import ConfigError, DataError
from prefill_router.evaluate import metrics
from prefill_router.router.policy import DEFAULT_LAMBDAS, TolerancePolicy, UtilityPolicy

# lam = 0 is argmax; with costs scaled by each row's priciest target, lam around 1e2..1e3 is always-cheapest
# tol = 0 is argmax; tol = 1 is always-cheapest
DEFAULT_TOLERANCES = np.linspace(0.0, 1.0, 51)

# accuracies within this of a level count as reaching it (float sums of 0/1 labels are not exact)
_ACCURACY_SLACK = 1e-12


@dataclass
class OperatingPoint:
    """One point of a curve: the policy parameter and the accuracy and mean USD cost it gives."""

    param: float
    accuracy: float
    cost: float
    index: int


@dataclass
class Curve:
    """A policy swept over a parameter grid, all arrays indexed by grid point.

    params: lam (utility) or tol (tolerance); accuracy: routed accuracy; cost: mean USD per query;
    distribution[G, K]: share of rows routed to each target; missing[G]: rows whose chosen label is NaN.
    """

    policy: str
    params: np.ndarray
    accuracy: np.ndarray
    cost: np.ndarray
    distribution: np.ndarray
    missing: np.ndarray

    def hull(self) -> tuple[np.ndarray, np.ndarray]:
        """The non-decreasing convex hull (costs, accuracies) of the curve's points."""
        return metrics.convex_hull(self.cost, self.accuracy)

    def aiq(self, cost_range: tuple[float, float] | None = None) -> float:
        """RouterBench AIQ of the curve's points (see `metrics.aiq`)."""
        return metrics.aiq(self.cost, self.accuracy, cost_range)

    def p_auccc(self, cost_range: tuple[float, float] | None = None) -> float:
        """P-AUCCC, the area under the curve's monotone cost-coverage curve (see `metrics.p_auccc`)."""
        return metrics.p_auccc(self.cost, self.accuracy, cost_range)

    def to_dict(self) -> dict:
        hc, ha = self.hull()
        return {"policy": self.policy, "params": self.params.tolist(), "accuracy": self.accuracy.tolist(),
                "cost": self.cost.tolist(), "distribution": self.distribution.tolist(),
                "missing": self.missing.tolist(), "hull_cost": hc.tolist(), "hull_accuracy": ha.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Curve:
        return cls(d["policy"], np.asarray(d["params"], float), np.asarray(d["accuracy"], float),
                   np.asarray(d["cost"], float), np.asarray(d["distribution"], float),
                   np.asarray(d["missing"], int))


def make_policy(policy: str, param: float, cost_scale: float | None = None):
    """The policy named `policy` ("utility" or "tolerance") at parameter `param`."""
    if policy == "utility":
        return UtilityPolicy(float(param), cost_scale)
    if policy == "tolerance":
        return TolerancePolicy(float(param))
    raise ConfigError(f"policy must be 'utility' or 'tolerance' for a sweep, got {policy!r}")


def cost_quality_curve(P, Y, C, policy: str = "utility", grid=None,
                       cost_scale: float | None = None) -> Curve:
    """Sweep `policy` over `grid` (default DEFAULT_LAMBDAS or DEFAULT_TOLERANCES) on rows P, Y, C.

    The policy sees only P and C; Y scores the choices. `cost_scale` is passed to UtilityPolicy.
    """
    P = np.asarray(P, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    if not (P.shape == Y.shape == C.shape) or P.ndim != 2:
        raise DataError(f"P, Y and C must share one [N, K] shape; got {P.shape}, {Y.shape}, {C.shape}")
    if grid is None:
        grid = DEFAULT_LAMBDAS if policy == "utility" else DEFAULT_TOLERANCES
    grid = np.asarray(grid, dtype=np.float64).ravel()
    if not grid.size:
        raise ConfigError("the sweep grid is empty")
    k = P.shape[1]
    acc, cost, dist, missing = [], [], [], []
    for value in grid:
        choice = make_policy(policy, value, cost_scale).choose(P, C)
        acc.append(metrics.routed_accuracy(Y, choice))
        cost.append(metrics.routed_cost(C, choice))
        dist.append(metrics.routing_distribution(choice, k))
        missing.append(metrics.missing_choice_labels(Y, choice))
    return Curve(policy, grid, np.asarray(acc), np.asarray(cost), np.asarray(dist).reshape(grid.size, k),
                 np.asarray(missing, dtype=np.int64))


def cheapest_point_reaching(curve: Curve, accuracy: float) -> OperatingPoint | None:
    """The cheapest operating point of `curve` whose accuracy is >= `accuracy` (ties: the larger parameter,
    i.e. the thriftier setting); None when no point reaches it."""
    ok = np.flatnonzero(curve.accuracy >= accuracy - _ACCURACY_SLACK)
    if not ok.size:
        return None
    i = int(ok[np.lexsort((-curve.params[ok], curve.cost[ok]))[0]])
    return OperatingPoint(float(curve.params[i]), float(curve.accuracy[i]), float(curve.cost[i]), i)
