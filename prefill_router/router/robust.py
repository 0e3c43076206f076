"""A routing policy that stays safe with many weak, noisy targets.

With 28 targets, picking the argmax of noisy P(correct) estimates routes many prompts to targets that only
look best by chance, and the router ends up below the best single model. `RobustPolicy` guards against that
with three rules, all fitted on TRAINING rows only (out-of-fold predictions of the training rows):

1. Shrinkage to the prior (calibration). Per target k, with prior_k its training accuracy,
       P'_k = prior_k + alpha_k * (P_k - prior_k),   alpha_k in [0, 1]
   alpha_k is the least-squares (Brier-optimal) slope of (Y_k - prior_k) on (P_k - prior_k) over the
   out-of-fold rows, clipped to [0, 1]. A target whose predictions carry no signal gets alpha ~ 0, so its
   P' is its prior and it is never picked on noise.
2. Frontier pruning. Only targets on the training cost-accuracy Pareto frontier stay eligible: a target is
   dropped when another one is at least as accurate and at most as expensive on average (strictly better
   in one of the two).
3. A margin to leave the anchor. The anchor is the most accurate training target. With utility
   U_k = P'_k - lam * C_k / scale (scale: the row's most expensive cost, as in `UtilityPolicy`), the row
   goes to argmax U over eligible targets only if U_best >= U_anchor + margin; otherwise to the anchor.
   The margin is the value on a grid that maximises routed accuracy of the out-of-fold rows at lam = 0
   (ties: the larger margin, the more conservative router).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prefill_router.errors import ConfigError
from prefill_router.router.policy import scale_costs

DEFAULT_MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 1.0)


@dataclass
class RobustPolicy:
    prior: np.ndarray                # [K] training accuracy per target
    alpha: np.ndarray                # [K] shrinkage slope in [0, 1]
    eligible: np.ndarray             # [K] bool, on the training cost-accuracy frontier
    anchor: int                      # index of the most accurate training target
    margin: float = 0.0
    lam: float = 0.0
    cost_scale: float | None = None
    fit_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prior = np.asarray(self.prior, dtype=np.float64)
        self.alpha = np.asarray(self.alpha, dtype=np.float64)
        self.eligible = np.asarray(self.eligible, dtype=bool)
        k = len(self.prior)
        if self.alpha.shape != (k,) or self.eligible.shape != (k,):
            raise ConfigError(f"prior, alpha and eligible must all have {k} entries")
        if not 0 <= self.anchor < k or not self.eligible[self.anchor]:
            raise ConfigError(f"anchor {self.anchor} must be an eligible target index")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise ConfigError(f"robust policy lambda must be a finite number >= 0, got {self.lam!r}")
        if not np.isfinite(self.margin) or self.margin < 0:
            raise ConfigError(f"robust policy margin must be a finite number >= 0, got {self.margin!r}")

    def calibrate(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, dtype=np.float64)
        return self.prior + self.alpha * (P - self.prior)

    def with_lambda(self, lam: float) -> RobustPolicy:
        return RobustPolicy(self.prior, self.alpha, self.eligible, self.anchor, self.margin, float(lam),
                            self.cost_scale, dict(self.fit_info))

    def choose(self, P, C) -> np.ndarray:
        P = np.asarray(P, dtype=np.float64)
        C = np.asarray(C, dtype=np.float64)
        if P.ndim != 2 or P.shape[1] != len(self.prior) or C.shape != P.shape:
            raise ValueError(f"P and C must both be [N, {len(self.prior)}], got {P.shape} and {C.shape}")
        utility = self.calibrate(np.where(np.isnan(P), self.prior, P))
        if self.lam > 0:
            scaled = scale_costs(C, self.cost_scale)
            utility = utility - self.lam * scaled
        utility = np.where(self.eligible, utility, -np.inf)
        best = np.argmax(utility, axis=1)
        rows = np.arange(len(P))
        leave = utility[rows, best] >= utility[:, self.anchor] + self.margin
        return np.where(leave, best, self.anchor).astype(np.int64)

    def spec(self) -> str:
        return f"robust:{self.lam:g}"

    def to_dict(self) -> dict:
        return {"kind": "robust", "prior": self.prior.tolist(), "alpha": self.alpha.tolist(),
                "eligible": self.eligible.tolist(), "anchor": int(self.anchor), "margin": float(self.margin),
                "lam": float(self.lam), "cost_scale": self.cost_scale, "fit_info": self.fit_info}

    @classmethod
    def from_dict(cls, data: dict) -> RobustPolicy:
        try:
            return cls(np.asarray(data["prior"]), np.asarray(data["alpha"]), np.asarray(data["eligible"]),
                       int(data["anchor"]), float(data["margin"]), float(data.get("lam", 0.0)),
                       data.get("cost_scale"), dict(data.get("fit_info", {})))
        except KeyError as exc:
            raise ConfigError(f"robust policy is missing field {exc.args[0]!r}") from exc


def pareto_frontier(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Bool mask of targets no other target dominates (>= accuracy and <= cost, strictly better in one)."""
    accuracy, cost = np.asarray(accuracy, float), np.asarray(cost, float)
    keep = np.ones(len(accuracy), dtype=bool)
    for k in range(len(accuracy)):
        dominated = (accuracy >= accuracy[k]) & (cost <= cost[k]) & ((accuracy > accuracy[k]) | (cost < cost[k]))
        keep[k] = not dominated.any()
    return keep


