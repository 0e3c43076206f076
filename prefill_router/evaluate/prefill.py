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
from dataclasses import dataclass, field

import numpy as np

from prefill_router.evaluate.harness import Contender
from prefill_router.router.baselines import LogisticPredictor
from prefill_router.router.transform import FeatureTransform
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


def prefill_contenders(X: np.ndarray, Y: np.ndarray, C: np.ndarray, cols: list[int], label: str,
                       settings: PrefillSettings, cache: FitCache) -> list[Contender]:
    """Contenders for the target pool `cols` (column indices into Y and C, which hold every target).

    X: [N, D] features of every row (hidden states already concatenated); `label` names the feature choice
    in the report rows, e.g. "mean-all".
    """
    trunk_cfg = settings.trunk

    def transform(rows):
        return cache.get(_key("tf", label, rows), lambda: FeatureTransform(settings.pca).fit(X[rows]))

    def Z(rows, fit_rows):
        return transform(fit_rows).transform(X[rows])

    class _Fitted:
        def fit(self, idx, Ytr):
            self.rows = np.asarray(idx)
            self.model = self._fit()
            return self

        def predict_proba(self, idx):
            return self.model.predict_proba(Z(np.asarray(idx), self.rows))[:, cols]

    class Trunk(_Fitted):
        def _fit(self):
            return cache.get(_key("trunk", label, self.rows),
                             lambda: TrunkEnsemble(trunk_cfg).fit(Z(self.rows, self.rows), Y[self.rows]))

    class Logistic(_Fitted):
        def _fit(self):
            return cache.get(_key("logreg", label, self.rows),
                             lambda: LogisticPredictor().fit(Z(self.rows, self.rows), Y[self.rows]))

    rows = np.arange(len(Y))
    out = [Contender(f"prefill-trunk [{label}]", Trunk, rows)]
    if settings.logistic:
        out.append(Contender(f"prefill-logreg [{label}]", Logistic, rows))
    return out
