"""The fast fallback scorer: a decision for every request when the prefill cannot answer in time.

It predicts P(correct) for every target from features that cost well under a millisecond and run no
transformer layer: the token-embedding mean (hidden state 0 mean-pooled; features/embedding_mean.py computes it
from the tokenizer and the embedding table). The model is one L2-regularised logistic regression per target
(router/baselines.py `LogisticPredictor`), with its regularisation chosen by out-of-fold AUC on the training
rows. Prediction is one matrix product in NumPy: no torch, so it neither waits for nor disturbs the thread
that runs the encoder.

It is trained on the same rows as the main router, in the same call (`train_router`), and has its own default
policy, chosen the same way as the main one (`policy.choose_default_policy` on its out-of-fold predictions),
since its P are less sharp and the same cost weight would not keep the same accuracy. It lives in the same
checkpoint: its weights as `fallback.*` tensors, the rest in router.json's "fallback" entry. The embedding table
is not stored: it is read from the encoder's own files, which the checkpoint's encoder identity pins.
"""

from __future__ import annotations

import functools

import numpy as np

from prefill_router.errors import CheckpointError, ConfigError
from prefill_router.router.base import out_of_fold_proba
from prefill_router.router.baselines import LogisticPredictor
from prefill_router.router.policy import choose_default_policy, policy_from_spec
from prefill_router.utils import json_safe, roc_auc

# What the fallback reads: the mean of the input embeddings over the prompt's tokens (hidden state 0, mean).
EMBEDDING_MEAN = "embedding_mean"
# Regularisation strengths tried (scikit-learn's C: larger fits the training rows more closely).
C_GRID = (0.01, 0.1, 1.0)
DEFAULT_C = 0.1  # without folds to choose by
PREFIX = "fallback."


class FallbackScorer:
    """P[N, K] = sigmoid(X @ coef + intercept) for the targets that had two classes in training, the training
    prior for the others. X: token-embedding means [N, H]."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, fitted: np.ndarray, prior: np.ndarray, *,
                 policy: str, features: str = EMBEDDING_MEAN, metrics: dict | None = None):
        self.coef = np.asarray(coef, dtype=np.float64)             # [H, F]
        self.intercept = np.asarray(intercept, dtype=np.float64)   # [F]
        self.fitted = np.asarray(fitted, dtype=np.int64)           # [F] target indices with a model
        self.prior = np.asarray(prior, dtype=np.float64)           # [K]
        if features != EMBEDDING_MEAN:
            raise CheckpointError(f"fallback scorer: unknown features {features!r} (known: {EMBEDDING_MEAN})")
        if self.coef.ndim != 2 or self.coef.shape[1] != len(self.fitted) or len(self.intercept) != len(self.fitted):
            raise CheckpointError(f"fallback scorer: weights {self.coef.shape}, intercept {self.intercept.shape} "
                                  f"and {len(self.fitted)} fitted targets do not agree")
        if len(self.fitted) and (self.fitted.min() < 0 or self.fitted.max() >= len(self.prior)):
            raise CheckpointError(f"fallback scorer: fitted target indices outside 0..{len(self.prior) - 1}")
        self.features, self.policy, self.metrics = features, policy, metrics or {}
        policy_from_spec(policy)  # fail now on a bad default, not at the first request

    @property
    def n_targets(self) -> int:
        return len(self.prior)

    @property
    def width(self) -> int:
        return int(self.coef.shape[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        if X.shape[1] != self.width:
            raise ConfigError(f"fallback scorer: features of width {X.shape[1]}, trained on {self.width}")
        P = np.tile(self.prior, (len(X), 1))
        if len(self.fitted):
            P[:, self.fitted] = expit(X @ self.coef + self.intercept)
        return P

    def with_target(self, prior: float) -> FallbackScorer:
        """This scorer with one more target (`router.add_target`), which it knows only by its accuracy `prior`:
        the fallback has no features of the new target's labelled prompts to fit a model on."""
        return FallbackScorer(self.coef, self.intercept, self.fitted, np.append(self.prior, prior),
                              policy=self.policy, features=self.features, metrics=self.metrics)

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"{PREFIX}coef": self.coef, f"{PREFIX}intercept": self.intercept, f"{PREFIX}fitted": self.fitted,
                f"{PREFIX}prior": self.prior}

    def meta(self) -> dict:
        return {"features": self.features, "policy": {"default": self.policy}, "metrics": json_safe(self.metrics)}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> FallbackScorer:
        missing = [name for name in ("coef", "intercept", "fitted", "prior") if PREFIX + name not in arrays]
        if missing:
            raise CheckpointError(f"fallback scorer: tensors {[PREFIX + m for m in missing]} are missing")
        return cls(*(arrays[PREFIX + name] for name in ("coef", "intercept", "fitted", "prior")),
                   policy=meta["policy"]["default"], features=meta.get("features", EMBEDDING_MEAN),
                   metrics=meta.get("metrics"))


def fit_fallback(X: np.ndarray, Y: np.ndarray, C: np.ndarray, *, policy: str, priced: bool, folds: int,
                 max_accuracy_drop: float, seed: int = 0) -> FallbackScorer:
    """Fit the fallback scorer on training rows: X [N, H] token-embedding means, Y [N, K] labels (NaN: not run),
    C [N, K] costs. `policy`: "auto" (chosen on out-of-fold predictions as the main router's is; argmax when not
    `priced`) or a spec applied as given. With `folds` >= 2 the regularisation is the one of C_GRID with the best
    out-of-fold mean AUC."""
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    metrics: dict = {"features": EMBEDDING_MEAN, "train_rows": len(X), "feature_dim": int(X.shape[1])}
    P_oof = None
    strength = DEFAULT_C
    if folds >= 2:
        by_strength = {}
        for c in C_GRID:
            P = out_of_fold_proba(X, Y, functools.partial(LogisticPredictor, C=c), folds, seed)
            by_strength[c] = (_mean_auc(Y, P), P)
        # A NaN AUC (one class in every target) never wins.
        strength = max(C_GRID, key=lambda c: np.nan_to_num(by_strength[c][0], nan=-np.inf))
        P_oof = by_strength[strength][1]
        metrics["oof_mean_auc_by_c"] = {str(c): auc for c, (auc, _) in by_strength.items()}
        metrics["oof_auc"] = [json_safe(roc_auc(Y[:, k], P_oof[:, k])) for k in range(Y.shape[1])]
        metrics["oof_mean_auc"] = by_strength[strength][0]
    metrics["c"] = strength
    model = LogisticPredictor(C=strength).fit(X, Y)
    spec = policy.strip()
    if spec.lower() == "auto":
        if not priced:
            spec, metrics["default_policy"] = "argmax", {"rule": "argmax: no prices to trade against"}
        elif P_oof is None:
            raise ConfigError("policy: 'auto' needs calibration_folds >= 2 (out-of-fold predictions to choose the "
                              "fallback scorer's lambda on)")
        else:
            spec, metrics["default_policy"] = choose_default_policy(P_oof, Y, C, max_drop=max_accuracy_drop)
    return FallbackScorer(model.coef_, model.intercept_, model.fitted_, model.prior_, policy=spec, metrics=metrics)


def _mean_auc(Y: np.ndarray, P: np.ndarray) -> float:
    aucs = np.array([roc_auc(Y[:, k], P[:, k]) for k in range(Y.shape[1])], dtype=np.float64)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