def shrinkage_alpha(P: np.ndarray, Y: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Per target, the least-squares slope of (Y - prior) on (P - prior) over labelled rows, clipped to [0, 1]."""
    K = P.shape[1]
    alpha = np.zeros(K)
    for k in range(K):
        ok = np.isfinite(Y[:, k]) & np.isfinite(P[:, k])
        x, y = P[ok, k] - prior[k], Y[ok, k] - prior[k]
        denom = float(x @ x)
        alpha[k] = 0.0 if denom <= 0 else float(np.clip((x @ y) / denom, 0.0, 1.0))
    return alpha


def fit_robust_policy(P_oof: np.ndarray, Y: np.ndarray, C: np.ndarray, *, margins=DEFAULT_MARGINS,
                      lam: float = 0.0, cost_scale: float | None = None) -> RobustPolicy:
    """Fit every rule on training rows: P_oof are out-of-fold predictions for those rows, Y their labels,
    C their costs. Targets whose labels are all missing count as never correct."""
    P_oof, Y, C = (np.asarray(a, dtype=np.float64) for a in (P_oof, Y, C))
    if not (P_oof.shape == Y.shape == C.shape) or P_oof.ndim != 2:
        raise ValueError(f"P_oof, Y and C must share a [N, K] shape, got {P_oof.shape}, {Y.shape}, {C.shape}")
    import warnings

    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column is handled by nan_to_num
        prior = np.nan_to_num(np.nanmean(Y, axis=0), nan=0.0)
        mean_cost = np.nan_to_num(np.nanmean(C, axis=0), nan=np.inf)
    eligible = pareto_frontier(prior, mean_cost)
    anchor = int(np.argmax(np.where(eligible, prior, -np.inf)))
    alpha = shrinkage_alpha(P_oof, Y, prior)
    Yfilled = np.where(np.isnan(Y), 0.0, Y)
    rows = np.arange(len(Y))
    scores = []
    for m in margins:
        choice = RobustPolicy(prior, alpha, eligible, anchor, float(m), 0.0, cost_scale).choose(P_oof, C)
        scores.append(float(Yfilled[rows, choice].mean()))
    scores = np.asarray(scores)
    # Largest margin among the best: when accuracy is equal, route less.
    best = max(i for i in range(len(margins)) if scores[i] >= scores.max() - 1e-12)
    info = {"margins": [float(m) for m in margins], "oof_accuracy": scores.tolist(),
            "anchor_oof_accuracy": float(Yfilled[:, anchor].mean()), "eligible_targets": int(eligible.sum())}
    return RobustPolicy(prior, alpha, eligible, anchor, float(margins[best]), float(lam), cost_scale, info)


def out_of_fold_proba(X: np.ndarray, Y: np.ndarray, make_predictor, folds: int, seed: int = 0) -> np.ndarray:
    """P for every row from a fresh `make_predictor()` fitted on the other folds (rows split at random,
    seeded). This is what `fit_robust_policy` should be given for the training rows."""
    if folds < 2:
        raise ConfigError(f"out-of-fold predictions need at least 2 folds, got {folds}")
    order = np.random.default_rng(seed).permutation(len(X))
    P = np.full(np.shape(Y), np.nan)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        P[part] = make_predictor().fit(X[rest], Y[rest]).predict_proba(X[part])
    return P
