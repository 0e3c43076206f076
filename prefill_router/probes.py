"""Layer probes: how well each hidden state of the encoder separates the prompts a target gets right from
the ones it gets wrong, and how many directions the hidden state really uses. Training rows only.

Exact definitions (X: the [N, H] pooled features of one hidden state; y: 1 = the target answered correctly):

* Fisher separability J (full form). Project X onto its top `p` principal components (PCA fitted on all
  labelled training rows of the layer, centred, not scaled). With class means mu_1, mu_0, class covariances
  S_1, S_0 (maximum likelihood) and class sizes n_1, n_0:
      S_w  = (n_1 S_1 + n_0 S_0) / (n_1 + n_0)                       pooled within-class covariance
      S_w' = (1 - g) S_w + g (trace(S_w) / p) I                        shrinkage g (default 0.1)
      J    = (mu_1 - mu_0)^T S_w'^-1 (mu_1 - mu_0)
  For two classes with identity covariance and no shrinkage J is the squared distance of the means.
* Fisher separability, diagonal form. In the full feature space, per dimension d:
      J_diag = mean_d (mu_1d - mu_0d)^2 / (s_1d^2 + s_0d^2)
* Effective dimensionality of the layer (all training rows, not per target), from the eigenvalues l_i of the
  covariance of X:
      d_eff       = (sum_i l_i)^2 / sum_i l_i^2                        participation ratio
      d_eff_ent   = exp(-sum_i q_i log q_i),  q_i = l_i / sum_j l_j     exponential of the spectral entropy
  Isotropic data of rank r gives r for both.
* Outlier dimensions: a few dimensions of a transformer's residual stream carry activations orders of
  magnitude above the rest ("massive activations"); on raw features they own the covariance, so raw J and
  d_eff measure them, not the signal. A dimension is an outlier when its standard deviation over the training
  rows exceeds `outlier_ratio` (default 10) times the median dimension's. The report names them.
* Standardized probes: the same J (full form) and d_eff computed after z-scoring every dimension on the
  training rows (d_eff then reads the correlation spectrum), and "clean" ones on the raw features with the
  outlier dimensions removed. Each is reported beside the raw one, with its own rank agreement.
* Probe AUC: k-fold cross-validated ROC AUC of a logistic regression per target. Inside each fold, a
  StandardScaler and a PCA (to `probe_pca` components) are fitted on that fold's training part only; the
  AUC is computed on the pooled out-of-fold scores.
* Agreement of the two rankings: Spearman correlation, across hidden states, of mean J and mean probe AUC.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from prefill_router.errors import ConfigError
from prefill_router.utils import binarise, markdown_table, roc_auc


# ---------------------------------------------------------------------------------------------------------
# the measures
# ---------------------------------------------------------------------------------------------------------
def _pca_basis(X: np.ndarray, p: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean [H], components [p, H]) of X's top p principal directions (all when p is None)."""
    mean = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    return mean, vt if p is None else vt[:p]


