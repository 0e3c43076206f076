"""The trained router as one object and one folder on disk.

A checkpoint folder holds two files:

    router.json          format version, encoder identity and spec, pooling, hidden states, targets, cost model
                         (prices and median output tokens), the default policy and how it was chosen,
                         transform and ensemble metadata, metrics measured at training time, and the SHA-256 of
    router.safetensors   the tensors: scaler, PCA, and every kept SharedTrunkNet member's weights.

Loading parses JSON and safetensors only; nothing is unpickled, so a checkpoint cannot run code. A checkpoint
without the tensors' SHA-256, or whose tensors hold NaN or infinity, is refused.

The default policy ("auto" at training time) is the one the evaluation reports (`policy.choose_default_policy`):
utility at the largest lambda up to which the best single target's accuracy holds on out-of-fold predictions
of the training rows, or always that target ("fixed:<k>") when routing loses accuracy even at lambda 0.
Without prices there is nothing to trade, and the default is argmax.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefill_router.errors import CheckpointError, ConfigError, EncoderError, invalid_config
from prefill_router.features.protocol import PrefillEncoder, require_encoder
from prefill_router.features.store import FeatureSet
from prefill_router.router.base import out_of_fold_proba
from prefill_router.router.decision import RouteDecision
from prefill_router.router.layers import choose_states
from prefill_router.router.policy import UtilityPolicy, choose_default_policy, policy_from_spec
from prefill_router.router.transform import FeatureTransform, select_hidden_states
from prefill_router.router.trunk import TrunkConfig, TrunkEnsemble
from prefill_router.utils import atomic_write_json, file_sha256, json_safe, roc_auc

if TYPE_CHECKING:
    from prefill_router.features.encoder import EncoderSpec

FORMAT = "prefill-router-checkpoint/1"
CONFIG_FILE = "router.json"
TENSORS_FILE = "router.safetensors"


# ---------------------------------------------------------------------------------------------------------
# encoders: the features stage owns them; the router reads them through the PrefillEncoder protocol
# ---------------------------------------------------------------------------------------------------------
def encoder_identity(encoder: PrefillEncoder | EncoderSpec | dict) -> dict:
    """The JSON-safe identity of an encoder, of an EncoderSpec, or a dict that already is one."""
    if isinstance(encoder, dict):
        return encoder
    from prefill_router.features.encoder import EncoderSpec

    if isinstance(encoder, EncoderSpec):
        return encoder.identity()
    return require_encoder(encoder).identity()


def _encoder_spec_dict(encoder: PrefillEncoder | EncoderSpec | dict) -> dict | None:
    """The spec that loads `encoder` again, as JSON; None when none does (an identity dict, a remote encoder)."""
    if isinstance(encoder, dict):
        return None
    spec = encoder if not isinstance(encoder, PrefillEncoder) else encoder.spec
    return None if spec is None else spec.model_dump(mode="json")


def _spec_from_identity(identity: dict | None) -> dict | None:
    """An encoder spec that loads the encoder an identity describes (the identity check then confirms the
    files are the same), or None when the identity does not name a model."""
    if not isinstance(identity, dict) or not identity.get("model"):
        return None
    spec = {"model": identity["model"]}
    for key in ("template", "max_tokens", "max_route_tokens", "revision"):
        if identity.get(key) is not None:
            spec[key] = identity[key]
    return spec


def _same_identity(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------------
# the Router
# ---------------------------------------------------------------------------------------------------------
class Router:
    """Encoder prefill -> pooled hidden states -> transform -> SharedTrunkNet ensemble -> policy.

    Use `Router.load(folder)` for a saved router, `train_router(...)` to build one.
    """

    def __init__(self, *, targets: Sequence[str], transform: FeatureTransform, predictor: TrunkEnsemble,
                 pooling: str, hidden_states: Sequence[int] | None, encoder_identity: dict | None,
                 encoder_spec: dict | None = None, cost_model=None, policy: str = "argmax",
                 metrics: dict | None = None, training: dict | None = None, encoder: PrefillEncoder | None = None):
        self._targets = list(targets)
        self.transform = transform
        self.predictor = predictor
        self.pooling = pooling
        self.hidden_states = None if hidden_states is None else [int(h) for h in hidden_states]
        self.encoder_identity = encoder_identity
        self.encoder_spec = encoder_spec
        self.cost_model = cost_model
        self.default_policy = policy
        self.metrics = metrics or {}
        self.training = training or {}
        self.encoder: PrefillEncoder | None = None
        if predictor.n_targets is not None and predictor.n_targets != len(self._targets):
            raise ConfigError(f"predictor has {predictor.n_targets} outputs for {len(self._targets)} targets")
        if cost_model is not None and list(cost_model.targets) != self._targets:
            raise ConfigError(f"cost model targets {cost_model.targets} differ from router targets {self._targets}")
        self.resolve_policy()  # fail now on a bad default, not at the first request
        if encoder is not None:
            self.attach_encoder(encoder)

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    # -- encoder -----------------------------------------------------------------------------------------
    def attach_encoder(self, encoder: PrefillEncoder) -> None:
        """Use `encoder` for routing; refuses an object that is not a PrefillEncoder, and an encoder whose
        identity differs from the training one."""
        encoder = require_encoder(encoder)
        if self.encoder_identity is not None:
            given = encoder_identity(encoder)
            if not _same_identity(given, self.encoder_identity):
                raise CheckpointError(
                    "encoder mismatch: the router was trained on features of encoder "
                    f"{json.dumps(self.encoder_identity, sort_keys=True, default=str)} but the encoder given is "
                    f"{json.dumps(given, sort_keys=True, default=str)}")
        self.encoder = encoder

    def _require_encoder(self) -> PrefillEncoder:
        if self.encoder is None:
            if self.encoder_spec is None:
                raise CheckpointError("this router has no encoder attached and its checkpoint names no encoder "
                                      "spec to load; pass encoder= to Router.load")
            from prefill_router.features import load_encoder

            self.attach_encoder(load_encoder(_spec_from_dict(self.encoder_spec)))
        assert self.encoder is not None
        return self.encoder

    # -- prediction --------------------------------------------------------------------------------------
    def predict_proba_features(self, X: np.ndarray) -> np.ndarray:
        """P[N, K] from pooled features [N, hidden_states, H] (exactly the router's hidden states) or the
        same flattened to [N, D]."""
        return self.predictor.predict_proba(self.transform.transform(X))

    def encode(self, prompts: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One encoder forward for the batch: (features [N, L, H], input tokens [N], truncated [N], ms)."""
        encoder = self._require_encoder()
        prompts = list(prompts)
        start = time.perf_counter()
        out = encoder.encode(prompts, poolings=(self.pooling,), layers=self.hidden_states)
        ms = (time.perf_counter() - start) * 1e3
        # The lengths that same call measured (tokenizing again would double the CPU work per request).
        tokens = np.asarray(encoder.last_token_counts, dtype=np.float64).reshape(-1)
        if len(tokens) != len(prompts):
            raise EncoderError(f"{type(encoder).__name__}.last_token_counts holds {len(tokens)} counts after "
                               f"encoding {len(prompts)} prompts (see PrefillEncoder)")
        truncated = tokens > encoder.max_tokens  # the encoder cut these to max_tokens (keep head and tail)
        return np.asarray(out[self.pooling]), tokens, truncated, ms

    def estimate_costs(self, input_tokens: np.ndarray) -> np.ndarray:
        """C[N, K] in USD from the cost model (zeros when the router has none)."""
        input_tokens = np.asarray(input_tokens, dtype=np.float64).reshape(-1)
        if self.cost_model is None:
            return np.zeros((len(input_tokens), len(self._targets)))
        return self.cost_model.estimate(input_tokens)

    def predict_batch(self, prompts: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P[N, K], C[N, K], truncated[N]) for a batch of prompts, with ONE encoder forward. The gateway
        caches P and applies a per-request policy with `choose`."""
        X, tokens, truncated, _ = self.encode(prompts)
        return self.predict_proba_features(X), self.estimate_costs(tokens), truncated

    # -- policy --------------------------------------------------------------------------------------------
    def resolve_policy(self, policy=None, lam: float | None = None):
        """A Policy object from: None (the checkpoint default), a spec string ("argmax", "tolerance:0.05",
        "utility:0.3", "fixed:0") or a Policy. `lam` asks for the utility policy with that cost weight (with
        policy=None, or a utility, argmax or fixed policy)."""
        if policy is None:
            policy = self.default_policy
        if not isinstance(policy, str):
            if not callable(getattr(policy, "choose", None)):
                raise ConfigError(f"policy must be a spec string or have choose(P, C), got {policy!r}")
            return policy
        name = policy.strip().partition(":")[0].strip().lower()
        if lam is not None:
            if name not in ("utility", "argmax", "fixed"):
                raise ConfigError(f"lam applies to the utility policy, not to {policy!r}")
            return UtilityPolicy(float(lam))
        return policy_from_spec(policy)

    def describe_policy(self, policy=None, lam: float | None = None) -> str:
        """The policy spec, with the target a "fixed:<k>" policy names: "fixed:0 (always gpt-4o)"."""
        spec = self.resolve_policy(policy, lam)
        text = spec.spec() if callable(getattr(spec, "spec", None)) else str(spec)
        k = getattr(spec, "k", None)
        return f"{text} (always {self._targets[k]})" if k is not None and k < len(self._targets) else text

    def choose(self, P: np.ndarray, C: np.ndarray, *, policy=None, lam: float | None = None) -> np.ndarray:
        return np.asarray(self.resolve_policy(policy, lam).choose(P, C), dtype=np.int64)

    # -- routing ---------------------------------------------------------------------------------------------
    def route_batch(self, prompts: Sequence, *, policy=None, lam: float | None = None) -> list[RouteDecision]:
        """One decision per prompt, from ONE encoder forward over the batch. latency_ms is the batch's
        encoder + transform + MLP + policy time (shared by every prompt in it)."""
        prompts = list(prompts)
        if not prompts:
            return []
        chosen_policy = self.resolve_policy(policy, lam)
        self._require_encoder()  # a first call loads the encoder: that is not routing time
        start = time.perf_counter()
        P, C, truncated = self.predict_batch(prompts)
        choice = np.asarray(chosen_policy.choose(P, C), dtype=np.int64)
        ms = (time.perf_counter() - start) * 1e3
        return [RouteDecision(target=self._targets[int(choice[i])],
                              probabilities={t: float(P[i, k]) for k, t in enumerate(self._targets)},
                              estimated_cost={t: float(C[i, k]) for k, t in enumerate(self._targets)},
                              latency_ms=ms, truncated=bool(truncated[i]))
                for i in range(len(prompts))]

    def route(self, prompt, *, policy=None, lam: float | None = None) -> RouteDecision:
        """Route one prompt: text, or chat messages [{"role": ..., "content": ...}, ...]."""
        if isinstance(prompt, dict):
            prompt = [prompt]
        return self.route_batch([prompt], policy=policy, lam=lam)[0]

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {**self.transform.state_arrays(), **self.predictor.state_arrays()}
        tensors_path = folder / TENSORS_FILE
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tensors_path))
        meta = {
            "format": FORMAT,
            "targets": self._targets,
            "encoder": {"identity": self.encoder_identity, "spec": self.encoder_spec},
            "features": {"pooling": self.pooling, "hidden_states": self.hidden_states},
            "transform": self.transform.meta(),
            "trunk": self.predictor.meta(),
            "cost_model": None if self.cost_model is None else self.cost_model.to_dict(),
            "policy": {"default": self.default_policy},
            "metrics": self.metrics,
            "training": self.training,
            "tensors_sha256": file_sha256(tensors_path),
        }
        atomic_write_json(folder / CONFIG_FILE, meta)
        return folder

    @classmethod
    def load(cls, path: str | Path, encoder: PrefillEncoder | None = None) -> Router:
        """Read a checkpoint folder. With `encoder` given, use it (refused when its identity differs from the
        checkpoint's); otherwise the encoder named in the checkpoint is loaded at the first routing call."""
        folder = Path(path)
        config_path, tensors_path = folder / CONFIG_FILE, folder / TENSORS_FILE
        for p in (config_path, tensors_path):
            if not p.is_file():
                raise CheckpointError(f"{p}: file not found (is {folder} a router checkpoint folder?)")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{config_path}: format is {found!r}, expected {FORMAT!r}")
        expected_hash = meta.get("tensors_sha256")
        if not isinstance(expected_hash, str):
            raise CheckpointError(f"{config_path}: no tensors_sha256; the tensors cannot be checked, so the "
                                  "checkpoint is refused (save it again with Router.save)")
        if file_sha256(tensors_path) != expected_hash:
            raise CheckpointError(f"{tensors_path}: contents do not match the SHA-256 recorded in {config_path} "
                                  "(the file is corrupt or was replaced)")
        try:
            from safetensors.numpy import load_file

            arrays = load_file(str(tensors_path))
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise CheckpointError(f"{tensors_path}: cannot read safetensors: {exc}") from exc
        bad = sorted(name for name, array in arrays.items()
                     if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all())
        if bad:
            raise CheckpointError(f"{tensors_path}: tensor(s) {bad[:5]} hold NaN or infinity; the router would "
                                  "route on meaningless probabilities")
        try:
            targets = meta["targets"]
            transform = FeatureTransform.from_state(meta["transform"], arrays)
            predictor = TrunkEnsemble.from_state(meta["trunk"], arrays)
            cost_model = None
            if meta.get("cost_model") is not None:
                from prefill_router.data.prices import CostModel

                cost_model = CostModel.from_dict(meta["cost_model"])
            router = cls(targets=targets, transform=transform, predictor=predictor,
                         pooling=meta["features"]["pooling"], hidden_states=meta["features"]["hidden_states"],
                         encoder_identity=meta["encoder"]["identity"], encoder_spec=meta["encoder"].get("spec"),
                         cost_model=cost_model, policy=meta["policy"]["default"],
                         metrics=meta.get("metrics"), training=meta.get("training"))
        except CheckpointError as exc:
            raise CheckpointError(f"{folder}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: invalid router checkpoint ({type(exc).__name__}: {exc})") from exc
        if encoder is not None:
            router.attach_encoder(encoder)
        return router


def _spec_from_dict(spec: dict):
    from prefill_router.features import EncoderSpec

    return EncoderSpec.model_validate(spec)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
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
    calibration_seeds: int = Field(default=3, ge=1)   # ensemble size inside those folds (cheaper than the full one)
    max_accuracy_drop: float = Field(default=0.0, ge=0, lt=1)  # "auto" may lose this much accuracy (a fraction)
    seed: int = 0

    @classmethod
    def parse(cls, data: dict) -> RouterTrainConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise invalid_config("invalid router training configuration", exc) from exc


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


def train_router(dataset, features, train_rows=None, config: RouterTrainConfig | dict | None = None, *,
                 encoder=None, hidden_states: Sequence[int] | None = None, cost_model=None,
                 progress: bool = False) -> Router:
    """Fit transform, SharedTrunkNet ensemble, cost model and default policy on `train_rows` of `dataset`.

    dataset: a RoutingDataset (its Y, targets and, when it carries prices, its cost model).
    features: a FeatureSet (`.get(pooling, layers)`, `.hidden_states`), a dict pooling -> [N, L, H], or an
        array [N, L, H] whose layer axis holds `hidden_states` (0..L-1 when None). Rows align with dataset.
    encoder: the encoder (or its spec) that produced the features; its identity goes in the checkpoint so a
        different encoder is refused at routing time. Without it the feature set's identity is used.
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
    trunk_cfg = config.trunk.model_copy(update={"progress": progress or config.trunk.progress})
    layer_choice = None
    if config.layers == "auto":
        if states is None:
            raise ConfigError("layers: 'auto' needs features with a hidden-state axis ([N, L, H]), not a flat array")
        chosen, layer_choice = choose_states(
            X, states, Y, pca=config.pca, trunk=trunk_cfg, folds=config.calibration_folds,
            seeds=config.calibration_seeds, tolerance=config.layer_tolerance, budget=config.layer_budget,
            seed=config.seed)
        X, states = X[:, [states.index(s) for s in chosen]], chosen

    transform = FeatureTransform(dims=config.pca).fit(X, seed=config.seed)
    Z = transform.transform(X)
    predictor = TrunkEnsemble(trunk_cfg).fit(Z, Y)

    if cost_model is None and getattr(dataset, "prices", None) is not None:
        from prefill_router.data.prices import CostModel

        cost_model = CostModel.fit(dataset, rows)
    metrics: dict = {"train_rows": len(rows), "feature_dim": int(Z.shape[1]),
                     "val_losses": predictor.val_losses}
    if layer_choice is not None:
        metrics["layer_choice"] = layer_choice
    policy = config.policy.strip()
    if policy.lower() == "auto":
        policy, metrics["default_policy"] = _calibrated_default(config, trunk_cfg, Z, Y, dataset.C[rows], cost_model)
    else:
        policy_from_spec(policy)  # fail now on a bad spec

    identity = encoder_identity(encoder) if encoder is not None else feature_identity
    spec = _encoder_spec_dict(encoder) if encoder is not None else None
    if spec is None:
        spec = _spec_from_identity(identity)
    training = {"config": config.model_dump(mode="json"), "created_unix": int(time.time()),
                "notes": list(getattr(dataset, "notes", []))}
    return Router(targets=dataset.targets, transform=transform, predictor=predictor, pooling=config.pooling,
                  hidden_states=states, encoder_identity=identity, encoder_spec=spec, cost_model=cost_model,
                  policy=policy, metrics=metrics, training=training,
                  encoder=encoder if isinstance(encoder, PrefillEncoder) else None)


def _calibrated_default(config: RouterTrainConfig, trunk_cfg: TrunkConfig, Z: np.ndarray, Y: np.ndarray,
                        C: np.ndarray, cost_model) -> tuple[str, dict]:
    """The "auto" default policy and how it was chosen (see the module docstring)."""
    known = np.isfinite(C) & (C > 0)
    if cost_model is None or not known.any():
        warnings.warn("training without prices: the router cannot trade cost for accuracy, so its default "
                      "policy is argmax (always the target most likely to be right); pass prices to save money",
                      UserWarning, stacklevel=3)
        return "argmax", {"rule": "argmax: no prices to trade against"}
    if config.calibration_folds < 2:
        raise ConfigError("policy: 'auto' needs calibration_folds >= 2 (out-of-fold predictions to choose lambda "
                          "on); set policy to a spec such as 'utility:0.3' instead")
    # Out-of-fold predictions: in-sample P are overconfident and would pick too large a lambda. The transform is
    # unsupervised (no labels), so the folds reuse the one fitted on all training rows.
    small = trunk_cfg.model_copy(update={"seeds": config.calibration_seeds,
                                         "keep": min(trunk_cfg.keep, config.calibration_seeds), "progress": False})
    P_oof = out_of_fold_proba(Z, Y, lambda: TrunkEnsemble(small), config.calibration_folds, config.seed)
    spec, info = choose_default_policy(P_oof, Y, C, max_drop=config.max_accuracy_drop)
    info["oof_auc"] = _per_target_auc(Y, P_oof)
    return spec, info


def _per_target_auc(Y: np.ndarray, P: np.ndarray) -> list[float | None]:
    """Per-target AUC over the rows labelled for that target; None where a target has one class only."""
    return [json_safe(roc_auc(Y[:, k], P[:, k])) for k in range(Y.shape[1])]
