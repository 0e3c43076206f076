"""The predictor contract every router model and baseline follows (scikit-learn's estimator shape).

    predictor.fit(X, Y)            X: [N, D] float features (or row indices for the oracle), Y: [N, K] in [0,1] or NaN
    predictor.predict_proba(X)     -> [N, K] float, P(target k answers prompt i correctly)

Missing labels (NaN) are ignored when fitting, never treated as wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    def fit(self, X: np.ndarray, Y: np.ndarray) -> Predictor: ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Policy(Protocol):
    """Turns predicted P[N, K] and estimated cost C[N, K] (USD) into one chosen target index per row."""

    def choose(self, P: np.ndarray, C: np.ndarray) -> np.ndarray: ...


def out_of_fold_proba(X: np.ndarray, Y: np.ndarray, make_predictor: Callable[[], Predictor], folds: int,
                      seed: int = 0) -> np.ndarray:
    """P for every row from a fresh `make_predictor()` fitted on the other folds (rows split at random,
    seeded): honest predictions of training rows, for choosing a policy's operating point on them."""
    from prefill_router.errors import ConfigError

    if folds < 2:
        raise ConfigError(f"out-of-fold predictions need at least 2 folds, got {folds}")
    order = np.random.default_rng(seed).permutation(len(X))
    P = np.full(np.shape(Y), np.nan)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        P[part] = make_predictor().fit(X[rest], Y[rest]).predict_proba(X[part])
    return P
