"""`prefill-router pipeline`: the whole method on MMLU-Pro with the offline default encoder, as one command.

    prefill-router pipeline --data-root ../shared/data --out runs/mmlu-pro            # quick: ~2,000 prompts
    prefill-router pipeline --data-root ../shared/data --out runs/mmlu-pro --full     # every prompt

Steps: features (import the shared reference features when present, extract what is missing) -> layer probes
-> k-fold evaluation of the prefill router against the semantic baselines, random, best single and oracle,
on three target pools -> a router checkpoint trained on every chosen prompt -> one routed example.

Quick mode evaluates a category-stratified sample of --rows prompts among those whose features exist, so a
new user on 2 CPU cores gets the whole picture in about 15 minutes. --full first computes the features of
every prompt (resumable; about an hour on 2 CPU cores, seconds on a GPU) and evaluates all 12,002.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from prefill_router.errors import ConfigError

POOLS = {
    "two": ["gemini-1.5-pro-002", "gemini-1.5-flash-002"],
    "five": ["gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-70B-Instruct",
             "Meta-Llama-3_1-8B-Instruct", "Qwen1.5-110B"],
    "all": None,
}
SEMANTIC = ("knn", "logreg", "mlp", "tfidf")
EXAMPLE = "What is the derivative of x**3 * sin(x)?\nA. 3x**2 sin(x) + x**3 cos(x)\nB. 3x**2 cos(x)\nC. x**3 cos(x)"


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="features -> probes -> evaluation vs baselines -> checkpoint, on MMLU-Pro",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="shared data folder (default: $PREFILL_ROUTER_DATA)")
    p.add_argument("--out", default="runs/mmlu-pro", help="output folder (default runs/mmlu-pro)")
    p.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m",
                   help="feature store over all MMLU-Pro prompts, shared between runs")
    p.add_argument("--full", action="store_true", help="compute every prompt's features and evaluate all prompts")
    p.add_argument("--rows", type=int, default=2000,
                   help="quick mode: stratified sample size among prompts with features (default 2000)")
    p.add_argument("--all-done", action="store_true",
                   help="evaluate every prompt whose features exist, without computing the rest")
    p.add_argument("--pools", default="two,five,all", help=f"target pools, from {sorted(POOLS)}")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=10, help="SharedTrunkNet seeds trained (default 10)")
    p.add_argument("--keep", type=int, default=5, help="seeds kept by validation loss (default 5)")
    p.add_argument("--pca", type=int, default=200)
    p.add_argument("--semantic", default=",".join(SEMANTIC), help="semantic baselines (default all four)")
    p.add_argument("--probe-rows", type=int, default=1500, help="training prompts probed per layer (default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and BLAS")
    p.set_defaults(func=run)


def _step(title: str) -> float:
    print(f"\n== {title}", file=sys.stderr, flush=True)
    return time.time()


def _features(args, ds):
    """The feature store over all of ds's prompts: reference rows imported, missing rows computed if --full."""
    from prefill_router.data.builtin import data_root
    from prefill_router.features import FeatureSet, extract_to_store, import_reference, load_encoder
    from prefill_router.features.store import is_store

    store = Path(args.features)
    reference = data_root(args.data_root) / "mmlu-pro" / "features-smollm2-135m"
    if not is_store(store):
        if reference.exists():
            print(f"importing reference features from {reference}", file=sys.stderr)
            import_reference(reference, store, prompts=ds.prompts)
        elif not args.full:
            return None  # quick mode without a reference: features of the sample only, see run()
    if args.full:
        # An existing store (the imported reference) keeps its own layout, which may differ per pooling
        # (mean at six hidden states, last at two): None asks extract_to_store for exactly that.
        poolings = None if is_store(store) else ["mean", "last"]
        extract_to_store(ds.prompts, load_encoder(), store, poolings=poolings, progress=True)
    return FeatureSet.open(store)


