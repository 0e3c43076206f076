"""Per-target feature selection, leak-free: for each target, the feature view (one hidden state at one pooling)
and PCA size whose cross-validated AUC on the training rows is best, then a logistic regression on that view.

This is the recipe of NVIDIA's Model Router Toolkit, with the selection kept inside the training rows: the
selector is fitted on the rows it is given and nothing else, and its inner folds split those rows. The
alternative it is compared with is the SharedTrunkNet on every hidden state concatenated (one PCA, one
multi-output MLP); `bench/quality.py` reports both on the same outer folds.

    views       {name: [N, H]}, e.g. {"mean@6": ..., "last@18": ...}: the candidates
    pcas        PCA sizes tried on each view (the transform is fitted at the largest; PCA components are nested,
                so a smaller size reads the leading columns)
    choice      per target: the view and size with the best out-of-fold AUC over `folds` inner folds
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prefill_router.errors import ConfigError
from prefill_router.router.baselines import LogisticPredictor
from prefill_router.router.transform import FeatureTransform
from prefill_router.utils import roc_auc


@dataclass
class PerTargetSelector:
    """A predictor whose X is a dict of views, each [N, H] over the same rows (see the module docstring)."""

    pcas: tuple[int, ...] = (16, 64, 200)
    folds: int = 3
    C: float = 1.0
    seed: int = 0
    choices: list[dict] = field(default_factory=list)  # per target: {"view", "pca", "oof_auc"}
    _models: dict = field(default_factory=dict, repr=False)  # (view, pca) -> (transform, LogisticPredictor, targets)

    def _check(self, views: dict[str, np.ndarray]) -> int:
        if not views:
            raise ConfigError("per-target selection needs at least one feature view")
        sizes = {len(v) for v in views.values()}
        if len(sizes) != 1:
            raise ConfigError(f"feature views differ in rows: {sorted(sizes)}")
        return sizes.pop()

    def _fit_view(self, X: np.ndarray, Y: np.ndarray, pca: int, targets: list[int] | None = None):
        transform = FeatureTransform(dims=pca).fit(X, seed=self.seed)
        Z = transform.transform(X)
        return transform, LogisticPredictor(C=self.C).fit(Z, Y if targets is None else Y[:, targets])

    def scores(self, views: dict[str, np.ndarray], Y: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """Out-of-fold AUC per target [K] of every (view, PCA size), over inner folds of these rows only."""
        n = self._check(views)
        if self.folds < 2:
            raise ConfigError(f"per-target selection needs at least 2 inner folds, got {self.folds}")
        order = np.random.default_rng(self.seed).permutation(n)
        parts = np.array_split(order, self.folds)
        widest = max(self.pcas)
        out = {}
        for name, X in views.items():
            P = {d: np.full(Y.shape, np.nan) for d in self.pcas}
            for part in parts:
                rest = np.setdiff1d(order, part)
                transform = FeatureTransform(dims=widest).fit(X[rest], seed=self.seed)
                Z_rest, Z_part = transform.transform(X[rest]), transform.transform(X[part])
                for d in self.pcas:
                    P[d][part] = LogisticPredictor(C=self.C).fit(Z_rest[:, :d], Y[rest]).predict_proba(Z_part[:, :d])
            for d in self.pcas:
                out[(name, d)] = np.array([roc_auc(Y[:, k], P[d][:, k]) for k in range(Y.shape[1])])
        return out

    def fit(self, views: dict[str, np.ndarray], Y: np.ndarray) -> PerTargetSelector:
        Y = np.asarray(Y, dtype=np.float64)
        scored = self.scores(views, Y)
        candidates = list(scored)
        table = np.stack([scored[c] for c in candidates])  # [candidates, K]
        self.choices = []
        for k in range(Y.shape[1]):
            column = np.where(np.isfinite(table[:, k]), table[:, k], -np.inf)
            best = int(np.argmax(column))  # the first candidate among equals; all-NaN picks the first too
            self.choices.append({"view": candidates[best][0], "pca": int(candidates[best][1]),
                                 "oof_auc": float(table[best, k])})
        self._models = {}
        for key in dict.fromkeys((c["view"], c["pca"]) for c in self.choices):
            targets = [k for k, c in enumerate(self.choices) if (c["view"], c["pca"]) == key]
            transform, model = self._fit_view(views[key[0]], Y, key[1], targets)
            self._models[key] = (transform, model, targets)
        return self

    def predict_proba(self, views: dict[str, np.ndarray]) -> np.ndarray:
        if not self._models:
            raise ConfigError("the per-target selector is not fitted; call fit() on training rows first")
        n = self._check(views)
        P = np.full((n, len(self.choices)), np.nan)
        for (view, _), (transform, model, targets) in self._models.items():
            P[:, targets] = model.predict_proba(transform.transform(views[view]))
        return P