def fisher_j(X: np.ndarray, y: np.ndarray, *, n_components: int | None = 50, shrinkage: float = 0.1,
             basis: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Full Fisher separability J in the top-`n_components` PCA space (see the module docstring)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    if not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage must be in [0, 1], got {shrinkage}")
    mean, comps = basis if basis is not None else _pca_basis(X, n_components)
    Z = (X - mean) @ comps.T
    z1, z0 = Z[y], Z[~y]
    delta = z1.mean(axis=0) - z0.mean(axis=0)
    s1 = np.cov(z1, rowvar=False, bias=True).reshape(Z.shape[1], Z.shape[1])
    s0 = np.cov(z0, rowvar=False, bias=True).reshape(Z.shape[1], Z.shape[1])
    sw = (len(z1) * s1 + len(z0) * s0) / len(Z)
    p = sw.shape[0]
    sw = (1 - shrinkage) * sw + shrinkage * (np.trace(sw) / p) * np.eye(p)
    return float(delta @ np.linalg.lstsq(sw, delta, rcond=None)[0])


def fisher_diag(X: np.ndarray, y: np.ndarray) -> float:
    """Diagonal Fisher separability: mean over dimensions of (mu_1 - mu_0)^2 / (s_1^2 + s_0^2)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    num = (X[y].mean(axis=0) - X[~y].mean(axis=0)) ** 2
    den = X[y].var(axis=0) + X[~y].var(axis=0)
    ok = den > 0
    return float(np.mean(np.where(ok, num / np.where(ok, den, 1.0), 0.0)))


def outlier_dimensions(X: np.ndarray, ratio: float = 10.0) -> np.ndarray:
    """Indices of the dimensions whose standard deviation exceeds `ratio` times the median dimension's,
    largest first (see the module docstring)."""
    std = np.asarray(X, dtype=np.float64).std(axis=0)
    median = float(np.median(std))
    if median <= 0:
        return np.flatnonzero(std > 0)
    out = np.flatnonzero(std > ratio * median)
    return out[np.argsort(-std[out])]


def standardize(X: np.ndarray) -> np.ndarray:
    """Every dimension z-scored over these rows (constant dimensions left at 0)."""
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)


def covariance_spectrum(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    if X.shape[1] <= X.shape[0]:
        lam = np.linalg.eigvalsh(Xc.T @ Xc / max(len(X) - 1, 1))
    else:  # fewer rows than dims: the Gram matrix has the same non-zero spectrum, and is smaller
        lam = np.linalg.eigvalsh(Xc @ Xc.T / max(len(X) - 1, 1))
    return np.clip(lam[::-1], 0.0, None)


def effective_dimensionality(X: np.ndarray) -> tuple[float, float]:
    """(participation ratio, exp of spectral entropy) of X's covariance spectrum."""
    lam = covariance_spectrum(X)
    total = lam.sum()
    if total <= 0:
        return 0.0, 0.0
    pr = total ** 2 / float((lam ** 2).sum())
    q = lam[lam > 0] / total
    return float(pr), float(np.exp(-(q * np.log(q)).sum()))


def probe_auc(X: np.ndarray, Y: np.ndarray, *, folds: int = 3, probe_pca: int | None = 64, C: float = 1.0,
              seed: int = 0) -> np.ndarray:
    """Cross-validated ROC AUC per target of a logistic probe; scaler and PCA fitted inside each fold.
    Y [N, K] with NaN = missing; returns [K] (NaN where a target has one class)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(X))
    scores = np.full(Y.shape, np.nan)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        mean, std = X[rest].mean(axis=0), X[rest].std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)
        Zr, Zp = (X[rest] - mean) / std, (X[part] - mean) / std
        if probe_pca is not None and probe_pca < Zr.shape[1]:
            with np.errstate(invalid="ignore", divide="ignore"):  # a constant layer has zero total variance
                pca = PCA(n_components=min(probe_pca, len(rest)), svd_solver="randomized",
                          random_state=seed).fit(Zr)
            Zr, Zp = pca.transform(Zr), pca.transform(Zp)
        for k in range(Y.shape[1]):
            ok = np.isfinite(Y[rest, k])
            labels = binarise(Y[rest, k][ok])
            if labels.all() or not labels.any():
                continue
            model = LogisticRegression(C=C, max_iter=1000).fit(Zr[ok], labels)
            scores[part, k] = model.decision_function(Zp)
    return np.array([roc_auc(Y[:, k], scores[:, k]) for k in range(Y.shape[1])])


# ---------------------------------------------------------------------------------------------------------
# per-layer reports
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """Every probe of one (pooling, hidden state). Per-target values are keyed by target name."""

    pooling: str
    hidden_state: int
    d_eff: float
    d_eff_entropy: float
    fisher_j: dict[str, float] = field(default_factory=dict)
    fisher_diag: dict[str, float] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)
    outliers: list[int] = field(default_factory=list)  # outlier dimensions, largest first
    d_eff_std: float = float("nan")    # participation ratio of the standardized features (correlation spectrum)
    d_eff_clean: float = float("nan")  # participation ratio of the raw features without the outlier dimensions
    fisher_j_std: dict[str, float] = field(default_factory=dict)
    fisher_j_clean: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _mean(values: dict[str, float]) -> float:
        v = np.array(list(values.values()), dtype=np.float64)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else float("nan")

    @property
    def mean_j(self) -> float:
        return self._mean(self.fisher_j)

    @property
    def mean_j_std(self) -> float:
        return self._mean(self.fisher_j_std)

    @property
    def mean_j_clean(self) -> float:
        return self._mean(self.fisher_j_clean)

    @property
    def mean_j_diag(self) -> float:
        return self._mean(self.fisher_diag)

    @property
    def mean_auc(self) -> float:
        return self._mean(self.auc)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_j": self.mean_j, "mean_j_diag": self.mean_j_diag, "mean_auc": self.mean_auc,
                "mean_j_std": self.mean_j_std, "mean_j_clean": self.mean_j_clean}


def probe_layer(X: np.ndarray, Y: np.ndarray, targets: Sequence[str], *, pooling: str, hidden_state: int,
                n_components: int = 50, shrinkage: float = 0.1, cv_folds: int = 3, probe_pca: int | None = 64,
                with_auc: bool = True, seed: int = 0, outlier_ratio: float = 10.0) -> LayerReport:
    """All probes of one hidden state. X [N, H] training rows only; Y [N, K] (NaN = missing)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    d_eff, d_ent = effective_dimensionality(X)
    report = LayerReport(pooling, int(hidden_state), d_eff, d_ent)
    outliers = outlier_dimensions(X, outlier_ratio)
    report.outliers = [int(i) for i in outliers]
    views = {"raw": X, "std": standardize(X), "clean": np.delete(X, outliers, axis=1)}
    report.d_eff_std = effective_dimensionality(views["std"])[0]
    report.d_eff_clean = effective_dimensionality(views["clean"])[0]
    # The PCA bases come from every training row; rows without a target's label only shape the basis.
    bases = {view: _pca_basis(V, n_components) for view, V in views.items()}
    js = {"raw": report.fisher_j, "std": report.fisher_j_std, "clean": report.fisher_j_clean}
    for k, name in enumerate(targets):
        ok = np.isfinite(Y[:, k])
        y = binarise(Y[ok, k])
        for view, V in views.items():
            js[view][name] = fisher_j(V[ok], y, shrinkage=shrinkage, basis=bases[view])
        report.fisher_diag[name] = fisher_diag(X[ok], y)
    if with_auc:
        aucs = probe_auc(X, Y, folds=cv_folds, probe_pca=probe_pca, seed=seed)
        report.auc = {name: float(a) for name, a in zip(targets, aucs)}
    return report


def run_probes(features, Y: np.ndarray, targets: Sequence[str], train_rows, *,
               poolings: Sequence[str] | None = None, hidden_states: dict[str, Sequence[int]] | None = None,
               n_components: int = 50, shrinkage: float = 0.1, cv_folds: int = 3, probe_pca: int | None = 64,
               seed: int = 0, progress: bool = True) -> list[LayerReport]:
    """Probe every hidden state of every pooling on `train_rows`.

    features: a FeatureSet (`.get(pooling, layers)`, `.hidden_states` per pooling) or a dict
    pooling -> array [N, L, H] (then `hidden_states[pooling]` names the layer axis; 0..L-1 when absent).
    """
    rows = np.asarray(train_rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    if isinstance(features, dict):
        arrays = features
        held = {p: list(hidden_states[p]) if hidden_states and p in hidden_states else
                list(range(np.asarray(a).shape[1])) for p, a in arrays.items()}
    else:
        arrays, held = None, dict(features.hidden_states)
    poolings = list(poolings or held)
    unknown = [p for p in poolings if p not in held]
    if unknown:
        raise ConfigError(f"poolings: {unknown} not in the features (they hold {sorted(held)})")
    jobs = [(p, h) for p in poolings for h in held[p]]
    reports = []
    for pooling, state in tqdm(jobs, desc="probing layers", disable=not progress):
        if arrays is not None:
            X = np.asarray(arrays[pooling])[rows, held[pooling].index(state)]
        else:
            X = features.get(pooling, [state], rows=rows)[:, 0]
        reports.append(probe_layer(X, Y[rows], targets, pooling=pooling, hidden_state=state,
                                   n_components=n_components, shrinkage=shrinkage, cv_folds=cv_folds,
                                   probe_pca=probe_pca, seed=seed))
    return reports


# ---------------------------------------------------------------------------------------------------------
# layer selection
# ---------------------------------------------------------------------------------------------------------
def rank_agreement(reports: Sequence[LayerReport], j: str = "mean_j") -> dict[str, float]:
    """Per pooling, the Spearman correlation across hidden states of a J (`mean_j`, `mean_j_std`,
    `mean_j_clean`) and mean probe AUC."""
    from scipy.stats import spearmanr

    out = {}
    for pooling in dict.fromkeys(r.pooling for r in reports):
        rs = [r for r in reports if r.pooling == pooling]
        js = [getattr(r, j) for r in rs]
        a = [r.mean_auc for r in rs]
        if len(rs) < 3 or not np.all(np.isfinite(js + a)):
            out[pooling] = float("nan")
        else:
            out[pooling] = float(spearmanr(js, a).statistic)
    return out


def select_layers(reports: Sequence[LayerReport], by: str = "j_std", pooling: str = "mean") -> list[int]:
    """Hidden states to use: the one with the highest mean J (`j_std`: standardized, the default, since raw J
    follows a few outlier dimensions and ranks layers unlike probe AUC; `j`: raw; `j_clean`: outliers removed),
    the highest mean probe AUC (`auc`), or `all`."""
    rs = [r for r in reports if r.pooling == pooling]
    if not rs:
        raise ConfigError(f"pooling: no probe reports for {pooling!r}")
    if by == "all":
        return [r.hidden_state for r in rs]
    attributes = {"j": "mean_j", "j_std": "mean_j_std", "j_clean": "mean_j_clean", "auc": "mean_auc"}
    if by not in attributes:
        raise ConfigError(f"layer selection 'by' must be one of {sorted(attributes)} or 'all', got {by!r}")

    def key(r: LayerReport) -> float:
        return float(getattr(r, attributes[by]))

    best = max(rs, key=lambda r: key(r) if math.isfinite(key(r)) else -math.inf)
    return [best.hidden_state]


def ternary_search_layer(layers: Sequence[int], score: Callable[[int], float]) -> tuple[int, dict[int, float]]:
    """The layer maximising `score`, assuming it is unimodal over depth, with O(log L) evaluations.
    Returns (best layer, every score computed)."""
    layers = list(layers)
    if not layers:
        raise ConfigError("ternary search needs at least one layer")
    seen: dict[int, float] = {}

    def f(i: int) -> float:
        if layers[i] not in seen:
            seen[layers[i]] = float(score(layers[i]))
        return seen[layers[i]]

    lo, hi = 0, len(layers) - 1
    while hi - lo > 2:
        m1 = lo + (hi - lo) // 3
        m2 = hi - (hi - lo) // 3
        if f(m1) < f(m2):
            lo = m1 + 1
        else:
            hi = m2
    best = max(range(lo, hi + 1), key=f)
    return layers[best], seen


# ---------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------
def write_probe_outputs(reports: Sequence[LayerReport], out: str | Path) -> dict[str, Path]:
    """probes.csv (one row per pooling, hidden state and target), probes.md (means per hidden state and the
    J-vs-AUC rank agreement) and probes.png (J, d_eff and AUC against depth, one line per pooling)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "probes.csv", "md": out / "probes.md", "png": out / "probes.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pooling", "hidden_state", "target", "fisher_j", "fisher_j_std", "fisher_j_clean",
                    "fisher_j_diag", "probe_auc", "d_eff", "d_eff_entropy", "d_eff_std", "d_eff_clean", "outliers"])
        for r in reports:
            for t in r.fisher_j:
                w.writerow([r.pooling, r.hidden_state, t, _num(r.fisher_j[t]), _num(r.fisher_j_std.get(t)),
                            _num(r.fisher_j_clean.get(t)), _num(r.fisher_diag.get(t)), _num(r.auc.get(t)),
                            _num(r.d_eff), _num(r.d_eff_entropy), _num(r.d_eff_std), _num(r.d_eff_clean),
                            " ".join(map(str, r.outliers))])
    lines = markdown_table(["pooling", "hidden state", "mean J", "mean J (std)", "mean J (clean)",
                            "mean J (diagonal)", "mean probe AUC", "d_eff (PR)", "d_eff (std)", "d_eff (clean)",
                            "d_eff (entropy)", "outlier dims"],
                           [[r.pooling, r.hidden_state, f"{r.mean_j:.4f}", f"{r.mean_j_std:.4f}",
                             f"{r.mean_j_clean:.4f}", f"{r.mean_j_diag:.5f}", f"{r.mean_auc:.4f}", f"{r.d_eff:.2f}",
                             f"{r.d_eff_std:.2f}", f"{r.d_eff_clean:.2f}", f"{r.d_eff_entropy:.2f}",
                             ", ".join(map(str, r.outliers[:6])) + (" …" if len(r.outliers) > 6 else "")]
                            for r in reports])
    lines += ["", "*std*: every dimension z-scored on the training rows; *clean*: raw, without the outlier dimensions "
              "(std over 10x the median dimension's, named in the last column).", "",
              "Spearman correlation of each J ranking with the probe-AUC ranking across hidden states:", ""]
    for j, label in (("mean_j", "raw J"), ("mean_j_std", "standardized J"), ("mean_j_clean", "clean J")):
        lines += [f"- {p}, {label}: {v:.3f}" for p, v in rank_agreement(reports, j).items()]
    for by in ("j", "j_std", "j_clean", "auc"):
        for p in dict.fromkeys(r.pooling for r in reports):
            lines.append(f"- best {p} hidden state by {by}: {select_layers(reports, by, p)[0]}")
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(reports, paths["png"])
    return paths


def _num(x) -> str:
    return "" if x is None or not np.isfinite(x) else f"{x:.6g}"


def _plot(reports: Sequence[LayerReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("Fisher J (mean over targets)", "mean_j"), ("effective dimensionality (PR)", "d_eff"),
              ("probe AUC (mean over targets)", "mean_auc")]
    for ax, (title, attr) in zip(axes, panels):
        for pooling in dict.fromkeys(r.pooling for r in reports):
            rs = sorted((r for r in reports if r.pooling == pooling), key=lambda r: r.hidden_state)
            ax.plot([r.hidden_state for r in rs], [getattr(r, attr) for r in rs], marker="o", label=pooling)
        ax.set_title(title)
        ax.set_xlabel("hidden state (0 = embeddings)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="pooling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
