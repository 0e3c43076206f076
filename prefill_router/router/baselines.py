"""Baseline predictors behind the same `fit(X, Y) / predict_proba(X) -> [N, K]` contract as the router.

Y is [N, K] with values in [0, 1] and NaN where target k was not run on prompt i. A NaN label is ignored when
fitting, never counted as a wrong answer. Graded labels in (0, 1) are used as they are, never binarised, as
the router trunk uses them: kNN averages them, the logistic and MLP predictors take them as cross-entropy
targets, so every predictor estimates the expected score.

- RandomPredictor, ConstantPredictor, PriorPredictor: no use of X at all (floors).
- OraclePredictor: X is row indices into the full label matrix; returns the true labels (the ceiling).
- KNNPredictor, LogisticPredictor, MLPPredictor: learn from prompt embeddings (semantic-embedding routers).
- TfidfLogisticPredictor: learns from the raw prompt strings.
"""

from __future__ import annotations

import numpy as np

from prefill_router.errors import ConfigError, DataError

# Rows scored at once by kNN: bounds the [rows, train] similarity block held in memory.
_KNN_CHUNK = 1024


def check_labels(Y, n_rows: int | None = None) -> np.ndarray:
    """Y as float [N, K]; raise naming the problem when it is not a label matrix in [0, 1] (NaN allowed)."""
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise DataError(f"labels Y must be 2-D [prompts, targets], got shape {Y.shape}")
    if n_rows is not None and Y.shape[0] != n_rows:
        raise DataError(f"labels Y has {Y.shape[0]} rows but X has {n_rows}")
    seen = Y[~np.isnan(Y)]
    if seen.size and (seen.min() < 0 or seen.max() > 1):
        raise DataError(f"labels must lie in [0, 1] (or be NaN), found values in [{seen.min()}, {seen.max()}]")
    return Y


def check_features(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"{name} must be 2-D [prompts, features], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return X


def label_prior(Y: np.ndarray) -> np.ndarray:
    """Mean label per target over labelled rows; a target with no labels gets the mean of all labels."""
    counts = (~np.isnan(Y)).sum(0)
    overall = float(np.nanmean(Y)) if counts.sum() else 0.5
    sums = np.nansum(Y, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), overall)


class _Fitted:
    """Shared guard: predict before fit is a clear error, not an AttributeError."""

    n_targets_: int

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_targets_"):
            raise RuntimeError(f"{type(self).__name__}.predict_proba called before fit")


class RandomPredictor(_Fitted):
    """Uniform random probabilities: the floor any router must beat."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, X, Y) -> RandomPredictor:
        self.n_targets_ = check_labels(Y).shape[1]
        self._rng = np.random.default_rng(self.seed)
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        return self._rng.random((len(X), self.n_targets_))


class ConstantPredictor(_Fitted):
    """"Always target k": probability 1 for target k and 0 for the others, whatever the prompt."""

    def __init__(self, k: int):
        self.k = k

    def fit(self, X, Y) -> ConstantPredictor:
        n_targets = check_labels(Y).shape[1]
        if not 0 <= self.k < n_targets:
            raise ConfigError(f"ConstantPredictor: k={self.k} is not a target index in [0, {n_targets})")
        self.n_targets_ = n_targets
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        P = np.zeros((len(X), self.n_targets_))
        P[:, self.k] = 1.0
        return P


class PriorPredictor(_Fitted):
    """Each target's training accuracy, the same for every prompt."""

    def fit(self, X, Y) -> PriorPredictor:
        Y = check_labels(Y)
        self.prior_ = label_prior(Y)
        self.n_targets_ = Y.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        return np.tile(self.prior_, (len(X), 1))


class OraclePredictor(_Fitted):
    """Knows the answers: X holds row indices into Y_all and the true labels come back (the upper bound).

    A missing label (NaN) comes back as 0: a target that was never run cannot be credited with a correct answer.
    """

    def __init__(self, Y_all):
        self.Y_all = check_labels(Y_all)

    def fit(self, X, Y) -> OraclePredictor:
        self.n_targets_ = self.Y_all.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        rows = np.asarray(X).reshape(len(X), -1)[:, 0]
        if not np.issubdtype(rows.dtype, np.integer):
            if not np.all(np.mod(rows, 1) == 0):
                raise DataError("OraclePredictor expects X to hold integer row indices into Y_all")
            rows = rows.astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.Y_all)):
            raise DataError(f"OraclePredictor: row index out of range [0, {len(self.Y_all)})")
        return np.nan_to_num(self.Y_all[rows], nan=0.0)


