"""Encoders compared on MMLU-Pro: the same rows, the same folds, one prefill router per feature choice.

Each feature store given on the command line is one encoder; the script keeps the rows of the chosen MMLU-Pro
prompts that every store has computed (matched by prompt hash), splits them into k folds
(`prefill_router.data.kfold`, stratified by category), and evaluates each store alone and all of them
concatenated with the library's prefill contenders (`evaluate.prefill.prefill_contenders`: StandardScaler + PCA
on training rows, SharedTrunkNet trained on all 28 targets' labels, read at each pool's columns) through
`evaluate.harness.evaluate_contenders`. With several stores it adds all of them side by side, each scaled and
reduced on its own (`PrefillSettings.sources`: one scaler + PCA per store, the reduced blocks concatenated). It
prints one table: held-out mean AUC (± std over folds) per pool, and the trunk's AUC difference from the first
store paired fold by fold (the folds are identical, so the paired spread is the one that says whether a
difference is real).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encoders.py --sample 3000 \\
        smollm2=runs/features/mmlu-pro-smollm2-135m@0,6,12,18,24,30 \\
        gemma=runs/features/mmlu-pro-gemma3-270m-sample3000-seed0@0,3,6,9,12,15,18

A store is NAME=PATH, optionally @STATES (comma-separated hidden-state indices; default: every state it holds
for --pooling). The default policy's lambda is not needed for AUC, so the harness's calibration fits are off
(`calibration_folds=0, calibration_holdout=0`); the argmax columns do not depend on it either.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

POOLS = {
    "all": None,
    "two": ["gemini-1.5-pro-002", "gemini-1.5-flash-002"],
    "five": ["gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-70B-Instruct",
             "Meta-Llama-3_1-8B-Instruct", "Qwen1.5-110B"],
}


def parse_store(text: str) -> tuple[str, Path, list[int] | None]:
    if "=" not in text:
        raise SystemExit(f"store {text!r}: expected NAME=PATH[@STATES]")
    name, rest = text.split("=", 1)
    path, _, states = rest.partition("@")
    return name, Path(path), [int(s) for s in states.split(",") if s.strip()] if states else None


def store_rows(fs, hashes: list[str]) -> np.ndarray:
    """The store row of each prompt hash, -1 where the store lacks it or has not computed it."""
    if fs.prompt_hashes is None:
        raise SystemExit(f"{fs.path}: the store records no prompt hashes, so its rows cannot be matched")
    done = fs.done
    where: dict[str, int] = {}
    for row, h in enumerate(fs.prompt_hashes):
        if done[row]:
            where.setdefault(h, row)
    return np.array([where.get(h, -1) for h in hashes], dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+", help="NAME=PATH[@STATES] feature stores over MMLU-Pro prompts")
    p.add_argument("--sample", type=int, default=None,
                   help="the category-stratified sample of N prompts (data.stratified_sample; default: all rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the folds and the trunk")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--pooling", default="mean")
    p.add_argument("--pools", default="all,two", help=f"target pools, from {', '.join(POOLS)}")
    p.add_argument("--pca", type=int, default=200)
    p.add_argument("--seeds", type=int, default=10, help="SharedTrunkNet seeds trained")
    p.add_argument("--keep", type=int, default=5, help="seeds kept by validation loss")
    p.add_argument("--no-concat", action="store_true", help="leave out the rows of all stores together")
    p.add_argument("--threads", type=int, default=1, help="torch threads while fitting")
    args = p.parse_args(argv)

    import torch

    from prefill_router.data import kfold, load_mmlu_pro, stratified_sample
    from prefill_router.data.prompt import prompt_hashes
    from prefill_router.evaluate.harness import evaluate_contenders
    from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
    from prefill_router.features import FeatureSet
    from prefill_router.router import TrunkConfig
    from prefill_router.utils import markdown_table

    torch.set_num_threads(args.threads)
    started = time.time()
    full = load_mmlu_pro(None)
    chosen = stratified_sample(full, args.sample, seed=args.seed) if args.sample else np.arange(full.n)
    hashes = prompt_hashes([full.prompts[i] for i in chosen])
    stores = []
    for text in args.stores:
        name, path, states = parse_store(text)
        fs = FeatureSet.open(path)
        states = states if states is not None else fs.hidden_states[args.pooling]
        stores.append((name, fs, states, store_rows(fs, hashes)))
    have = np.all([rows >= 0 for *_, rows in stores], axis=0)
    ds = full.subset(chosen[have])
    folds = kfold(ds, k=args.folds, seed=args.seed, stratify=True)
    print(f"MMLU-Pro rows: {ds.n} of the {len(chosen)} chosen ({'sample ' + str(args.sample) if args.sample else 'all'}"
          f", seed {args.seed}) have features in every store; {args.folds} folds", file=sys.stderr)
    for name, fs, states, rows in stores:
        print(f"  {name}: {fs.path} ({fs.identity.get('model')}, template {fs.identity.get('template')}), "
              f"{args.pooling} pooling at hidden states {states}; has {int((rows >= 0).sum())} of the chosen",
              file=sys.stderr)

    features = {}
    for name, fs, states, rows in stores:
        X = fs.get(args.pooling, states, rows=rows[have])
        features[name] = X.reshape(len(X), -1)
    trunk = TrunkConfig(seeds=args.seeds, keep=args.keep, seed=args.seed, threads=args.threads)
    settings = {name: PrefillSettings(pca=args.pca, trunk=trunk) for name in features}
    if len(stores) > 1 and not args.no_concat:
        widths = tuple(X.shape[1] for X in features.values())
        joined = np.concatenate(list(features.values()), axis=1)
        concat, per_source = " + ".join(features), " & ".join(features) + " (PCA per store)"
        features[concat], settings[concat] = joined, PrefillSettings(pca=args.pca, trunk=trunk)
        features[per_source], settings[per_source] = joined, PrefillSettings(pca=args.pca, trunk=trunk,
                                                                             sources=widths)
    pools = [x.strip() for x in args.pools.split(",") if x.strip()]
    results: dict[str, dict[str, dict]] = {name: {} for name in features}
    cache = FitCache()
    for pool in pools:
        pds = ds if POOLS[pool] is None else ds.select_targets(POOLS[pool])
        cols = [ds.targets.index(t) for t in pds.targets]
        contenders = [c for name, X in features.items()
                      for c in prefill_contenders(X, ds.Y, ds.C, cols, name, settings[name], cache)]
        t = time.time()
        report = evaluate_contenders(pds.Y, pds.C, folds, contenders, targets=pds.targets, seed=args.seed,
                                     groups=pds.groups, calibration_folds=0, calibration_holdout=0,
                                     progress=False)
        print(f"pool {pool}: {time.time() - t:.0f} s", file=sys.stderr)
        for row in report.rows:
            for name in features:
                for kind in ("trunk", "logreg"):
                    if row.name == f"prefill-{kind} [{name}]":
                        results[name][f"{pool}-{kind}"] = {m: row.stat(m) for m in ("mean_auc", "gap_captured")}
                        results[name][f"{pool}-{kind}-folds"] = np.array([f["mean_auc"] for f in row.folds])

    first = next(iter(features))
    header = ["features", "dims"]
    for pool in pools:
        k = len(POOLS[pool]) if POOLS[pool] else ds.k
        header += [f"trunk AUC, {pool} ({k})", f"Δ vs {first}, paired", f"logreg AUC, {pool} ({k})",
                   f"trunk gap captured, {pool}"]
    table = []
    for name, X in features.items():
        line = [name, str(X.shape[1])]
        for pool in pools:
            diff = results[name][f"{pool}-trunk-folds"] - results[first][f"{pool}-trunk-folds"]
            line_delta = "—" if name == first else f"{diff.mean():+.3f} ± {diff.std(ddof=1):.3f}"
            for kind, metric, pct in (("trunk", "mean_auc", False), ("delta", "", False),
                                      ("logreg", "mean_auc", False), ("trunk", "gap_captured", True)):
                if kind == "delta":
                    line.append(line_delta)
                    continue
                mean, std = results[name][f"{pool}-{kind}"][metric]
                line.append(f"{100 * mean:.1f} % ± {100 * std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}")
        table.append(line)
    print("\n".join(markdown_table(header, table)))
    print(f"\n{ds.n} rows, {args.folds} folds (seed {args.seed}), {args.pooling} pooling, scaler + PCA {args.pca}, "
          f"SharedTrunkNet {args.seeds} seeds / {args.keep} kept; mean ± std over folds; "
          f"{time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
