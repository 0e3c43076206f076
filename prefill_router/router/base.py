"""The predictor contract every router model and baseline follows (scikit-learn's estimator shape).

    predictor.fit(X, Y)            X: [N, D] float features (or row indices for the oracle), Y: [N, K] in [0,1] or NaN
    predictor.predict_proba(X)     -> [N, K] float, P(target k answers prompt i correctly)

Missing labels (NaN) are ignored when fitting, never treated as wrong.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    def fit(self, X: np.ndarray, Y: np.ndarray) -> "Predictor": ...

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Policy(Protocol):
    """Turns predicted P[N, K] and estimated cost C[N, K] (USD) into one chosen target index per row."""

    def choose(self, P: np.ndarray, C: np.ndarray) -> np.ndarray: ...