class KNNPredictor(_Fitted):
    """Mean label of the k nearest training prompts, per target, among the prompts that target has a label for.

    metric: "cosine" (similarity of the vectors) or "euclidean". The search is exact (brute force), so adding
    rows whose label for a target is NaN never changes that target's prediction. `threads` caps BLAS threads.
    """

    def __init__(self, k: int = 20, metric: str = "cosine", threads: int | None = 1):
        if k < 1:
            raise ConfigError(f"KNNPredictor: k must be >= 1, got {k}")
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"KNNPredictor: metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.k, self.metric, self.threads = k, metric, threads

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.maximum(norms, 1e-12)
        return X

    def fit(self, X, Y) -> KNNPredictor:
        X = check_features(X)
        Y = check_labels(Y, len(X))
        self.X_ = self._prepare(X).astype(np.float32)
        self.Y_ = Y
        self.prior_ = label_prior(Y)
        self.n_targets_ = Y.shape[1]
        return self

    def _scores(self, Q: np.ndarray) -> np.ndarray:
        """Higher = closer, [len(Q), n_train]."""
        if self.metric == "cosine":
            return Q @ self.X_.T
        sq = (Q * Q).sum(1)[:, None] - 2 * Q @ self.X_.T + (self.X_ * self.X_).sum(1)[None, :]
        return -sq

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        with _threads(self.threads):
            return self._predict(self._prepare(check_features(X)).astype(np.float32))

    def _predict(self, Q: np.ndarray) -> np.ndarray:
        labelled = ~np.isnan(self.Y_)
        # Targets labelled on the same rows share one neighbour search (with complete labels: all of them).
        by_mask: dict[bytes, list[int]] = {}
        for t in range(self.n_targets_):
            by_mask.setdefault(np.packbits(labelled[:, t]).tobytes(), []).append(t)
        out = np.empty((len(Q), self.n_targets_))
        for start in range(0, len(Q), _KNN_CHUNK):
            scores = self._scores(Q[start:start + _KNN_CHUNK])
            block = slice(start, start + len(scores))
            for targets in by_mask.values():
                cols = np.flatnonzero(labelled[:, targets[0]])
                if len(cols) == 0:
                    out[block, targets] = self.prior_[targets]
                    continue
                k = min(self.k, len(cols))
                s = scores if len(cols) == scores.shape[1] else scores[:, cols]
                if k < len(cols):
                    nearest = cols[np.argpartition(-s, k - 1, axis=1)[:, :k]]
                else:
                    nearest = np.broadcast_to(cols, (len(s), len(cols)))
                out[block, targets] = self.Y_[nearest][:, :, targets].mean(1)
        return out


def _threads(threads: int | None):
    """Cap BLAS/OpenMP and torch CPU threads (None: leave as they are).

    These fits are many small steps; on a thread pool that other processes also use they run an order of
    magnitude slower than on one thread.
    """
    import contextlib

    if not threads:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def limited():
        import torch
        from threadpoolctl import threadpool_limits

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(limits=threads):
                yield
        finally:
            torch.set_num_threads(before)

    return limited()


