"""Training a router: `train_router(dataset, features, rows, RouterTrainConfig)` fits the feature transform,
the SharedTrunkNet ensemble, the cost model and the default policy on training rows only, and returns a
runtime `Router` (router/runtime.py) ready to save.

The default policy ("auto" at training time) is the one the evaluation reports (`policy.choose_default_policy`):
utility at the largest lambda whose smoothed accuracy on out-of-fold predictions of the training rows stays
within `max_accuracy_drop` (one point by default) of the best single target's, or always that target
("fixed:<k>") when routing loses more even at lambda 0.
The cost model comes from the dataset's price table; without one, from the data's own per-row costs (each
target's mean cost over the training rows, `CostModel.from_row_costs`). Either way the policy is chosen on the
training rows' own costs, as the evaluation chooses it, so a file's costs give the same lambda whether or not a
price table comes with them. Without prices or costs there is nothing to trade, and the default is argmax.

The same call fits the fast fallback scorer (router/fallback.py) on the same rows, with its own default policy
chosen the same way, when the token-embedding mean of the rows is at hand: given as `fallback_features`, or read
from the features when they hold mean pooling at hidden state 0 (which is the same thing).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prefill_router.errors import ConfigError, parse_config
from prefill_router.features.protocol import PrefillEncoder
from prefill_router.features.store import FeatureSet
from prefill_router.progress import Step, WorkBar
from prefill_router.router.base import out_of_fold_proba
from prefill_router.router.fallback import fit_fallback
from prefill_router.router.layers import candidate_states, choose_states
from prefill_router.router.policy import DEFAULT_MAX_ACCURACY_DROP, choose_default_policy, policy_from_spec
from prefill_router.router.runtime import Router, encoder_identity, encoder_spec_dict, spec_from_identity
from prefill_router.router.transform import FeatureTransform, SourceTransform, select_hidden_states
from prefill_router.router.trunk import TrunkConfig, TrunkEnsemble
from prefill_router.utils import json_safe, roc_auc

if TYPE_CHECKING:
    from prefill_router.features.encoder import EncoderSpec


class RouterTrainConfig(BaseModel):
    """How `train_router` builds a router. Defaults are the paper's reference recipe."""

    model_config = ConfigDict(extra="forbid")

    pooling: str = "mean"
    # Hidden-state indices to concatenate; "all" the held ones; "auto" the fewest layers run whose out-of-fold AUC
    # is within layer_tolerance of the best depth's, at most layer_budget layers (router/layers.py).
    layers: list[int] | Literal["all", "auto"] = "all"
    layer_tolerance: float = Field(default=0.005, ge=0, lt=1)
    layer_budget: int | None = Field(default=None, ge=0)
    pca: int | None = Field(default=200, ge=1)     # None: no PCA, scaler only
    trunk: TrunkConfig = Field(default_factory=TrunkConfig)
    # The checkpoint's default policy: "auto" (utility at the calibrated lambda, see the module docstring) or
    # any spec ("argmax", "utility:0.3", "tolerance:0.05").
    policy: str = "auto"
    calibration_folds: int = Field(default=3, ge=0)   # inner folds for the out-of-fold P that "auto" reads
    calibration_seeds: int = Field(default=3, ge=1)   # ensemble size in --layers auto's folds (cheaper)
    # accuracy "auto" may give up against the best single target (a fraction)
    max_accuracy_drop: float = Field(default=DEFAULT_MAX_ACCURACY_DROP, ge=0, lt=1)
    # Fit the fast fallback scorer too (router/fallback.py), when the token-embedding mean of the rows is at hand.
    fallback: bool = True
    seed: int = 0

    @classmethod
    def parse(cls, data: dict) -> RouterTrainConfig:
        return parse_config(cls, data, "invalid router training configuration")


@dataclass
class ExtraSource:
    """A feature source read beside the main hidden states (a multi-source router): another pooling of the same
    encoder at `hidden_states` ("mean" or "last"), its `surprise` statistics, a pooling of a second encoder
    (`encoder`: its identity and spec), or the `minilm` sentence embedding (`model`: the hash of its files).
    `features` holds every dataset row: [N, states, H], [N, 1, S] or [N, D]. Each source is scaled and reduced on
    its own (router.transform.SourceTransform) and computed at routing time (Router.features_of)."""

    pooling: str
    features: np.ndarray
    hidden_states: list[int] | None = None
    model: str | None = None
    encoder: dict | None = None  # another encoder's {"identity", "spec"}; None: the router's own encoder

    def record(self) -> dict:
        return {"pooling": self.pooling, "hidden_states": self.hidden_states,
                **({"model": self.model} if self.model else {}), **({"encoder": self.encoder} if self.encoder else {})}


