"""Prefill-feature contenders for the k-fold harness: SharedTrunkNet and one logistic regression per target,
both on scaler+PCA features of the encoder's hidden states.

The harness gets row indices as X; the contenders hold features, labels and costs of every row and fit on
the rows the harness gives them. Each model is trained on ALL targets' labels of its training rows (the
multi-output trunk shares them; per-target logistic regressions are independent anyway) and read at a pool's
columns, so several target pools evaluated on the same folds reuse one fit per fold through a `FitCache`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from prefill_router.evaluate.harness import Contender
from prefill_router.router.baselines import LogisticPredictor
from prefill_router.router.per_target import PerTargetSelector
from prefill_router.router.transform import FeatureTransform, SourceTransform
from prefill_router.router.trunk import TrunkConfig, TrunkEnsemble


def _key(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else str(p).encode())
    return h.hexdigest()


@dataclass
class FitCache:
    """Fitted transforms and models shared by the contenders and pools of one set of folds."""

    store: dict = field(default_factory=dict)

    def get(self, key: str, make: Callable):
        if key not in self.store:
            self.store[key] = make()
        return self.store[key]


@dataclass
class PrefillSettings:
    pca: int | None = 200
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    logistic: bool = True
    # Column widths of several feature sources concatenated in X, each scaled and reduced on its own
    # (router.transform.SourceTransform); None: one source.
    sources: tuple[int, ...] | None = None


def prefill_contenders(X: np.ndarray, Y: np.ndarray, C: np.ndarray, cols: list[int], label: str,
                       settings: PrefillSettings, cache: FitCache) -> list[Contender]:
    """Contenders for the target pool `cols` (column indices into Y and C, which hold every target).

    X: [N, D] features of every row (hidden states already concatenated); `label` names the feature choice
    in the report rows, e.g. "mean-all".
    """
    pool = _Pool(X, Y, cols, label, settings, cache)
    rows = np.arange(len(Y))
    out = [Contender(f"prefill-trunk [{label}]", partial(_PoolTrunk, pool), rows)]
    if settings.logistic:
        out.append(Contender(f"prefill-logreg [{label}]", partial(_PoolLogistic, pool), rows))
    return out


def per_target_contender(views: dict[str, np.ndarray], Y: np.ndarray, cols: list[int], label: str,
                         selector: PerTargetSelector, cache: FitCache) -> Contender:
    """The per-target selection contender (router/per_target.py) for the pool `cols`: `views` hold every row's
    candidate features ({"mean@6": [N, H], ...}); each fit selects and trains on its training rows only, once
    per fold for every pool (through `cache`)."""
    return Contender(f"prefill-per-target [{label}]", partial(_PerTargetModel, views, Y, cols, label, selector, cache),
                     np.arange(len(Y)))


class _PerTargetModel:
    def __init__(self, views, Y, cols, label, selector: PerTargetSelector, cache: FitCache):
        self.views, self.Y, self.cols, self.label, self.selector, self.cache = views, Y, cols, label, selector, cache

    def fit(self, idx, Ytr):  # Ytr is the pool's columns; the selector learns every target's
        rows = np.asarray(idx)
        self.model = self.cache.get(_key("per-target", self.label, rows), lambda: replace(self.selector).fit(
            {name: X[rows] for name, X in self.views.items()}, self.Y[rows]))
        return self

    def predict_proba(self, idx):
        rows = np.asarray(idx)
        return self.model.predict_proba({name: X[rows] for name, X in self.views.items()})[:, self.cols]


@dataclass
class _Pool:
    """What the prefill contenders of one pool share: every row's features and all targets' labels, the
    pool's columns, the feature choice's label (part of every cache key) and the fit cache."""

    X: np.ndarray
    Y: np.ndarray
    cols: list[int]
    label: str
    settings: PrefillSettings
    cache: FitCache

    def features(self, rows: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
        """Scaler + PCA features of `rows`, the transform fitted on `fit_rows` (once per fold, cached)."""
        sources, dims = self.settings.sources, self.settings.pca
        transform = self.cache.get(_key("tf", self.label, fit_rows), lambda: (
            FeatureTransform(dims) if sources is None else SourceTransform(sources, dims)).fit(self.X[fit_rows]))
        return transform.transform(self.X[rows])


class _PoolModel:
    """A Predictor whose X is row indices: fits a model on all targets' labels of its training rows (cached
    under `kind`, so every pool reuses it) and predicts the pool's columns."""

    kind = ""

    def __init__(self, pool: _Pool):
        self.pool = pool

    def _new(self):
        raise NotImplementedError

    def fit(self, idx, Ytr):  # Ytr is the pool's columns; the model learns every target's
        self.rows = np.asarray(idx)
        pool = self.pool
        self.model = pool.cache.get(_key(self.kind, pool.label, self.rows),
                                    lambda: self._new().fit(pool.features(self.rows, self.rows), pool.Y[self.rows]))
        return self

    def predict_proba(self, idx):
        return self.model.predict_proba(self.pool.features(np.asarray(idx), self.rows))[:, self.pool.cols]


class _PoolTrunk(_PoolModel):
    kind = "trunk"

    def _new(self):
        return TrunkEnsemble(self.pool.settings.trunk)


class _PoolLogistic(_PoolModel):
    kind = "logreg"

    def _new(self):
        return LogisticPredictor()
