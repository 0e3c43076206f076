"""`prefill-router probe`: Fisher separability, effective dimensionality and probe AUC per hidden state.

    prefill-router probe --features runs/feats --dataset mmlu-pro --out runs/probes

Training rows only: the prompt-level train split (--test-size, default 0.2) of the rows with features.
Writes probes.csv, probes.md and probes.png into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from prefill_router.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="per-layer Fisher J, d_eff and probe AUC (table + plot)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="feature store folder (from `prefill-router extract`)")
    p.add_argument("--dataset", required=True, help="mmlu-pro | routellm-mmlu | routellm-gsm8k | PATH")
    p.add_argument("--data-root", default=None, help="shared data folder (default: $PREFILL_ROUTER_DATA)")
    p.add_argument("--prices", default=None, help="price table for a data file without costs")
    p.add_argument("--targets", default=None, help="comma-separated subset of targets (default: all)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--poolings", default=None, help="comma-separated poolings (default: all in the store)")
    p.add_argument("--test-size", type=float, default=0.2,
                   help="share of prompts held out and never probed (default 0.2)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="probe at most this many training rows (random, seeded) to bound the time")
    p.add_argument("--components", type=int, default=50, help="PCA components for Fisher J (default 50)")
    p.add_argument("--shrinkage", type=float, default=0.1, help="within-class covariance shrinkage (default 0.1)")
    p.add_argument("--cv-folds", type=int, default=3, help="folds of the probe AUC (default 3)")
    p.add_argument("--probe-pca", type=int, default=64, help="PCA components inside the probe (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefill_router.cli.evaluate import load_dataset
    from prefill_router.data import train_test_split
    from prefill_router.features import FeatureSet
    from prefill_router.probes import rank_agreement, run_probes, write_probe_outputs

    if not Path(args.features).exists():
        raise ConfigError(f"--features: {args.features} does not exist (create it with `prefill-router extract`)")
    features = FeatureSet.open(args.features)
    ds = load_dataset(args)
    if features.n < ds.n:
        raise ConfigError(f"--features: the store holds {features.n} rows but the dataset has {ds.n}")
    train, _ = train_test_split(ds, test_size=args.test_size, seed=args.seed)
    done = np.asarray(features.done[: ds.n], dtype=bool)
    train = np.sort(train[done[train]])
    if args.max_rows is not None and train.size > args.max_rows:
        train = np.sort(np.random.default_rng(args.seed).choice(train, args.max_rows, replace=False))
    if train.size < 10:
        raise ConfigError(f"only {train.size} training rows have features; need at least 10")
    poolings = [p.strip() for p in args.poolings.split(",")] if args.poolings else None
    Y = np.full((features.n, ds.k), np.nan)
    Y[: ds.n] = ds.Y
    reports = run_probes(features, Y, ds.targets, train, poolings=poolings, n_components=args.components,
                         shrinkage=args.shrinkage, cv_folds=args.cv_folds, probe_pca=args.probe_pca,
                         seed=args.seed)
    paths = write_probe_outputs(reports, args.out)
    print(paths["md"].read_text())
    print(f"probed {train.size} training prompts x {ds.k} targets; agreement {rank_agreement(reports)}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
