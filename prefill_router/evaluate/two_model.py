"""RouteLLM's two-model metrics over a k-fold evaluation: APGR and CPT(x%) per fold for each contender, with
random and oracle scores alongside, as a JSON-ready summary and a Markdown section."""

from __future__ import annotations

import numpy as np

from prefill_router.evaluate import metrics
from prefill_router.utils import markdown_table

# RouteLLM reports the fraction of strong-model calls needed to recover these shares of the weak-strong gap.
CPT_LEVELS = (20, 50, 80)


def two_target_summary(Y: np.ndarray, C: np.ndarray, targets: list[str],
                       held_out: dict[str, list[tuple[np.ndarray, np.ndarray]]], folds, seed: int) -> dict:
    """APGR and CPT(x%) per fold for each contender, with random and oracle scores alongside.

    held_out: contender name -> per fold (test rows, P[len, 2]), the harness's held-out predictions.

    The weak model is the target with the lower mean cost. Two router scores per contender:
    `P(strong) - P(weak)` (how much the strong model is predicted to help) and `P(strong)` alone.
    """
    weak = int(np.argmin(metrics.target_cost(C)))
    strong = 1 - weak
    rng = np.random.default_rng(seed)

    def summarise(score_per_fold: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        per_fold = []
        for rows, score in score_per_fold:
            per_fold.append(metrics.routellm_summary(Y[rows, weak], Y[rows, strong], score))
        keys = per_fold[0].keys()
        out = {}
        for key in keys:
            values = np.array([f[key] for f in per_fold], dtype=np.float64)
            finite = values[np.isfinite(values)]
            out[key] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
                        "folds": values.tolist()}
        return out

    rows_out = {
        "random": summarise([(test, rng.random(len(test))) for _, test in folds]),
        "oracle": summarise([(test, np.nan_to_num(Y[test, strong] - Y[test, weak])) for _, test in folds]),
    }
    for name, fold_preds in held_out.items():
        rows_out[f"{name} [P(strong)-P(weak)]"] = summarise([(r, P[:, strong] - P[:, weak]) for r, P in fold_preds])
        rows_out[f"{name} [P(strong)]"] = summarise([(r, P[:, strong]) for r, P in fold_preds])
    return {"weak": targets[weak], "strong": targets[strong], "rows": rows_out,
            "notes": ["APGR and CPT follow RouteLLM: 10-quantile thresholds of the score, prompts sent to the "
                      "strong model when score >= threshold; CPT = first crossing of the interpolated curve.",
                      "Computed per fold on held-out prompts, mean ± std across folds."]}


def two_target_markdown(summary: dict) -> str:
    def cell(stat: dict, pct: bool) -> str:
        m, s = stat["mean"], stat["std"]
        if not np.isfinite(m):
            return "—"
        return f"{m * 100:.1f}% ± {s * 100:.1f}" if pct else f"{m:.3f} ± {s:.3f}"

    lines = [f"## Two-model routing (RouteLLM metrics): weak = {summary['weak']}, strong = {summary['strong']}", "",
             *markdown_table(["", "APGR", *(f"CPT({x}%)" for x in CPT_LEVELS)],
                             [[name, cell(stats["apgr"], False), *(cell(stats[f"cpt{x}"], True) for x in CPT_LEVELS)]
                              for name, stats in summary["rows"].items()])]
    lines += [""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"
