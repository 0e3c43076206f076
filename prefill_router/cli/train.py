"""`prefill-router train`: fit a router (scaler + PCA + SharedTrunkNet ensemble + policy) and save a checkpoint.

The checkpoint also holds the fast fallback scorer (router/fallback.py), fitted on the token-embedding mean of
the same rows (the store's mean pooling at hidden state 0, or computed from the encoder's tokenizer and embedding
table when the store lacks it); --no-fallback leaves it out.

    prefill-router train --dataset mmlu-pro --features runs/feats --out runs/router
    prefill-router train --dataset labels.csv --prices prices.yaml --features runs/feats --layers 12,18 --out ckpt
    prefill-router train --dataset mmlu-pro --features runs/feats --add-source mean=runs/gemma-feats --out ckpt
    prefill-router train --dataset labels.csv --features runs/feats --fast --out runs/try   # quick, to try things
    prefill-router train --feedback runs/feedback --from runs/router --out runs/router-2   # gateway feedback
    prefill-router train --add-target gpt-5-mini --labels labels.csv --price 0.25,2 --from runs/router --out ckpt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prefill_router.cli import add_target, train_feedback
from prefill_router.cli.common import add_parser, add_store_dataset_arguments, open_store_and_dataset
from prefill_router.errors import ConfigError


def _layers(value: str):
    if value.strip().lower() in ("all", "auto"):
        return value.strip().lower()
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--layers: expected 'all', 'auto' or comma-separated hidden-state indices, "
                          f"got {value!r}") from None


def _pca(value: str):
    return None if value.strip().lower() in ("none", "0") else int(value)


def _extra_sources(specs: list[str], features, ds, done: np.ndarray):
    """(ExtraSource per --add-source, the done mask narrowed to rows every source holds)."""
    from prefill_router.features import FeatureSet
    from prefill_router.features.store import identity_diff
    from prefill_router.features.surprise import SURPRISE
    from prefill_router.router import ExtraSource
    from prefill_router.router.runtime import MINILM

    sources = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if name == MINILM:
            if path:
                raise ConfigError("--add-source minilm takes no store: the embedding is computed (and cached)")
            from prefill_router.data.tokens import cache_dir
            from prefill_router.features.semantic import default_model_dir, embed_texts, model_hash

            vectors = embed_texts(ds.prompts, cache_dir=cache_dir() / "embeddings")
            sources.append(ExtraSource(MINILM, vectors, model=model_hash(default_model_dir())))
            continue
        if name not in ("mean", "last", SURPRISE):
            raise ConfigError(f"--add-source: {name!r} is not a source (surprise, mean, last, minilm)")
        store = features
        if path:
            if not Path(path).exists():
                raise ConfigError(f"--add-source {name}: {path} does not exist (create it with `prefill-router "
                                  f"extract --poolings {name}`)")
            store = FeatureSet.open(path)
        other = None
        if identity_diff(store.identity, features.identity):  # a second encoder: routing loads it by its spec
            spec = store.manifest.get("encoder_spec")
            if not spec:
                raise ConfigError(f"--add-source {name}: {path} comes from another encoder than --features and "
                                  "does not record how to load it (extract it with `prefill-router extract`)")
            other = {"identity": store.identity, "spec": spec}
        if name not in store.hidden_states:
            raise ConfigError(f"--add-source {name}: the store {store.path} holds no {name!r} pooling (it holds "
                              f"{store.poolings}); extract it with --poolings {name}")
        rows = store.rows_of(ds.prompts)
        done = done & np.asarray(store.done[rows], dtype=bool)
        sources.append(ExtraSource(name, store.get(name, rows=rows),
                                   None if name == SURPRISE else list(store.hidden_states[name]), encoder=other))
    return sources, done


def register(subparsers) -> None:
    p = add_parser(subparsers, "train", help="train a router on prefill features and save a checkpoint",
                   description=__doc__)
    add_store_dataset_arguments(p, required=False)  # not with --feedback or --add-target
    train_feedback.add_arguments(p)
    add_target.add_arguments(p)
    p.add_argument("--pooling", default="mean", help="pooling to read from the store")
    p.add_argument("--layers", type=_layers, default="all",
                   help="'all', comma-separated hidden-state indices to concatenate, or 'auto': the fewest "
                        "encoder layers whose out-of-fold AUC is within --layer-tolerance of the best depth's "
                        "(routing runs only those layers)")
    p.add_argument("--layer-tolerance", type=float, default=0.005,
                   help="--layers auto: mean AUC it may give up for running fewer layers")
    p.add_argument("--layer-budget", type=int, default=None,
                   help="--layers auto: the most encoder layers routing may run (default: no limit)")
    p.add_argument("--add-source", action="append", default=[], metavar="SOURCE[=STORE]",
                   help="a feature source read beside --pooling's states, with its own scaler and PCA "
                        "(repeatable): surprise, mean or last (a pooling of the --features store, or of STORE, "
                        "which may come from a second encoder: routing then runs both), or minilm (the MiniLM "
                        "sentence embedding); routing computes each one")
    p.add_argument("--pca", type=_pca, default=200, help="PCA components per source, or 'none'")
    p.add_argument("--seeds", type=int, default=None, help="SharedTrunkNet seeds trained (default 10; 3 with --fast)")
    p.add_argument("--keep", type=int, default=None, help="seeds kept by validation loss (default 5; 3 with --fast)")
    p.add_argument("--policy", default="auto",
                   help="default policy stored in the checkpoint: auto (utility at the cheapest lambda that keeps "
                        "the best single target's accuracy, less --max-accuracy-drop, on out-of-fold training "
                        "predictions; argmax when there are no prices) | argmax | utility:<lam> | tolerance:<tol>")
    p.add_argument("--calibration-folds", type=int, default=None,
                   help="inner folds for the out-of-fold predictions that --policy auto reads (default 3; 2 with "
                        "--fast)")
    p.add_argument("--fast", action="store_true",
                   help="a quick router for trying things: 3 seeds, all kept, and the default policy chosen on 2 "
                        "folds of out-of-fold predictions instead of 3 folds of 10 seeds (about 5x less training); "
                        "options given beside it win")
    # No default here: importing the router stage for its constant would load torch before `--help` answers.
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="accuracy --policy auto may give up against the best single target, as a fraction "
                        "(default 0.01 = one point; 0 keeps it exactly, which small training sets rarely allow)")
    p.add_argument("--no-fallback", action="store_true",
                   help="leave out the fast fallback scorer (token-embedding mean) that routes when the prefill "
                        "cannot answer in time")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="share of prompts held out (prompt-level split) and scored after training")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while training (default: torch's)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.add_target is not None:
        return add_target.run(args)
    if args.labels or args.price:
        raise ConfigError("--labels and --price go with --add-target NAME")
    if args.feedback:
        return train_feedback.run(args)
    missing = [flag for flag, value in (("--features", args.features), ("--dataset", args.dataset)) if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (or --feedback "
                          f"with --from to retrain on gateway feedback)")
    features, ds, store_rows, done = open_store_and_dataset(args)
    # Imported after the argument checks, so that a mistyped command answers without loading torch.
    from prefill_router.data import train_test_split
    from prefill_router.evaluate import metrics
    from prefill_router.router import RouterTrainConfig, train_router
    from prefill_router.router.train import stack_sources

    if not done.any():
        raise ConfigError(f"--features: no finished rows in {args.features}")
    sources, done = _extra_sources(args.add_source, features, ds, done)

    rows = np.arange(ds.n)
    test = np.zeros(0, dtype=np.int64)
    if ds.splits is not None:  # the file's own split (--split-col): its test prompts are the holdout
        if args.holdout > 0:
            raise ConfigError("--holdout and --split-col both choose held-out prompts; give one")
        rows, test = ds.split_rows()
        if not rows.size:
            raise ConfigError(f"--split-col {args.split_col}: every prompt is a test prompt; none is left to train on")
    elif args.holdout > 0:
        rows, test = train_test_split(ds, test_size=args.holdout, seed=args.seed)
    rows, test = rows[done[rows]], test[done[test]]
    skipped = int((~done).sum())

    seeds, keep, folds = _training_sizes(args)
    config = RouterTrainConfig.parse({
        "pooling": args.pooling, "layers": args.layers, "pca": args.pca, "policy": args.policy,
        "layer_tolerance": args.layer_tolerance, "layer_budget": args.layer_budget,
        "calibration_folds": folds, "seed": args.seed, "fallback": not args.no_fallback,
        **({} if args.max_accuracy_drop is None else {"max_accuracy_drop": args.max_accuracy_drop}),
        "trunk": {"seeds": seeds, "keep": keep, "seed": args.seed, "threads": args.threads}})
    held = features.hidden_states.get(args.pooling)
    if held is None:
        raise ConfigError(f"--pooling: {args.pooling!r} not in the feature store (it holds {features.poolings})")
    X = features.get(args.pooling, args.layers if isinstance(args.layers, list) else None, rows=store_rows)
    states = args.layers if isinstance(args.layers, list) else held
    auto = "auto" if args.layers == "auto" else "all"
    X0 = None if args.no_fallback else _embedding_means(features, ds, store_rows)
    # A store made by `extract` records how to load its encoder (a local folder as an absolute path).
    router = train_router(ds, X, rows, config.model_copy(update={"layers": auto}), hidden_states=states,
                          encoder=features.identity, progress=True,
                          encoder_spec=features.manifest.get("encoder_spec"),
                          notes={"features_store": str(Path(args.features).resolve()),
                                 "rows_without_features": skipped}, sources=sources, fallback_features=X0)

    if test.size:
        Xte = X[test][:, [states.index(s) for s in router.hidden_states]]
        P = router.predict_proba_features(stack_sources(Xte, sources, test) if sources else Xte)
        Yte, Cte = ds.Y[test], ds.C[test]
        # Routed on the router's own cost estimates, as it routes when deployed (a prompt's real cost is known
        # only after the call); what that spends is then counted at the rows' real costs.
        tokens = ds.input_tokens[test] if ds.input_tokens is not None else np.zeros(test.size)
        choice = router.choose(P, router.estimate_costs(tokens))
        best_k, _, _ = metrics.best_single(ds.Y[rows], ds.C[rows])
        router.metrics["holdout"] = {
            "rows": int(test.size),
            "mean_auc": float(np.nanmean(metrics.per_target_auc(Yte, P))),
            "accuracy_default_policy": metrics.routed_accuracy(Yte, choice),
            "cost_per_1k_default_policy": 1000 * metrics.routed_cost(Cte, choice),
            "best_single_target": ds.targets[best_k],
            "best_single_accuracy": metrics.routed_accuracy(Yte, np.full(test.size, best_k)),
            "best_single_cost_per_1k": 1000 * metrics.routed_cost(Cte, np.full(test.size, best_k)),
        }
        if router.fallback is not None and X0 is not None:
            P0 = router.fallback.predict_proba(X0[test])
            choice0 = router.choose(P0, Cte, scorer="fallback")
            router.metrics["holdout"]["fallback"] = {
                "mean_auc": float(np.nanmean(metrics.per_target_auc(Yte, P0))),
                "accuracy_default_policy": metrics.routed_accuracy(Yte, choice0),
                "cost_per_1k_default_policy": 1000 * metrics.routed_cost(Cte, choice0)}
    folder = router.save(args.out)
    print(f"trained on {rows.size} prompts x {ds.k} targets"
          + (f" ({skipped} prompts without features skipped)" if skipped else ""))
    if "holdout" in router.metrics:
        print(json.dumps(router.metrics["holdout"], indent=1))
    chosen = router.metrics.get("default_policy", {})
    print(f"default policy: {router.describe_policy()}"
          + (f" (out-of-fold training accuracy {chosen['accuracy']:.2%} vs best single "
             f"{chosen['best_single_accuracy']:.2%}, cost {_ratio(chosen)} of always calling it)"
             if "accuracy" in chosen else ""))
    if router.fallback is not None:
        print(fallback_line(router))
    layers = router.metrics.get("layer_choice")
    if layers is not None:
        print(f"hidden states {layers['chosen']} (routing runs {layers['layers_run']} encoder layers): "
              f"{layers['rule']}; "
              "out-of-fold AUC by layers run: " + ", ".join(f"{c['layers_run']}: {c['oof_auc']:.4f}"
                                                             for c in layers["candidates"]))
    print(f"router checkpoint written to {folder}")
    return 0


def _embedding_means(features, ds, store_rows: np.ndarray) -> np.ndarray | None:
    """The token-embedding mean [N, H] of every dataset row, for the fallback scorer: the store's mean pooling at
    hidden state 0 when it holds it, else computed from the store's encoder (its tokenizer and embedding table
    only: no layer runs). None, with a note, when neither is possible."""
    if 0 in features.hidden_states.get("mean", []):
        return np.asarray(features.get("mean", [0], rows=store_rows))[:, 0]
    from prefill_router.errors import PrefillRouterError
    from prefill_router.features import EncoderSpec, load_encoder
    from prefill_router.features.embedding_mean import EmbeddingMean
    from prefill_router.router.runtime import check_identity, spec_from_identity

    spec = features.manifest.get("encoder_spec") or spec_from_identity(features.identity)
    try:
        if spec is None:
            raise ConfigError("the store records no encoder to load")
        encoder = load_encoder(EncoderSpec.model_validate(spec))
        check_identity(encoder, features.identity, " (fallback scorer)")
        return EmbeddingMean.of(encoder)(ds.prompts)[0]
    except PrefillRouterError as exc:
        print(f"no fallback scorer: the store holds no mean pooling at hidden state 0, and its encoder's embeddings "
              f"could not be read ({exc})")
        return None


def fallback_line(router) -> str:
    """One line on the fallback scorer: its default policy and how it did on out-of-fold training predictions,
    next to the main router's out-of-fold AUC."""
    info = router.fallback.metrics.get("default_policy", {})
    main_auc = router.metrics.get("default_policy", {}).get("oof_auc")
    auc = router.fallback.metrics.get("oof_mean_auc")
    return (f"fallback scorer (token-embedding mean, no encoder layer run): default policy "
            f"{router.describe_policy(scorer='fallback')}"
            + (f" (out-of-fold training accuracy {info['accuracy']:.2%} vs best single "
               f"{info['best_single_accuracy']:.2%}, cost {_ratio(info)} of always calling it)"
               if "accuracy" in info else "")
            + (f"; out-of-fold mean AUC {auc:.4f}" if auc is not None else "")
            + (f" (main router: {np.nanmean(np.array(main_auc, dtype=float)):.4f})" if main_auc and auc else ""))


# (seeds, keep, calibration folds): the reference recipe, and --fast's. Training passes over the training rows
# seeds x folds times (the ensemble once, cross-fitting folds - 1 more): 10 x 3 = 30 against 3 x 2 = 6.
FULL_SIZES, FAST_SIZES = (10, 5, 3), (3, 3, 2)


def _training_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(seeds, keep, calibration folds): the options given, else --fast's or the reference recipe's."""
    defaults = FAST_SIZES if args.fast else FULL_SIZES
    given = (args.seeds, args.keep, args.calibration_folds)
    seeds, keep, folds = (d if g is None else g for g, d in zip(given, defaults))
    if args.keep is None:
        keep = min(keep, seeds)  # --seeds 3 alone keeps all three rather than failing on keep 5
    return seeds, keep, folds


def _ratio(info: dict) -> str:
    base = info.get("best_single_cost_per_query")
    return f"{info['cost_per_query'] / base:.0%}" if base else "n/a"
