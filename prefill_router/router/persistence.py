"""A trained router as one folder on disk: `save_router` and `load_router` (`Router.save` / `Router.load`).

A checkpoint folder holds two files:

    router.json          format version, encoder identity and spec, pooling, hidden states (and, for a router on
                         several feature sources, each source), targets, cost model
                         (prices and median output tokens), the default policy and how it was chosen,
                         transform and ensemble metadata, metrics measured at training time, the fallback
                         scorer's features, default policy and metrics (when it has one), and the SHA-256 of
    router.safetensors   the tensors: scaler, PCA, every kept SharedTrunkNet member's weights, and the fallback
                         scorer's weights (`fallback.*`).

Loading parses JSON and safetensors only; nothing is unpickled, so a checkpoint cannot run code. A checkpoint
without the tensors' SHA-256, or whose tensors hold NaN or infinity, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prefill_router.errors import CheckpointError
from prefill_router.features.protocol import PrefillEncoder
from prefill_router.router.fallback import FallbackScorer
from prefill_router.router.runtime import Router
from prefill_router.router.transform import transform_from_state
from prefill_router.router.trunk import TrunkEnsemble
from prefill_router.utils import atomic_write_bytes, atomic_write_json, file_sha256

FORMAT = "prefill-router-checkpoint/1"
CONFIG_FILE = "router.json"
TENSORS_FILE = "router.safetensors"


def save_router(router: Router, path: str | Path) -> Path:
    """Write `router` to the folder `path` (created if needed): the tensors, then router.json with their SHA-256."""
    from safetensors.numpy import save

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {**router.transform.state_arrays(), **router.predictor.state_arrays(),
              **(router.fallback.state_arrays() if router.fallback is not None else {})}
    tensors_path = folder / TENSORS_FILE
    # As bytes, then an atomic write: safetensors' save_file makes the file 0600 whatever the umask, and a gateway
    # running as another user could not read it.
    atomic_write_bytes(tensors_path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    meta = {
        "format": FORMAT,
        "targets": router.targets,
        "encoder": {"identity": router.encoder_identity, "spec": router.encoder_spec},
        "features": {"pooling": router.pooling, "hidden_states": router.hidden_states,
                     **({"sources": router.sources} if len(router.sources) > 1 else {})},
        "transform": router.transform.meta(),
        "trunk": router.predictor.meta(),
        "cost_model": None if router.cost_model is None else router.cost_model.to_dict(),
        "policy": {"default": router.default_policy},
        "metrics": router.metrics,
        **({"fallback": router.fallback.meta()} if router.fallback is not None else {}),
        "training": router.training,
        "tensors_sha256": file_sha256(tensors_path),
    }
    atomic_write_json(folder / CONFIG_FILE, meta)
    return folder


def load_router(path: str | Path, encoder: PrefillEncoder | None = None, cls: type[Router] = Router) -> Router:
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
    except RecursionError:
        raise CheckpointError(f"{config_path}: not a router checkpoint (JSON nested too deeply)") from None
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
        transform = transform_from_state(meta["transform"], arrays)
        predictor = TrunkEnsemble.from_state(meta["trunk"], arrays)
        cost_model = None
        if meta.get("cost_model") is not None:
            from prefill_router.data.prices import CostModel

            cost_model = CostModel.from_dict(meta["cost_model"])
        # Checkpoints written before the fallback scorer existed have none.
        fallback = FallbackScorer.from_state(meta["fallback"], arrays) if meta.get("fallback") else None
        router = cls(targets=targets, transform=transform, predictor=predictor,
                     pooling=meta["features"]["pooling"], hidden_states=meta["features"]["hidden_states"],
                     encoder_identity=meta["encoder"]["identity"], encoder_spec=meta["encoder"].get("spec"),
                     cost_model=cost_model, policy=meta["policy"]["default"],
                     metrics=meta.get("metrics"), training=meta.get("training"),
                     sources=meta["features"].get("sources"), fallback=fallback)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_path}: invalid router checkpoint ({type(exc).__name__}: {exc})") from exc
    problem = degenerate_outputs(router.predictor, router.transform.output_dim)
    if problem:
        raise CheckpointError(f"{tensors_path}: {problem}; the router would route on meaningless probabilities")
    if encoder is not None:
        router.attach_encoder(encoder)
    return router


def degenerate_outputs(predictor: TrunkEnsemble, width: int, probes: int = 64) -> str | None:
    """Why the ensemble's P cannot be trusted, or None: on a fixed batch of random inputs (standard normal, the
    scale of the transform's output) every P saturated at 0 or 1, or every target's P the same for all inputs.
    Finite but absurd weights (1e30, all zero) pass the NaN check and fail here."""
    Z = np.random.default_rng(0).standard_normal((probes, width)).astype(np.float32)
    try:
        P = np.asarray(predictor.predict_proba(Z), dtype=np.float64)  # [probes, K]
    except (ValueError, RuntimeError) as exc:
        return f"the ensemble cannot run on {width}-wide inputs ({exc})"
    if not np.isfinite(P).all():
        return "its probabilities are not finite on a fixed probe batch"
    if ((P < 1e-6) | (P > 1 - 1e-6)).all():
        return "every probability it gives on a fixed probe batch is saturated at 0 or 1"
    if (np.ptp(P, axis=0) < 1e-9).all():
        return "it gives every input the same probabilities on a fixed probe batch"
    return None