class _PerTargetLogistic(_Fitted):
    """One L2-regularised logistic regression per target, on the rows where that target has a label.

    Per target t this minimises scikit-learn's objective, C * sum_i BCE(y_it, sigmoid(x_i . w_t + b_t))
    + |w_t|^2 / 2 over t's labelled rows (soft labels y in [0, 1] enter the cross-entropy as they are; the
    intercept is not penalised). The objectives of different targets share no parameter, so all targets are
    solved at once, with one L-BFGS (scipy's, as scikit-learn uses) over a [features, targets] weight matrix:
    one matrix product per step instead of one solver per target.

    With `scale`, target t's features are standardised on t's labelled rows (as a StandardScaler fitted on
    them would); the fitted model is folded back to raw features, so prediction is X @ coef_ + intercept_.
    A target whose labels hold a single class (or none) predicts its prior.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-6, threads: int | None = 1):
        if not C > 0:
            raise ConfigError(f"C must be > 0, got {C}")
        if max_iter < 1:
            raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
        self.C, self.max_iter, self.tol, self.threads = C, max_iter, tol, threads

    def _fit_targets(self, X, Y: np.ndarray, *, scale: bool) -> None:
        """X: dense ndarray or scipy sparse matrix [N, D]. scale: per-target standardisation (dense only)."""
        with _threads(self.threads):
            self._solve(X, Y, scale)

    def _solve(self, X, Y: np.ndarray, scale: bool) -> None:
        import scipy.sparse as sp
        from scipy.optimize import minimize
        from scipy.special import expit

        self.prior_ = label_prior(Y)
        self.n_targets_ = Y.shape[1]
        d = X.shape[1]
        mask = ~np.isnan(Y)
        y = np.nan_to_num(Y, nan=0.0)
        two_class = np.array([(y[mask[:, t], t] > 0).any() and (y[mask[:, t], t] < 1).any()
                              for t in range(Y.shape[1])], dtype=bool)
        self.fitted_ = np.flatnonzero(two_class)
        self.coef_ = np.zeros((d, len(self.fitted_)))
        self.intercept_ = np.zeros(len(self.fitted_))
        if not len(self.fitted_):
            return
        m, y = mask[:, self.fitted_].astype(np.float64), y[:, self.fitted_]
        n_labelled = int((m.sum(1) > 0).sum())  # rows without any label change nothing, the scale included

        if scale:  # mean and std of each feature over each target's labelled rows: [D, K]
            counts = m.sum(0)
            mu = (X.T @ m) / counts
            var = np.maximum((X * X).T @ m / counts - mu * mu, 0.0)
            sd = np.sqrt(var)
            sd[sd < 1e-12] = 1.0  # constant feature: leave it unscaled, as StandardScaler does
        else:
            mu, sd = np.zeros((d, len(self.fitted_))), np.ones((d, len(self.fitted_)))

        if sp.issparse(X):
            X = X.tocsr()
        k = len(self.fitted_)
        p0 = np.clip(self.prior_[self.fitted_], 1e-6, 1 - 1e-6)

        def unpack(theta):
            W = theta[:d * k].reshape(d, k)  # weights on standardised features
            V = W / sd  # the same weights on raw features
            return W, V, theta[d * k:] - (mu * V).sum(0)

        def objective(theta):
            W, V, c = unpack(theta)
            z = np.asarray(X @ V) + c
            bce = np.logaddexp(0.0, z) - y * z
            # divided by the row count: same minimiser, gradients of order one whatever the data size
            loss = (self.C * (bce * m).sum() + 0.5 * (W * W).sum()) / n_labelled
            G = self.C * m * (expit(z) - y) / n_labelled  # d loss / d logits
            g_c = G.sum(0)
            g_V = np.asarray(X.T @ G) - mu * g_c
            return loss, np.concatenate([(g_V / sd + W / n_labelled).ravel(), g_c])

        theta0 = np.concatenate([np.zeros(d * k), np.log(p0 / (1 - p0))])
        result = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter, "gtol": self.tol})
        self.converged_ = bool(result.success)
        _, self.coef_, self.intercept_ = unpack(result.x)

    def _predict_targets(self, X) -> np.ndarray:
        from scipy.special import expit

        out = np.tile(self.prior_, (X.shape[0], 1))
        if len(self.fitted_):
            with _threads(self.threads):
                out[:, self.fitted_] = expit(np.asarray(X @ self.coef_) + self.intercept_)
        return out


class LogisticPredictor(_PerTargetLogistic):
    """Per target: features standard-scaled on that target's labelled rows, then L2-regularised logistic regression."""

    def fit(self, X, Y) -> LogisticPredictor:
        X = check_features(X)
        self._fit_targets(X, check_labels(Y, len(X)), scale=True)
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        return self._predict_targets(check_features(X))


class TfidfLogisticPredictor(_PerTargetLogistic):
    """X is an array of prompt strings: TF-IDF of word uni- and bigrams, then one logistic regression per target."""

    def __init__(self, C: float = 1.0, max_features: int = 20_000, ngram_range: tuple[int, int] = (1, 2),
                 min_df: int = 1, max_iter: int = 1000, tol: float = 1e-6, threads: int | None = 1):
        super().__init__(C=C, max_iter=max_iter, tol=tol, threads=threads)
        self.max_features, self.ngram_range, self.min_df = max_features, tuple(ngram_range), min_df

    @staticmethod
    def _texts(X) -> list[str]:
        texts = list(np.asarray(X, dtype=object).reshape(-1))
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise DataError(f"TfidfLogisticPredictor expects prompt strings; X[{bad[0]}] is "
                            f"{type(texts[bad[0]]).__name__}")
        return texts

    def fit(self, X, Y) -> TfidfLogisticPredictor:
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = self._texts(X)
        Y = check_labels(Y, len(texts))
        self.vectorizer_ = TfidfVectorizer(max_features=self.max_features, ngram_range=self.ngram_range,
                                           min_df=self.min_df, sublinear_tf=True)
        self._fit_targets(self.vectorizer_.fit_transform(texts).tocsr(), Y, scale=False)
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        return self._predict_targets(self.vectorizer_.transform(self._texts(X)))