def _choose_rows(args, ds, done: np.ndarray) -> tuple[np.ndarray, str]:
    from prefill_router.data import stratified_sample

    candidates = np.flatnonzero(done)
    if args.full or args.all_done or candidates.size <= args.rows:
        what = "every prompt" if candidates.size == ds.n else f"the {candidates.size} prompts with features"
        return candidates, what
    sub = ds.subset(candidates)
    picked = stratified_sample(sub, int(args.rows), seed=args.seed)
    return candidates[picked], (f"a category-stratified sample of {picked.size} of the {candidates.size} prompts "
                                f"with features (--full evaluates all {ds.n})")


def run(args: argparse.Namespace) -> int:
    import torch

    from prefill_router.cli.common import split_names
    from prefill_router.data import kfold, load_mmlu_pro
    from prefill_router.evaluate.harness import Contender, evaluate_contenders
    from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
    from prefill_router.evaluate.report import pool_markdown, pool_summary
    from prefill_router.features import extract_to_store, load_encoder
    from prefill_router.features.semantic import embed_texts, prompt_text
    from prefill_router.probes import rank_agreement, run_probes, write_probe_outputs
    from prefill_router.router import RouterTrainConfig, TrunkConfig, train_router
    from prefill_router.router.baselines import (
        KNNPredictor,
        LogisticPredictor,
        MLPPredictor,
        TfidfLogisticPredictor,
    )

    pools = split_names(args.pools)
    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise ConfigError(f"--pools: unknown pool(s) {unknown}; known: {sorted(POOLS)}")
    semantic = split_names(args.semantic)
    if set(semantic) - set(SEMANTIC):
        raise ConfigError(f"--semantic: unknown baseline(s) {sorted(set(semantic) - set(SEMANTIC))}; known: {SEMANTIC}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t = _step("data")
    ds = load_mmlu_pro(args.data_root)
    print(f"MMLU-Pro: {ds.n} prompts x {ds.k} targets ({time.time() - t:.0f} s)", file=sys.stderr)

    t = _step("features (SmolLM2-135M-Instruct prefill, offline)")
    fs = _features(args, ds)
    if fs is None:
        # No reference and no --full: extract only a stratified sample, into a store of its own.
        rows, what = _choose_rows(args, ds, np.ones(ds.n, dtype=bool))
        fs = extract_to_store([ds.prompts[i] for i in rows], load_encoder(), f"{args.features}-sample-{rows.size}",
                              poolings=["mean"], progress=True)
        X_all = fs.get("mean")
        states = fs.hidden_states["mean"]
    else:
        rows, what = _choose_rows(args, ds, np.asarray(fs.done[: ds.n], dtype=bool))
        states = fs.hidden_states["mean"]
        X_all = fs.get("mean", rows=rows)
    ds = ds.subset(rows)
    X = X_all.reshape(len(rows), -1)
    print(f"rows: {what}; mean pooling at hidden states {states} -> {X.shape[1]} features "
          f"({time.time() - t:.0f} s)", file=sys.stderr)
    notes = [f"MMLU-Pro rows: {what}. The reference features cover 8,713 of 12,002 questions, so a run without "
             f"--full has a category mix that differs from the full set."] + list(ds.notes)
    folds = kfold(ds, k=args.folds, seed=args.seed, stratify=True)

    t = _step("layer probes (training rows of fold 1)")
    train0 = folds[0][0]
    if train0.size > args.probe_rows:
        train0 = np.sort(np.random.default_rng(args.seed).choice(train0, args.probe_rows, replace=False))
    probe_input = {"mean": X_all}
    if "last" in fs.hidden_states:
        probe_input["last"] = fs.get("last", rows=None if fs.n == len(rows) else rows)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(args.threads or 1):  # small fits: an oversubscribed BLAS pool is several times slower
        reports = run_probes(probe_input, ds.Y, ds.targets, train0, hidden_states=fs.hidden_states, seed=args.seed)
    probe_paths = write_probe_outputs(reports, out / "probes")
    print(probe_paths["md"].read_text(), file=sys.stderr)
    agreement = rank_agreement(reports)
    print(f"J vs probe-AUC rank agreement (Spearman): {agreement} ({time.time() - t:.0f} s)", file=sys.stderr)

    t = _step("semantic baselines' inputs (all-MiniLM-L6-v2 embeddings, cached; prompt texts for TF-IDF)")
    E = embed_texts(ds.prompts, cache_dir=_cache("embeddings"), progress=True)
    texts = np.array([prompt_text(p) for p in ds.prompts], dtype=object)
    threads = args.threads or 1
    semantic_factories = {
        "knn": ("knn-minilm", lambda: KNNPredictor(k=20, metric="cosine", threads=threads), E),
        "logreg": ("logreg-minilm", lambda: LogisticPredictor(threads=threads), E),
        "mlp": ("mlp-minilm", lambda: MLPPredictor(seed=args.seed, threads=threads), E),
        "tfidf": ("tfidf-logreg", lambda: TfidfLogisticPredictor(threads=threads), texts),
    }
    print(f"embedded {len(E)} prompts ({time.time() - t:.0f} s)", file=sys.stderr)

    settings = PrefillSettings(pca=args.pca, trunk=TrunkConfig(seeds=args.seeds, keep=args.keep, seed=args.seed,
                                                               threads=args.threads))
    cache = FitCache()
    tables, summary = [], {}
    for pool in pools:
        t = _step(f"evaluation, pool '{pool}' ({args.folds}-fold, held-out prompts only)")
        pds = ds if POOLS[pool] is None else ds.select_targets(POOLS[pool])
        cols = [ds.targets.index(name) for name in pds.targets]
        contenders = prefill_contenders(X, ds.Y, ds.C, cols, "mean-all", settings, cache)
        contenders += [Contender(label, make, inputs) for label, make, inputs in
                       (semantic_factories[s] for s in semantic)]
        report = evaluate_contenders(pds.Y, pds.C, folds, contenders, targets=pds.targets, seed=args.seed,
                                     groups=pds.groups, notes=notes + [
                                         f"prefill features: mean pooling, hidden states {states} concatenated, "
                                         f"scaler + PCA {args.pca}; SharedTrunkNet {args.seeds} seeds, best "
                                         f"{args.keep} kept; trained on all {ds.k} targets' labels and read at "
                                         f"the pool's columns"])
        report.save(out / f"pool-{pool}")
        rows_summary = pool_summary(report)
        summary[pool] = rows_summary
        table = pool_markdown(f"pool '{pool}': {pds.k} targets", rows_summary)
        tables.append(table)
        print(table, flush=True)
        print(f"({time.time() - t:.0f} s)", file=sys.stderr)

    t = _step("router checkpoint (every chosen prompt, all targets)")
    router = train_router(ds, X_all, np.arange(ds.n),
                          RouterTrainConfig.parse({"pca": args.pca, "seed": args.seed,
                                                   "trunk": {"seeds": args.seeds, "keep": args.keep,
                                                             "seed": args.seed, "threads": args.threads}}),
                          hidden_states=states, encoder=fs.identity, progress=True)
    ckpt = router.save(out / "router")
    print(f"checkpoint: {ckpt} ({time.time() - t:.0f} s)", file=sys.stderr)
    try:
        decision = router.route(EXAMPLE)
        example = f"`{EXAMPLE.splitlines()[0]}` -> **{decision.target}** ({decision.latency_ms:.0f} ms)"
    except Exception as exc:  # the example is a demonstration; the checkpoint is already written
        example = f"example routing failed: {exc}"
    print(example)

    md = ["# prefill-router on MMLU-Pro", "",
          f"Rows: {what}. {args.folds}-fold, prompt-level, stratified by category; every number is on held-out "
          f"prompts, mean over folds.", "",
          *tables, "", "## Layer probes", "", probe_paths["md"].read_text(),
          f"J vs probe AUC rank agreement (Spearman): {json.dumps(agreement)}", "",
          "Plots: `probes/probes.png`, `pool-*/cost_quality.png`. Checkpoint: `router/`.", "",
          f"Example: {example}", "", f"Total time: {time.time() - started:.0f} s."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": what, "pools": summary, "probe_agreement": agreement},
                                                 indent=1, default=_json_float))
    print(f"\nwrote {out / 'summary.md'} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


def _cache(name: str) -> Path:
    from prefill_router.features import cache_dir

    return Path(cache_dir()) / name


def _json_float(x):
    return None if isinstance(x, float) and not np.isfinite(x) else float(x)
