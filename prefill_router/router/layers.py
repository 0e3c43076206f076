"""Compute-aware choice of the hidden states a router reads (`RouterTrainConfig.layers = "auto"`).

A router that reads hidden states up to index d makes the encoder run d decoder layers and stop (early exit,
features/encoder.py), so its deepest state sets its routing cost: on SmolLM2-135M a router on states up to 18
runs 18 of 30 layers. The candidates are the held states cut at each depth d ({s <= d}, d one of the held
states, 0 included: the embeddings alone run no layer). Each is scored by its cross-validated mean AUC on the
training rows only (out-of-fold predictions of a small ensemble, as the default policy's calibration does), and
the choice is the shallowest depth whose AUC is within `layer_tolerance` of the best candidate's, among
depths within `layer_budget` when one is set. Every candidate's score is kept in the checkpoint
(`metrics["layer_choice"]`) and the pipeline reports it as AUC against layers run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from prefill_router.errors import ConfigError
from prefill_router.router.base import out_of_fold_proba
from prefill_router.router.transform import FeatureTransform
from prefill_router.router.trunk import TrunkConfig, TrunkEnsemble
from prefill_router.utils import roc_auc

if TYPE_CHECKING:
    from prefill_router.progress import WorkBar


def depth_candidates(states: list[int]) -> list[list[int]]:
    """The held states cut at each held depth: [0, 6, 12] -> [[0], [0, 6], [0, 6, 12]]."""
    ordered = sorted(states)
    return [[s for s in ordered if s <= depth] for depth in ordered]


def candidate_states(states: list[int], budget: int | None) -> list[list[int]]:
    """The depth candidates `choose_states` scores: those within `budget` layers when one is set."""
    candidates = [c for c in depth_candidates(states) if budget is None or max(c) <= budget]
    if not candidates:
        raise ConfigError(f"layer_budget: {budget} is below every hidden state held ({sorted(states)})")
    return candidates


def choose_states(X: np.ndarray, states: list[int], Y: np.ndarray, *, pca: int | None, trunk: TrunkConfig,
                  folds: int, seeds: int, tolerance: float, budget: int | None,
                  seed: int = 0, work: WorkBar | None = None) -> tuple[list[int], dict]:
    """(the chosen states, a JSON-safe record of every candidate's out-of-fold AUC and the rule applied).

    X: [N, len(states), H] features of the training rows at `states`; Y: their labels [N, K].
    work: a progress bar every fitted seed advances (progress.WorkBar).
    """
    if folds < 2:
        raise ConfigError("layers: 'auto' needs calibration_folds >= 2 (out-of-fold AUC to compare depths on)")
    candidates = candidate_states(states, budget)
    small = trunk.for_calibration(seeds)
    scored = []
    for cand in candidates:
        Xc = X[:, [states.index(s) for s in cand]]
        Z = FeatureTransform(dims=pca).fit(Xc, seed=seed).transform(Xc)
        P = out_of_fold_proba(Z, Y, lambda: TrunkEnsemble(small, work=work), folds, seed)
        aucs = [roc_auc(Y[:, k], P[:, k]) for k in range(Y.shape[1])]
        scored.append({"states": cand, "layers_run": max(cand), "oof_auc": float(np.nanmean(aucs))})
    best = max(s["oof_auc"] for s in scored)
    chosen = next(s for s in scored if s["oof_auc"] >= best - tolerance)  # candidates go shallow to deep
    rule = (f"the fewest layers whose out-of-fold AUC is within {tolerance} of the best "
            f"({chosen['oof_auc']:.4f} vs {best:.4f})" + (f", at most {budget} layers" if budget is not None else ""))
    return chosen["states"], {"candidates": scored, "chosen": chosen["states"], "layers_run": chosen["layers_run"],
                              "tolerance": tolerance, "budget": budget, "folds": folds, "rule": rule}
