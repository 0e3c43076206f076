"""How the default policy's operating point is chosen: the rule before and after smoothing, on held-out folds.

For each of 5 folds of a stratified MMLU-Pro sample: prefill SharedTrunkNet predictions of the test rows, and
cross-fitted (3-fold) predictions of the training rows, the ones a trained router chooses its default on. Each
rule picks lambda on the training rows only; the table gives its test accuracy minus the best single target's
(chosen on training rows) and its savings against that target, mean ± std over folds, and in how many folds
the rule fell back to the best single target.

Rules: `first-drop` (before): the largest lambda before out-of-fold accuracy first drops below the level;
`smoothed` (now, `router.policy.choose_default_policy`): the largest lambda whose isotonic (non-increasing) fit
of accuracy keeps the level. Levels: best single accuracy less 0, 0.5 and 1 point (the default).

    .venv/bin/python bench/operating_point.py --rows 2000 --features runs/features/mmlu-pro-smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.cli.pipeline import POOLS  # noqa: E402
from prefill_router.data import kfold, load_mmlu_pro, stratified_sample  # noqa: E402
from prefill_router.evaluate.harness import _test_and_calibration  # noqa: E402
from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders  # noqa: E402
from prefill_router.features import FeatureSet  # noqa: E402
from prefill_router.router import TrunkConfig  # noqa: E402
from prefill_router.router.policy import DEFAULT_LAMBDAS, UtilityPolicy, choose_default_policy  # noqa: E402
from prefill_router.utils import markdown_table  # noqa: E402


def first_drop(P, Y, C, drop):
    """The rule before: stop at the first lambda whose accuracy falls below the level."""
    level = np.nanmean(Y, axis=0).max() - drop - 1e-12
    kept = None
    for lam in np.sort(DEFAULT_LAMBDAS):
        choice = UtilityPolicy(float(lam)).choose(P, C)
        if not np.nanmean(Y[np.arange(len(P)), choice]) >= level:
            break
        kept = float(lam)
    return kept


def smoothed(P, Y, C, drop):
    _, facts = choose_default_policy(P, Y, C, max_drop=drop)
    return facts.get("lambda") if facts["reached"] else None


class _Fold:
    def __init__(self, index, train, test):
        self.index, self.train, self.test = index, train, test


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", help="npz of the fold predictions (default: runs/cache/operating-point-<store>-<rows>"
                                   ".npz; computed once)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    ds = load_mmlu_pro(None)
    fs = FeatureSet.open(args.features)
    rows = stratified_sample(ds, args.rows, seed=0)
    where = fs.rows_of([ds.prompts[i] for i in rows])
    done = np.asarray(fs.done, dtype=bool)[where]
    rows, where = rows[done], where[done]
    X = fs.get("mean", [0, 6, 12, 18], rows=where).reshape(rows.size, -1)
    sub = ds.subset(rows)
    settings = PrefillSettings(pca=200, trunk=TrunkConfig(seeds=10, keep=5, seed=0, threads=args.threads),
                               logistic=False)
    contender = prefill_contenders(X, sub.Y, sub.C, list(range(sub.k)), "mean", settings, FitCache())[0]
    folds = [(f, np.asarray(tr), np.asarray(te)) for f, (tr, te) in enumerate(kfold(sub, k=5, seed=0))]
    # The predictions take most of the time and do not depend on the rule: kept on disk for the next run.
    cache = Path(args.cache or f"runs/cache/operating-point-{Path(args.features).name}-{args.rows}.npz")
    if cache.is_file():
        saved = np.load(cache)
        preds = [(saved[f"te{f}"], saved[f"cal{f}"], saved[f"rows{f}"]) for f in range(len(folds))]
    else:
        preds = [_test_and_calibration(contender, _Fold(f, tr, te), sub.Y, 3, 0.0, 0) for f, tr, te in folds]
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **{f"{k}{f}": v for f, p in enumerate(preds) for k, v in zip(("te", "cal", "rows"), p)})
    print(f"{rows.size} prompts of a {args.rows}-prompt stratified sample (the rows {args.features} holds)")
    for pool in ("all", "two"):
        cols = list(range(sub.k)) if POOLS[pool] is None else [sub.targets.index(t) for t in POOLS[pool]]
        body = []
        for name, rule in (("first-drop (before)", first_drop), ("smoothed (now)", smoothed)):
            for drop in (0.0, 0.005, 0.01):
                dacc, saved, fixed = [], [], 0
                for (_, _, test), (Pte, Pcal, cal) in zip(folds, preds):
                    Yc, Cc = sub.Y[cal][:, cols], sub.C[cal][:, cols]
                    Yt, Ct = sub.Y[test][:, cols], sub.C[test][:, cols]
                    best = int(np.nanmean(Yc, axis=0).argmax())
                    lam = rule(Pcal[:, cols], Yc, Cc, drop)
                    fixed += lam is None
                    choice = (np.full(test.size, best) if lam is None
                              else UtilityPolicy(lam).choose(Pte[:, cols], Ct))
                    r = np.arange(test.size)
                    dacc.append(np.nanmean(Yt[r, choice]) - np.nanmean(Yt[:, best]))
                    saved.append(1 - np.nanmean(Ct[r, choice]) / np.nanmean(Ct[:, best]))
                body.append([name, f"{drop * 100:g}", f"{np.mean(dacc) * 100:+.2f} ± {np.std(dacc) * 100:.2f}",
                             f"{np.mean(saved):.1%} ± {np.std(saved) * 100:.1f}", f"{fixed} of 5"])
        print(f"\n### pool '{pool}'\n")
        print("\n".join(markdown_table(["rule", "accuracy bound (points)", "test acc - best single (points)",
                                        "savings vs best single", "folds on the best single target"], body)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