def stack_sources(X: np.ndarray, sources: Sequence[ExtraSource], rows: np.ndarray) -> np.ndarray:
    """A multi-source router's input for dataset rows `rows`: the main states `X` (of those rows) flattened, then
    each source's features of those rows, side by side [N, D] (the order SourceTransform splits them in)."""
    blocks = [X.reshape(len(X), -1), *(np.asarray(s.features)[rows].reshape(len(rows), -1) for s in sources)]
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _features_array(features, pooling: str, layers, hidden_states) -> tuple[np.ndarray, list[int] | None, dict | None]:
    """(array [N, L, H] of the wanted hidden states, their indices, the feature set's encoder identity)."""
    if isinstance(features, FeatureSet):
        if pooling not in features.hidden_states:
            held = sorted(features.hidden_states)
            raise ConfigError(f"pooling: {pooling!r} not in the feature set (it holds {held})")
        available = list(features.hidden_states[pooling])
        wanted = available if layers == "all" else list(layers)
        missing = [w for w in wanted if w not in available]
        if missing:
            raise ConfigError(f"layers: hidden state(s) {missing} not in the feature set (it holds {available})")
        return np.asarray(features.get(pooling, wanted)), wanted, features.identity
    if isinstance(features, dict):
        if pooling not in features:
            raise ConfigError(f"pooling: {pooling!r} not among the features given ({sorted(features)})")
        features = features[pooling]
    X = np.asarray(features)
    if X.ndim == 2:
        if layers != "all":
            raise ConfigError("layers: a flat [N, D] feature array cannot be split into hidden states")
        return X, None if hidden_states is None else list(hidden_states), None
    available = list(range(X.shape[1])) if hidden_states is None else list(hidden_states)
    wanted = available if layers == "all" else list(layers)
    return select_hidden_states(X, available, wanted), wanted, None


def state0_mean(features, hidden_states: Sequence[int] | None = None) -> np.ndarray | None:
    """The token-embedding mean [N, H] of every row (mean pooling at hidden state 0) when `features` (as
    `train_router` takes them) hold it, else None."""
    if isinstance(features, FeatureSet):
        held = features.hidden_states.get("mean", [])
        return np.asarray(features.get("mean", [0]))[:, 0] if 0 in held else None
    if isinstance(features, dict):
        features = features.get("mean")
        if features is None:
            return None
    X = np.asarray(features)
    if X.ndim != 3:
        return None
    held = list(range(X.shape[1])) if hidden_states is None else list(hidden_states)
    return X[:, held.index(0)] if 0 in held else None


