"""Descriptive statistics of a routing dataset: how good and how costly each target is, and the oracle.

Scores are read as correctness: a target is "correct" on a prompt when its score is >= 0.5 (the rule of
`utils.binarise`; for 0/1 labels, when it is 1). Accuracy is the mean score over the prompts the target was run on.
"""

from __future__ import annotations

import numpy as np

from prefill_router.data.dataset import RoutingDataset
from prefill_router.utils import binarise, json_safe


def dataset_stats(ds: RoutingDataset) -> dict:
    """Per-target accuracy, coverage and mean cost; oracle accuracy and cost; best single; agreement.

    oracle_accuracy: mean over prompts of the best score any target got (for 0/1 labels: any target correct).
    oracle_cost: mean over prompts of the cheapest cost among the targets that reach that best score (so the
    cheapest correct target, or the cheapest target overall when none is correct).
    agreement[a][b]: the share of prompts run on both targets where both are correct or both wrong.
    Prompts that no target was run on are left out of the oracle figures.
    """
    Y, C = ds.Y, ds.C
    scored = ~np.isnan(Y)
    per_target = {}
    for k, name in enumerate(ds.targets):
        rows = scored[:, k]
        per_target[name] = {
            "accuracy": json_safe(Y[rows, k].mean()) if rows.any() else None,
            "coverage": float(rows.mean()) if ds.n else 0.0,
            "n_scored": int(rows.sum()),
            "mean_cost": json_safe(np.nanmean(C[rows, k])) if np.isfinite(C[rows, k]).any() else None,
        }
    any_scored = scored.any(axis=1)
    oracle_score = np.full(ds.n, np.nan)
    oracle_cost = np.full(ds.n, np.nan)
    if any_scored.any():
        best = np.nanmax(np.where(scored, Y, -np.inf)[any_scored], axis=1)
        oracle_score[any_scored] = best
        reaches = scored[any_scored] & (Y[any_scored] >= best[:, None])
        costs = np.where(reaches & np.isfinite(C[any_scored]), C[any_scored], np.inf)
        cheapest = costs.min(axis=1)
        oracle_cost[any_scored] = np.where(np.isfinite(cheapest), cheapest, np.nan)
    accuracies = {t: s["accuracy"] for t, s in per_target.items() if s["accuracy"] is not None}
    costs = {t: s["mean_cost"] for t, s in per_target.items() if s["mean_cost"] is not None}
    best_single = max(accuracies, key=accuracies.get) if accuracies else None
    most_expensive = max(costs, key=costs.get) if costs else None

    correct = binarise(Y)  # NaN reads as False; `both` below keeps scored pairs only
    agreement = np.full((ds.k, ds.k), np.nan)
    for a in range(ds.k):
        for b in range(ds.k):
            both = scored[:, a] & scored[:, b]
            if both.any():
                agreement[a, b] = (correct[both, a] == correct[both, b]).mean()

    stats = {
        "n_prompts": ds.n,
        "n_targets": ds.k,
        "targets": list(ds.targets),
        "per_target": per_target,
        "oracle_accuracy": json_safe(np.nanmean(oracle_score)) if any_scored.any() else None,
        "oracle_cost": json_safe(np.nanmean(oracle_cost)) if np.isfinite(oracle_cost).any() else None,
        "prompts_without_scores": int((~any_scored).sum()),
        "best_single": best_single,
        "best_single_accuracy": accuracies.get(best_single),
        "best_single_cost": per_target[best_single]["mean_cost"] if best_single else None,
        "most_expensive": most_expensive,
        "most_expensive_cost": costs.get(most_expensive),
        "agreement": [[json_safe(x) for x in row] for row in agreement],
        "notes": list(ds.notes),
    }
    if ds.groups is not None:
        names, counts = np.unique(np.asarray(ds.groups, dtype=object).astype(str), return_counts=True)
        stats["groups"] = {str(g): int(c) for g, c in zip(names, counts)}
    return stats


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_stats(stats: dict, *, max_matrix: int = 8) -> str:
    """A plain-text report: one line per target (best first), the oracle, and the agreement matrix."""
    rows = sorted(stats["per_target"].items(), key=lambda kv: -(kv[1]["accuracy"] or -1.0))
    width = max([len("target")] + [len(t) for t in stats["targets"]])
    lines = [f"{stats['n_prompts']} prompts x {stats['n_targets']} targets", "",
             f"{'target':<{width}}  {'accuracy':>8}  {'coverage':>8}  {'mean cost $':>12}"]
    for name, s in rows:
        lines.append(f"{name:<{width}}  {_fmt(s['accuracy'], '8.4f')}  {s['coverage']:8.4f}  "
                     f"{_fmt(s['mean_cost'], '12.3e')}")
    best, dear = stats["best_single"] or "-", stats["most_expensive"]
    lines += ["",
              f"best single:     {best}  accuracy {_fmt(stats['best_single_accuracy'], '.4f')}  "
              f"mean cost ${_fmt(stats['best_single_cost'], '.3e')}",
              f"most expensive:  {dear}  mean cost ${_fmt(stats['most_expensive_cost'], '.3e')}" if dear else
              "most expensive:  - (no costs are known: pass --prices, or --cost-col to read the file's costs)",
              f"oracle:          accuracy {_fmt(stats['oracle_accuracy'], '.4f')}  "
              f"mean cost ${_fmt(stats['oracle_cost'], '.3e')}"]
    if stats["prompts_without_scores"]:
        lines.append(f"({stats['prompts_without_scores']} prompts have no score; the oracle leaves them out)")
    if stats.get("groups"):
        lines.append(f"groups:          {len(stats['groups'])} categories")
    k = stats["n_targets"]
    if 1 < k <= max_matrix:
        lines += ["", "agreement (share of prompts where both are right or both wrong):"]
        labels = [f"t{i}" for i in range(k)]
        lines.append(" " * (width + 7) + " ".join(f"{x:>5}" for x in labels))
        for i, name in enumerate(stats["targets"]):
            values = " ".join(_fmt(x, "5.2f").rjust(5) for x in stats["agreement"][i])
            lines.append(f"{labels[i]:>4}  {name:<{width}} {values}")
    elif k > max_matrix:
        lines += ["", f"(agreement matrix of {k} targets: see the JSON output)"]
    if stats["notes"]:
        lines += ["", "notes:"] + [f"- {n}" for n in stats["notes"]]
    return "\n".join(lines)
