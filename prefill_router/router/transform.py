"""Feature transform: pick hidden states, flatten, standardise, project with PCA.

Fitted on training rows only. The fitted state is plain arrays (mean, scale, components, explained
variance) so a checkpoint stores it in safetensors, and transforming is two matrix operations:

    x   = features[:, layers, :].reshape(N, -1)          # chosen hidden states, concatenated
    z   = (x - mean) / scale                              # StandardScaler; scale = 1 where a dim is constant
    out = (z - pca_mean) @ components.T                   # PCA to `dims` components (none when dims is None)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prefill_router.errors import CheckpointError, ConfigError


def select_hidden_states(features: np.ndarray, available: list[int] | None, wanted: list[int] | None) -> np.ndarray:
    """Take the hidden states `wanted` (hidden-state indices, e.g. [18] or [0, 6, 12]) out of a [N, L, H] array
    whose layer axis holds `available`. None for `wanted` keeps every available state; None for `available`
    means the layer axis is 0..L-1."""
    features = np.asarray(features)
    if features.ndim != 3:
        raise ConfigError(f"features must be [N, hidden_states, hidden], got shape {features.shape}")
    available = list(range(features.shape[1])) if available is None else [int(a) for a in available]
    if len(available) != features.shape[1]:
        raise ConfigError(f"features hold {features.shape[1]} hidden states but {len(available)} are listed")
    if wanted is None:
        return features
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ConfigError(f"layers: hidden state(s) {missing} not in the features (they hold {available})")
    return features[:, [available.index(w) for w in wanted], :]


@dataclass
class FeatureTransform:
    """StandardScaler then PCA over flattened hidden states. `dims=None` skips PCA."""

    dims: int | None = 200
    mean: np.ndarray | None = None         # [D]
    scale: np.ndarray | None = None        # [D]
    pca_mean: np.ndarray | None = None     # [D] (zero up to rounding after scaling; kept for exactness)
    components: np.ndarray | None = None   # [d, D]
    explained_variance: np.ndarray | None = None  # [d]
    input_shape: tuple[int, ...] = field(default_factory=tuple)  # per-row shape seen at fit, e.g. (6, 576)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @property
    def output_dim(self) -> int:
        self._check_fitted()
        return int(self.components.shape[0]) if self.components is not None else int(self.mean.shape[0])

    def fit(self, X: np.ndarray, *, seed: int = 0) -> FeatureTransform:
        X = np.asarray(X)
        self.input_shape = tuple(int(s) for s in X.shape[1:])
        flat = X.reshape(len(X), -1).astype(np.float64)
        if len(flat) < 2:
            raise ConfigError(f"need at least 2 training rows to fit the feature transform, got {len(flat)}")
        if not np.isfinite(flat).all():
            raise ConfigError("features contain NaN or infinite values (unfinished rows in the feature store?)")
        self.mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        self.scale = np.where(std > 1e-12, std, 1.0)
        z = (flat - self.mean) / self.scale
        if self.dims is None:
            self.pca_mean = self.components = self.explained_variance = None
        else:
            if self.dims < 1:
                raise ConfigError(f"pca: must be >= 1 or None, got {self.dims}")
            d = min(self.dims, z.shape[0], z.shape[1])
            from sklearn.decomposition import PCA

            # Randomized SVD keeps all-layer inputs (tens of thousands of dims) practical; fixed seed = deterministic.
            solver = "randomized" if min(z.shape) > 4 * d else "full"
            pca = PCA(n_components=d, svd_solver=solver, random_state=seed).fit(z)
            self.pca_mean = pca.mean_
            self.components = pca.components_
            self.explained_variance = pca.explained_variance_
        # Store float32: the MLP runs in float32 and checkpoints stay small.
        for name in ("mean", "scale", "pca_mean", "components", "explained_variance"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.ascontiguousarray(value, dtype=np.float32))
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = np.asarray(X, dtype=np.float32)
        flat = X.reshape(len(X), -1)
        if flat.shape[1] != self.mean.shape[0]:
            raise ConfigError(f"features have per-row shape {tuple(X.shape[1:])}, the transform was fitted on "
                              f"{self.input_shape}")
        # Computed with torch rather than NumPy: right after an encoder forward, torch's OpenMP threads are
        # still spinning on the cores, and NumPy's OpenBLAS threads would fight them (measured for one
        # prompt on 2 cores: 4.4 ms through NumPy, 0.35 ms through torch). Same float32 arithmetic.
        import torch

        if not flat.flags.writeable:  # a read-only memory map; torch wants memory it may own
            flat = flat.copy()
        with torch.inference_mode():
            mean, scale, pca_mean, components = self._tensors()
            z = (torch.from_numpy(flat) - mean) / scale
            if components is None:
                return z.numpy()
            return ((z - pca_mean) @ components.T).numpy()

    def _tensors(self):
        """The fitted arrays as torch tensors sharing their memory (no copy), rebuilt when they change."""
        import torch

        arrays = (self.mean, self.scale, self.pca_mean, self.components)
        cached = getattr(self, "_tensor_of", None)
        if cached is None or any(a is not b for a, b in zip(cached, arrays)):
            self._as_tensors = tuple(None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                                     for a in arrays)
            self._tensor_of = arrays
        return self._as_tensors

    def fit_transform(self, X: np.ndarray, *, seed: int = 0) -> np.ndarray:
        return self.fit(X, seed=seed).transform(X)

    # -- persistence as plain arrays -------------------------------------------------------------
    def state_arrays(self, prefix: str = "transform.") -> dict[str, np.ndarray]:
        self._check_fitted()
        out = {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale}
        if self.components is not None:
            out.update({f"{prefix}pca_mean": self.pca_mean, f"{prefix}components": self.components,
                        f"{prefix}explained_variance": self.explained_variance})
        return out

    def meta(self) -> dict:
        return {"dims": self.dims, "input_shape": list(self.input_shape)}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray], prefix: str = "transform.") -> FeatureTransform:
        try:
            t = cls(dims=meta["dims"], input_shape=tuple(meta["input_shape"]))
            t.mean, t.scale = arrays[f"{prefix}mean"], arrays[f"{prefix}scale"]
            if t.dims is not None:
                t.pca_mean = arrays[f"{prefix}pca_mean"]
                t.components = arrays[f"{prefix}components"]
                t.explained_variance = arrays[f"{prefix}explained_variance"]
        except KeyError as exc:
            raise CheckpointError(f"feature transform state lacks {exc.args[0]!r}") from exc
        return t

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ConfigError("the feature transform is not fitted; call fit() on training rows first")


@dataclass
class SourceTransform:
    """Several feature sources side by side (two encoders, or prefill states and a sentence embedding): each
    source's columns get their own FeatureTransform, so one source's scale or width cannot crowd the other's
    components out of a joint PCA; the reduced blocks are concatenated.

    widths: the number of flattened columns of each source, in order (they sum to the row width)."""

    widths: tuple[int, ...]
    dims: int | None = 200
    parts: list[FeatureTransform] = field(default_factory=list)

    def _blocks(self, X: np.ndarray) -> list[np.ndarray]:
        flat = np.asarray(X).reshape(len(X), -1)
        if flat.shape[1] != sum(self.widths):
            raise ConfigError(f"features have {flat.shape[1]} columns, the sources' widths {list(self.widths)} "
                              f"sum to {sum(self.widths)}")
        edges = np.cumsum((0, *self.widths))
        return [flat[:, a:b] for a, b in zip(edges[:-1], edges[1:])]

    def fit(self, X: np.ndarray, *, seed: int = 0) -> SourceTransform:
        self.parts = [FeatureTransform(self.dims).fit(block, seed=seed) for block in self._blocks(X)]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if not self.parts:
            raise ConfigError("the source transform is not fitted; call fit() on training rows first")
        return np.concatenate([part.transform(block) for part, block in zip(self.parts, self._blocks(X))], axis=1)

    def fit_transform(self, X: np.ndarray, *, seed: int = 0) -> np.ndarray:
        return self.fit(X, seed=seed).transform(X)

    @property
    def output_dim(self) -> int:
        return sum(part.output_dim for part in self.parts)

    # -- persistence: each part's arrays under its own prefix ---------------------------------------------------
    def state_arrays(self, prefix: str = "transform.") -> dict[str, np.ndarray]:
        if not self.parts:
            raise ConfigError("the source transform is not fitted; call fit() on training rows first")
        return {k: v for i, part in enumerate(self.parts) for k, v in part.state_arrays(f"{prefix}{i}.").items()}

    def meta(self) -> dict:
        return {"widths": list(self.widths), "dims": self.dims, "parts": [part.meta() for part in self.parts]}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray], prefix: str = "transform.") -> SourceTransform:
        try:
            parts = [FeatureTransform.from_state(m, arrays, f"{prefix}{i}.") for i, m in enumerate(meta["parts"])]
            t = cls(widths=tuple(int(w) for w in meta["widths"]), dims=meta["dims"], parts=parts)
        except KeyError as exc:
            raise CheckpointError(f"source transform state lacks {exc.args[0]!r}") from exc
        if len(t.parts) != len(t.widths):
            raise CheckpointError(f"source transform has {len(t.parts)} parts for {len(t.widths)} sources")
        return t


def transform_from_state(meta: dict, arrays: dict[str, np.ndarray]) -> FeatureTransform | SourceTransform:
    """The transform a checkpoint holds: one source's, or several sources' (meta with "parts")."""
    return (SourceTransform if "parts" in meta else FeatureTransform).from_state(meta, arrays)