class MLPPredictor(_Fitted):
    """A small multi-output MLP on embeddings: one sigmoid output per target, masked binary cross-entropy.

    Inputs are standard-scaled on the training rows. A random `val_fraction` of the training rows is held
    out for early stopping (the weights of the best validation epoch are kept). Seeded: the same data and
    seed give the same model. `threads` caps torch's intra-op threads while fitting and predicting: a net
    this small runs several times faster on one thread than on a contended pool (None = torch's setting).
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 1e-4,
                 epochs: int = 200, batch_size: int = 256, patience: int = 10, val_fraction: float = 0.1,
                 seed: int = 0, threads: int | None = 1):
        for name, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size),
                            ("patience", patience)):
            if value < 1:
                raise ConfigError(f"MLPPredictor: {name} must be >= 1, got {value}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"MLPPredictor: dropout must be in [0, 1), got {dropout}")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"MLPPredictor: val_fraction must be in (0, 1), got {val_fraction}")
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.epochs, self.batch_size, self.patience = epochs, batch_size, patience
        self.val_fraction, self.seed, self.threads = val_fraction, seed, threads

    @staticmethod
    def _masked_bce(logits, y, mask):
        import torch

        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)

    def fit(self, X, Y) -> MLPPredictor:
        with _threads(self.threads):
            return self._fit(X, Y)

    def _fit(self, X, Y) -> MLPPredictor:
        import torch

        X = check_features(X)
        Y = check_labels(Y, len(X))
        keep = ~np.isnan(Y).all(1)  # rows with no label at all teach nothing
        X, Y = X[keep], Y[keep]
        if len(X) < 2:
            raise DataError(f"MLPPredictor needs at least 2 labelled rows, got {len(X)}")
        self.mean_, self.std_ = X.mean(0), X.std(0) + 1e-6
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(X))
        n_val = max(1, int(round(self.val_fraction * len(X))))
        val, train = order[:n_val], order[n_val:]
        if len(train) == 0:
            train = val

        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        to_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        Xs = to_t((X - self.mean_) / self.std_)
        Yt, Mt = to_t(np.nan_to_num(Y, nan=0.0)), to_t(~np.isnan(Y))
        self.net_ = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], self.hidden), torch.nn.GELU(), torch.nn.Dropout(self.dropout),
            torch.nn.Linear(self.hidden, self.hidden), torch.nn.GELU(), torch.nn.Dropout(self.dropout),
            torch.nn.Linear(self.hidden, Y.shape[1]))
        optimiser = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        train_t, val_t = torch.as_tensor(train), torch.as_tensor(val)
        best, best_state, since_best = float("inf"), None, 0
        for _ in range(self.epochs):
            self.net_.train()
            perm = train_t[torch.randperm(len(train_t), generator=gen)]
            for start in range(0, len(perm), self.batch_size):
                rows = perm[start:start + self.batch_size]
                loss = self._masked_bce(self.net_(Xs[rows]), Yt[rows], Mt[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            self.net_.eval()
            with torch.no_grad():
                val_loss = float(self._masked_bce(self.net_(Xs[val_t]), Yt[val_t], Mt[val_t]))
            if val_loss < best - 1e-6:
                best, since_best = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in self.net_.state_dict().items()}
            else:
                since_best += 1
                if since_best >= self.patience:
                    break
        if best_state is not None:
            self.net_.load_state_dict(best_state)
        self.net_.eval()
        self.best_val_loss_ = best
        self.n_targets_ = Y.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        import torch

        self._check_fitted()
        X = check_features(X)
        with _threads(self.threads), torch.no_grad():
            logits = self.net_(torch.as_tensor((X - self.mean_) / self.std_, dtype=torch.float32))
        return torch.sigmoid(logits).numpy().astype(np.float64)
