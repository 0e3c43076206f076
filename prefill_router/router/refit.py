"""Retraining a router on outcome feedback, from stored features (no re-encoding), and judging the result.

    new = refit_router(old, X, Y, mode="heads")     # X: [N, hidden states, H] as the router reads them
    report = compare_on_feedback(old, new, X_held, Y_held, C_held)

Feedback labels one target per prompt (Y is NaN elsewhere), which the masked loss of SharedTrunkNet already
handles. Each kept ensemble member is trained further from its own weights, through the router's fitted
(frozen) transform:
- mode "heads": only the output layer, on the frozen trunk's features (few feedback rows: the safe choice);
- mode "trunk": every layer.
Early stopping on a validation part of the feedback starts from the old weights, so a member ends no worse than
it began on that part. The old router's default policy is kept.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal

import numpy as np
import torch
from torch import nn

from prefill_router.errors import ConfigError
from prefill_router.router.runtime import Router
from prefill_router.router.trunk import SharedTrunkNet, masked_bce, split_labels
from prefill_router.utils import binarise

RefitMode = Literal["heads", "trunk"]


def refit_router(router: Router, X: np.ndarray, Y: np.ndarray, *, mode: RefitMode = "heads", lr: float = 1e-2,
                 max_epochs: int = 300, patience: int = 30, batch_size: int = 64, val_fraction: float = 0.2,
                 seed: int = 0) -> Router:
    """A new Router: `router` with its SharedTrunkNet members trained further on features X [N, ...] and labels
    Y [N, K] in the router's target order (NaN where no feedback)."""
    if mode not in ("heads", "trunk"):
        raise ConfigError(f"refit mode must be 'heads' or 'trunk', got {mode!r}")
    Z = np.asarray(router.transform.transform(X), dtype=np.float32)  # [N, D] through the frozen transform
    Y = np.asarray(Y, dtype=np.float64)
    if Y.shape != (len(Z), len(router.targets)):
        raise ConfigError(f"labels must be [N={len(Z)}, K={len(router.targets)}], got {Y.shape}")
    labelled = np.isfinite(Y).any(axis=1)
    Z, Y = Z[labelled], Y[labelled]
    if len(Z) < 4:
        raise ConfigError(f"need at least 4 feedback rows to retrain on, got {len(Z)}")
    targets, mask = split_labels(Y)
    order = np.random.default_rng(seed).permutation(len(Z))
    n_val = min(max(1, round(val_fraction * len(Z))), len(Z) - 1)
    val, train = order[:n_val], order[n_val:]
    t = {name: torch.from_numpy(np.ascontiguousarray(a[idx])) for name, a, idx in
         [("Xtr", Z, train), ("Ytr", targets, train), ("Mtr", mask, train),
          ("Xva", Z, val), ("Yva", targets, val), ("Mva", mask, val)]}

    members, losses = [], []
    for i, old in enumerate(router.predictor.members):
        net, loss = _train_further(copy.deepcopy(old), t, mode, lr, max_epochs, patience, batch_size, seed + i)
        members.append(net)
        losses.append(loss)
    predictor = copy.copy(router.predictor)
    predictor.members, predictor.val_losses = members, losses
    training = {**router.training, "refit": {"mode": mode, "rows": len(Z), "validation_rows": n_val,
                                             "lr": lr, "created_unix": int(time.time())}}
    return Router(targets=router.targets, transform=router.transform, predictor=predictor, pooling=router.pooling,
                  hidden_states=router.hidden_states, encoder_identity=router.encoder_identity,
                  encoder_spec=router.encoder_spec, cost_model=router.cost_model, policy=router.default_policy,
                  metrics=dict(router.metrics), training=training, sources=router.sources, fallback=router.fallback)


def _train_further(net: SharedTrunkNet, t: dict, mode: RefitMode, lr: float, max_epochs: int, patience: int,
                   batch_size: int, seed: int) -> tuple[SharedTrunkNet, float]:
    torch.manual_seed(seed)
    shuffler = torch.Generator().manual_seed(seed)
    if mode == "heads":
        net.eval()  # the trunk is frozen, dropout off: its features are computed once
        with torch.no_grad():
            inputs = {"tr": net.trunk(t["Xtr"]), "va": net.trunk(t["Xva"])}
        model: nn.Module = net.head
    else:
        inputs = {"tr": t["Xtr"], "va": t["Xva"]}
        model = net
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(masked_bce(model(inputs["va"]), t["Yva"], t["Mva"]))

    best_loss, best_state, stale = val_loss(), copy.deepcopy(model.state_dict()), 0  # the old weights first
    n = len(inputs["tr"])
    for _ in range(max_epochs):
        model.train()
        perm = torch.randperm(n, generator=shuffler)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = masked_bce(model(inputs["tr"][idx]), t["Ytr"][idx], t["Mtr"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        current = val_loss()
        if current < best_loss:
            best_loss, best_state, stale = current, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    net.eval()
    return net, best_loss


def compare_on_feedback(old: Router, new: Router, X: np.ndarray, Y: np.ndarray, C: np.ndarray | None = None) -> dict:
    """How the old and the new router predict held-out feedback Y [N, K] (NaN where none): log loss, Brier score
    and AUC on the scored entries, overall and per target, and how many default-policy decisions change (with
    the estimated costs C [N, K] the gateway recorded). `accepted`: the new router's log loss is no worse."""
    P_old, P_new = old.predict_proba_features(X), new.predict_proba_features(X)
    scored = np.isfinite(Y)
    report: dict = {"rows": int(scored.any(axis=1).sum()), "targets": {}}
    for name, P in (("old", P_old), ("new", P_new)):
        report[name] = _scores(Y[scored], P[scored])
    for k, target in enumerate(old.targets):
        on = scored[:, k]
        if on.any():
            report["targets"][target] = {"rows": int(on.sum()), "old": _scores(Y[on, k], P_old[on, k]),
                                         "new": _scores(Y[on, k], P_new[on, k])}
    if C is not None:
        C = np.where(np.isfinite(C), C, 0.0)
        before, after = old.choose(P_old, C), new.choose(P_new, C)
        report["decisions_changed"] = float(np.mean(before != after)) if len(before) else 0.0
        report["chosen_old"] = {t: int(np.sum(before == k)) for k, t in enumerate(old.targets)}
        report["chosen_new"] = {t: int(np.sum(after == k)) for k, t in enumerate(old.targets)}
    report["accepted"] = bool(report["new"]["log_loss"] <= report["old"]["log_loss"] + 1e-12)
    return report


def _scores(y: np.ndarray, p: np.ndarray) -> dict:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else math.nan
    brier = float(np.mean((p - y) ** 2)) if len(y) else math.nan
    labels = binarise(y)
    auc = None
    if 0 < labels.sum() < len(labels):
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(labels, p))
    return {"log_loss": log_loss, "brier": brier, "auc": auc}
