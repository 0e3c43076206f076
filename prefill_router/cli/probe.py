"""`prefill-router probe`: Fisher separability, effective dimensionality and probe AUC per hidden state.

    prefill-router probe --features runs/feats --dataset mmlu-pro --out runs/probes

Training rows only: the prompt-level train split (--test-size, default 0.2) of the rows with features.
Writes probes.csv, probes.md and probes.png into --out.
"""

from __future__ import annotations

import argparse

import numpy as np

from prefill_router.cli.common import HelpFormatter, add_store_dataset_arguments, open_store_and_dataset
from prefill_router.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="per-layer Fisher J, d_eff and probe AUC (table + plot)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_store_dataset_arguments(p)
    p.add_argument("--poolings", default=None, help="comma-separated poolings (default: all in the store)")
    p.add_argument("--test-size", type=float, default=0.2,
                   help="share of prompts held out and never probed (default 0.2)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="probe at most this many training rows (random, seeded) to bound the time (default: all)")
    p.add_argument("--components", type=int, default=50, help="PCA components for Fisher J (default 50)")
    p.add_argument("--shrinkage", type=float, default=0.1, help="within-class covariance shrinkage (default 0.1)")
    p.add_argument("--cv-folds", type=int, default=3, help="folds of the probe AUC (default 3)")
    p.add_argument("--probe-pca", type=int, default=64, help="PCA components inside the probe (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the row sample and the probes")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefill_router.data import train_test_split
    from prefill_router.probes import rank_agreement, run_probes, write_probe_outputs

    features, ds, store_rows, done = open_store_and_dataset(args)
    train, _ = train_test_split(ds, test_size=args.test_size, seed=args.seed)
    train = np.sort(train[done[train]])
    if args.max_rows is not None and train.size > args.max_rows:
        train = np.sort(np.random.default_rng(args.seed).choice(train, args.max_rows, replace=False))
    if train.size < 10:
        raise ConfigError(f"only {train.size} training rows have features; need at least 10")
    poolings = [p.strip() for p in args.poolings.split(",")] if args.poolings else None
    # Probes read store rows; labels go to the store row of each probed dataset row.
    Y = np.full((features.n, ds.k), np.nan)
    Y[store_rows[train]] = ds.Y[train]
    reports = run_probes(features, Y, ds.targets, np.sort(store_rows[train]), poolings=poolings,
                         n_components=args.components,
                         shrinkage=args.shrinkage, cv_folds=args.cv_folds, probe_pca=args.probe_pca,
                         seed=args.seed)
    paths = write_probe_outputs(reports, args.out)
    print(paths["md"].read_text())
    print(f"probed {train.size} training prompts x {ds.k} targets; agreement {rank_agreement(reports)}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