def train_router(dataset, features, train_rows=None, config: RouterTrainConfig | dict | None = None, *,
                 encoder: PrefillEncoder | EncoderSpec | dict | None = None,
                 hidden_states: Sequence[int] | None = None, cost_model=None, progress: bool = False,
                 encoder_spec: dict | None = None, notes: dict | None = None,
                 sources: Sequence[ExtraSource] = (), fallback_features: np.ndarray | None = None) -> Router:
    """Fit transform, SharedTrunkNet ensemble, cost model and default policy on `train_rows` of `dataset`.

    dataset: a RoutingDataset (its Y, targets and, when it carries prices, its cost model).
    features: a FeatureSet (`.get(pooling, layers)`, `.hidden_states`), a dict pooling -> [N, L, H], or an
        array [N, L, H] whose layer axis holds `hidden_states` (0..L-1 when None). Rows align with dataset.
    encoder: the encoder that produced the features (or its spec, or its identity dict); its identity goes in
        the checkpoint so a different encoder is refused at routing time. Without it the feature set's
        identity is used. A PrefillEncoder is attached to the router, ready to route.
    encoder_spec: how to load that encoder, as an EncoderSpec dict, when the caller knows better than
        `encoder` does (a feature store records the spec `extract` used); by default from `encoder` or the
        identity.
    notes: extra entries for the checkpoint's `training` record (e.g. the feature store the rows came from).
    sources: feature sources read beside the main states (ExtraSource); each gets its own scaler and PCA.
    fallback_features: the token-embedding mean [N, H] of every dataset row, for the fallback scorer; by default
        the features' mean pooling at hidden state 0 when they hold it (with config.fallback False: none).

    The checkpoint's `training.config` is `config` with `layers` set to the hidden states the router reads
    ("all" and "auto" resolved; the auto choice itself is in `metrics.layer_choice`).
    """
    if config is None or isinstance(config, dict):
        config = RouterTrainConfig.parse(config or {})
    rows = np.arange(dataset.n) if train_rows is None else np.asarray(train_rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    layers = "all" if config.layers == "auto" else config.layers
    X_all, states, feature_identity = _features_array(features, config.pooling, layers, hidden_states)
    if len(X_all) != dataset.n:
        raise ConfigError(f"features have {len(X_all)} rows but the dataset has {dataset.n}")
    if isinstance(features, FeatureSet):
        unfinished = int((~features.done[rows]).sum())
        if unfinished:
            raise ConfigError(f"{unfinished} training row(s) have no features yet in the feature store "
                              "(their done flag is False); extract them first or leave them out of train_rows")
    X, Y = X_all[rows], dataset.Y[rows]
    if fallback_features is None and config.fallback and config.pooling == "mean":
        fallback_features = state0_mean(features, hidden_states)
    if fallback_features is not None and len(fallback_features) != dataset.n:
        raise ConfigError(f"fallback_features have {len(fallback_features)} rows but the dataset has {dataset.n}")
    # Before any training, so that the progress plan knows whether the default policy will be calibrated.
    if cost_model is None:
        cost_model = _cost_model_of(dataset, rows)
    trunk_cfg = config.trunk.model_copy(update={"progress": progress or config.trunk.progress})
    work = WorkBar(_plan(config, len(rows), states, _calibrates(config, cost_model, dataset.C[rows])),
                   title=f"training a router on {len(rows):,} prompts x {dataset.k} targets",
                   disable=not trunk_cfg.progress)
    layer_choice = None
    if config.layers == "auto":
        if states is None:
            raise ConfigError("layers: 'auto' needs features with a hidden-state axis ([N, L, H]), not a flat array")
        work.step("layers")
        chosen, layer_choice = choose_states(
            X, states, Y, pca=config.pca, trunk=trunk_cfg, folds=config.calibration_folds,
            seeds=config.calibration_seeds, tolerance=config.layer_tolerance, budget=config.layer_budget,
            seed=config.seed, work=work)
        X, states = X[:, [states.index(s) for s in chosen]], chosen

    work.step("transform")
    transform: FeatureTransform | SourceTransform
    if sources:
        for source in sources:
            if len(source.features) != dataset.n:
                raise ConfigError(f"source {source.pooling!r}: {len(source.features)} rows of features for a "
                                  f"dataset of {dataset.n}")
        widths = tuple(int(np.prod(np.shape(a)[1:])) for a in (X, *(s.features for s in sources)))
        X = stack_sources(X, sources, rows)
        transform = SourceTransform(widths, dims=config.pca).fit(X, seed=config.seed)
    else:
        transform = FeatureTransform(dims=config.pca).fit(X, seed=config.seed)
    Z = transform.transform(X)
    work.step("ensemble")
    predictor = TrunkEnsemble(trunk_cfg, work=work).fit(Z, Y)

    metrics: dict = {"train_rows": len(rows), "feature_dim": int(Z.shape[1]),
                     "val_losses": predictor.val_losses}
    if layer_choice is not None:
        metrics["layer_choice"] = layer_choice
    policy = config.policy.strip()
    if policy.lower() == "auto":
        policy, metrics["default_policy"] = _calibrated_default(config, trunk_cfg, Z, Y, dataset.C[rows], cost_model,
                                                                work)
    else:
        policy_from_spec(policy)  # fail now on a bad spec
    fallback = None
    if config.fallback and fallback_features is not None:
        C = dataset.C[rows]
        fallback = fit_fallback(np.asarray(fallback_features)[rows], Y, C, policy=config.policy,
                                priced=cost_model is not None and bool((np.isfinite(C) & (C > 0)).any()),
                                folds=config.calibration_folds, max_accuracy_drop=config.max_accuracy_drop,
                                seed=config.seed)

    identity = encoder_identity(encoder) if encoder is not None else feature_identity
    spec = encoder_spec or (encoder_spec_dict(encoder) if encoder is not None else None)
    if spec is None:
        spec = spec_from_identity(identity)
    training = {"config": {**config.model_dump(mode="json"), "layers": states}, "created_unix": int(time.time()),
                "notes": list(getattr(dataset, "notes", [])), **(notes or {})}
    main = {"pooling": config.pooling, "hidden_states": states}
    work.close()
    return Router(targets=dataset.targets, transform=transform, predictor=predictor, pooling=config.pooling,
                  hidden_states=states, encoder_identity=identity, encoder_spec=spec, cost_model=cost_model,
                  policy=policy, metrics=metrics, training=training,
                  encoder=encoder if isinstance(encoder, PrefillEncoder) else None,
                  sources=[main, *(s.record() for s in sources)] if sources else None, fallback=fallback)


def _cost_model_of(dataset, rows: np.ndarray):
    """The dataset's price table fitted on the training rows; else the mean of its own per-row costs when every
    target has some; else None (with a warning when only some targets have costs)."""
    from prefill_router.data.prices import CostModel

    if getattr(dataset, "prices", None) is not None:
        return CostModel.fit(dataset, rows)
    known = np.isfinite(dataset.C[rows])
    if not (dataset.C[rows][known] > 0).any():  # no costs, or all free: nothing to trade
        return None
    unpriced = [t for t, k in zip(dataset.targets, known.any(axis=0)) if not k]
    if unpriced:
        warnings.warn(f"no per-row cost for target(s) {unpriced} in the training rows, so the data's costs are not "
                      "used; pass prices to trade cost for accuracy", UserWarning, stacklevel=3)
        return None
    return CostModel.from_row_costs(dataset, rows)


def _calibrates(config: RouterTrainConfig, cost_model, C: np.ndarray) -> bool:
    """Whether the default policy is chosen on out-of-fold predictions: "auto", with known costs to trade."""
    known = np.isfinite(C) & (C > 0)
    return config.policy.strip().lower() == "auto" and cost_model is not None and bool(known.any())


def _plan(config: RouterTrainConfig, n: int, states: list[int] | None, calibrates: bool) -> list[Step]:
    """The steps `train_router` shows, each with its work in training rows (progress.WorkBar): an ensemble of
    s seeds trains s * n rows; cross-fitting it over f folds trains s * n * (f - 1)."""
    folds, seeds, small = config.calibration_folds, config.trunk.seeds, config.calibration_seeds
    steps = []
    if config.layers == "auto" and states is not None:
        depths = len(candidate_states(states, config.layer_budget))
        steps.append(Step("layers", f"choosing hidden states: {depths} depths x {folds} folds x {small} seeds",
                          depths * small * n * max(folds - 1, 0)))
    steps.append(Step("transform", f"scaler + PCA {config.pca or '(off)'}", 0))
    steps.append(Step("ensemble", f"the router: {seeds} seeds on {n:,} prompts", seeds * n))
    if calibrates:
        steps.append(Step("policy", f"its default policy: {folds} folds x {seeds} seeds for out-of-fold predictions",
                          seeds * n * max(folds - 1, 0)))
    return steps


def _calibrated_default(config: RouterTrainConfig, trunk_cfg: TrunkConfig, Z: np.ndarray, Y: np.ndarray,
                        C: np.ndarray, cost_model, work: WorkBar | None = None) -> tuple[str, dict]:
    """The "auto" default policy and how it was chosen (see the module docstring)."""
    if not _calibrates(config, cost_model, C):
        warnings.warn("training without prices or per-row costs: the router cannot trade cost for accuracy, so "
                      "its default policy is argmax (always the target most likely to be right); pass prices (or "
                      "name the data's cost column) to save money", UserWarning, stacklevel=3)
        return "argmax", {"rule": "argmax: no prices to trade against"}
    if config.calibration_folds < 2:
        raise ConfigError("policy: 'auto' needs calibration_folds >= 2 (out-of-fold predictions to choose lambda "
                          "on); set policy to a spec such as 'utility:0.3' instead")
    # Out-of-fold predictions: in-sample P are overconfident and would pick too large a lambda. The transform is
    # unsupervised (no labels), so the folds reuse the one fitted on all training rows.
    # The full ensemble, as the evaluation's cross-fitted calibration uses: the 3-seed one of the layer choice
    # gives noisier P, and on make run's 2,000 prompts its curve fell a point short, so the checkpoint kept the
    # best model alone (fixed:24) where the evaluation measured 29 % savings; with 10 seeds it is utility:0.04.
    full = trunk_cfg.model_copy(update={"progress": False})
    if work is not None:
        work.step("policy")
    P_oof = out_of_fold_proba(Z, Y, lambda: TrunkEnsemble(full, work=work), config.calibration_folds, config.seed)
    spec, info = choose_default_policy(P_oof, Y, C, max_drop=config.max_accuracy_drop)
    info["oof_auc"] = _per_target_auc(Y, P_oof)
    return spec, info


def _per_target_auc(Y: np.ndarray, P: np.ndarray) -> list[float | None]:
    """Per-target AUC over the rows labelled for that target; None where a target has one class only."""
    return [json_safe(roc_auc(Y[:, k], P[:, k])) for k in range(Y.shape[1])]
