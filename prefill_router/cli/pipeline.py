"""`prefill-router pipeline`: the whole method on MMLU-Pro with the offline default encoder, as one command.

    prefill-router pipeline --out runs/mmlu-pro                 # quick: a stratified 2,000 prompts, ~15 min on 2 cores
    prefill-router pipeline --out runs/mmlu-pro-full --full     # every prompt (about an hour of encoder time on CPU)

Steps: features (SmolLM2-135M prefill; precomputed reference features are used where found) -> layer probes
-> k-fold evaluation of the prefill router against the semantic baselines, random, best single and oracle,
on three target pools -> a router checkpoint trained on every chosen prompt, with the default policy the
reports measure and the fewest encoder layers that keep its AUC (`train --layers auto`; summary.md reports
AUC against layers run) -> one routed example. Everything lands in --out; summary.md collects it.

Quick mode samples --rows prompts (stratified by category, seeded) from all 12,002 and reads mean pooling at
hidden states 0, 6, 12, 18, so the encoder stops after layer 18 of 30. --full computes every prompt's
features at every sixth hidden state (mean and last-token pooling) and evaluates all of them.

The data ships with the package. Reference features (`mmlu-pro/features-smollm2-135m/`) are found under
--data-root, $PREFILL_ROUTER_DATA or ../shared/data; they only save encoder time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefill_router.cli.common import add_parser, split_names
from prefill_router.errors import ConfigError
from prefill_router.utils import atomic_write_json, markdown_table

# ---- Study facts: the MMLU-Pro study this command reproduces. They hold for the shipped outcomes (12,002
# questions x 28 models) and the default encoder, SmolLM2-135M-Instruct (30 decoder layers, so hidden states
# 0..30); another dataset or encoder needs its own `train`/`evaluate` runs, not new numbers here.
ENCODER_NAME = "SmolLM2-135M-Instruct"
# Target pools: the two Gemini models (a strong/cheap pair), five of mixed size and price, all 28.
POOLS = {
    "two": ["gemini-1.5-pro-002", "gemini-1.5-flash-002"],
    "five": ["gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-70B-Instruct",
             "Meta-Llama-3_1-8B-Instruct", "Qwen1.5-110B"],
    "all": None,
}
# --full: every sixth hidden state, mean and last-token pooling (the reference features' layout).
FULL_STATES = list(range(0, 31, 6))
# Quick mode's hidden states: probe AUC peaks near state 18 of SmolLM2-135M, and stopping there runs 18 of 30
# layers (early exit), which is what makes a fresh clone's run fit in 20 minutes on 2 CPU cores.
QUICK_STATES = [0, 6, 12, 18]
EXAMPLE = "What is the derivative of x**3 * sin(x)?\nA. 3x**2 sin(x) + x**3 cos(x)\nB. 3x**2 cos(x)\nC. x**3 cos(x)"
# ---- end of study facts

SEMANTIC = ("knn", "logreg", "mlp", "tfidf")  # names in evaluate.contenders.CONTENDERS

LEGEND = """Columns (every number on held-out prompts, mean over folds):
- **mean AUC**: per-target ROC AUC of the predicted P(correct), averaged over the pool's targets.
- **argmax acc**: accuracy when every prompt goes to the target with the highest P (cost ignored).
- **gap captured**: (argmax acc - best single acc) / (oracle acc - best single acc).
- **$/1k (argmax)**: USD per 1,000 queries of the argmax choice.
- **default: acc / $/1k / saves vs best**: the default policy a trained router deploys: utility
  P - λ·cost/cost_max with the cheapest λ whose smoothed accuracy stays within one point of the best single
  target's (λ chosen on 3-fold out-of-fold predictions of each fold's training rows, never on test rows); its
  accuracy, cost, and cost saved against always calling the best single target, ± the std over folds.
- **savings @ best-single acc**: cost saved against the most expensive target at the cheapest point of the
  test-row λ sweep that reaches best-single accuracy (read on test rows: optimistic); — where the sweep of
  some fold never reaches it.
- **AIQ**: area under the cost-accuracy convex hull of the λ sweep, normalised by the cost range.
- **P-AUCCC**: area under the running-max cost-accuracy (cost-coverage) curve of the same sweep, on the same
  normalised cost axis: unlike AIQ it does not bridge dips in the curve.
- Rows: *best single* is the target most accurate on training rows; *oracle* the cheapest correct target per
  prompt; *random* a uniform pick. `prefill-*` rows read the encoder's hidden states; `*-minilm` rows read
  all-MiniLM-L6-v2 sentence embeddings; `tfidf-logreg` reads TF-IDF word n-grams."""


def register(subparsers) -> None:
    p = add_parser(subparsers, "pipeline", help="the whole method on MMLU-Pro: features, probes, evaluation vs "
                   "baselines, a router checkpoint", description=__doc__)
    p.add_argument("--data-root", default=None,
                   help="a data folder of the shipped layout (default: $PREFILL_ROUTER_DATA, else the data "
                        "shipped with the package)")
    p.add_argument("--out", default="runs/mmlu-pro", help="output folder")
    p.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m",
                   help="feature store over all MMLU-Pro prompts (reference import and --full), shared between "
                        "runs; quick mode keeps its sample's store beside it")
    p.add_argument("--reference", default=None,
                   help="precomputed reference features folder (default: found automatically; 'none' ignores them)")
    p.add_argument("--full", action="store_true", help="compute every prompt's features and evaluate all prompts")
    # 2,000: with 1,000 (800 training prompts per fold) the router's out-of-fold accuracy curve is too noisy
    # to find savings within a point of the best model, so the checkpoint's default was that model alone.
    p.add_argument("--rows", type=int, default=2000, help="quick mode: stratified sample size")
    p.add_argument("--pools", default="two,five,all", help=f"target pools, from {sorted(POOLS)}")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    p.add_argument("--seeds", type=int, default=10, help="SharedTrunkNet seeds trained")
    p.add_argument("--keep", type=int, default=5, help="seeds kept by validation loss")
    p.add_argument("--pca", type=int, default=200, help="PCA components of the feature transform")
    p.add_argument("--semantic", default=",".join(SEMANTIC), help="semantic baselines")
    p.add_argument("--probe-rows", type=int, default=1500, help="training prompts probed per layer")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, folds and models")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and BLAS (default: all)")
    p.set_defaults(func=run)


@dataclass
class Chosen:
    """The prompts a run evaluates and their features."""

    rows: np.ndarray          # indices into the full MMLU-Pro dataset
    X: np.ndarray             # [rows, hidden states, hidden] mean-pooled features
    states: list[int]         # the hidden states of X
    last: np.ndarray | None   # last-token features of the same rows when the store holds them (probes only)
    last_states: list[int]
    identity: dict            # the encoder identity that made the features
    what: str                 # how the rows were chosen, for the reports


def _step(title: str) -> float:
    print(f"\n== {title}", file=sys.stderr, flush=True)
    return time.time()


def _reference(args) -> Path | None:
    from prefill_router.data import find_reference_features

    if args.reference is not None:
        if args.reference.lower() == "none":
            return None
        folder = Path(args.reference)
        if not (folder / "layout.json").is_file():
            raise ConfigError(f"--reference: {folder} holds no layout.json (not a reference feature folder)")
        return folder
    return find_reference_features(args.data_root)


def _full_store(args, ds, reference: Path | None, compute: bool):
    """The store over every prompt: the reference imported (once), the rest computed when `compute`."""
    from prefill_router.features import FeatureSet, extract_to_store, import_reference, load_encoder
    from prefill_router.features.store import is_store

    store = Path(args.features)
    if not is_store(store):
        if reference is None and not compute:
            return None
        if reference is not None:
            print(f"importing reference features from {reference}", file=sys.stderr)
            import_reference(reference, store, prompts=ds.prompts)
    if compute:
        # An existing store (the imported reference) keeps its own layout, which may differ per pooling
        # (mean at six hidden states, last at two): None asks extract_to_store for exactly that.
        poolings, layers = (None, None) if is_store(store) else (["mean", "last"], FULL_STATES)
        extract_to_store(ds.prompts, load_encoder(), store, poolings=poolings, layers=layers, progress=True)
    return FeatureSet.open(store)


def _features(args, ds) -> Chosen:
    from prefill_router.data import stratified_sample

    reference = _reference(args)
    if args.full:
        fs = _full_store(args, ds, reference, compute=True)
        rows = np.arange(ds.n)
        last = fs.get("last") if "last" in fs.hidden_states else None
        return Chosen(rows, fs.get("mean"), fs.hidden_states["mean"], last, fs.hidden_states.get("last", []),
                      fs.identity, f"all {ds.n} prompts")
    rows = stratified_sample(ds, int(args.rows), seed=args.seed)
    fs = _sample_store(args, ds, rows, _full_store(args, ds, reference, compute=False))
    what = (f"a category-stratified sample of {rows.size} of the {ds.n} prompts (seed {args.seed}; --full "
            f"evaluates all)") if rows.size < ds.n else f"all {ds.n} prompts"
    return Chosen(rows, fs.get("mean"), QUICK_STATES, None, [], fs.identity, what)


def _sample_store(args, ds, rows: np.ndarray, full):
    """Quick mode's store: mean pooling at QUICK_STATES for the sampled prompts. Rows the reference (in
    `full`) already holds are copied; the encoder computes the rest, stopping after the deepest state."""
    from prefill_router.features import FeatureSet, extract_to_store, load_encoder
    from prefill_router.features.extract import open_store

    prompts = [ds.prompts[i] for i in rows]
    path = Path(f"{args.features}-quick{rows.size}-seed{args.seed}")
    encoder = load_encoder()
    store = open_store(prompts, encoder, path, poolings=["mean"], layers=QUICK_STATES)
    todo = np.flatnonzero(~store.done)
    if full is not None and todo.size and full.identity == encoder.identity():
        have = todo[np.asarray(full.done, dtype=bool)[rows[todo]]]
        if have.size:
            store.write(have, {"mean": full.get("mean", QUICK_STATES, rows=rows[have])})
            print(f"{have.size} of {rows.size} sampled prompts taken from the reference features; computing "
                  f"the other {todo.size - have.size}", file=sys.stderr)
    store.close()
    extract_to_store(prompts, encoder, path, progress=True)
    return FeatureSet.open(path)


def _probes(args, ds, chosen: Chosen, train0: np.ndarray, out: Path) -> tuple[str, dict]:
    """Fisher J and probe AUC per hidden state on `train0` (at most --probe-rows of them), written under
    out/probes; (the Markdown table, the J vs AUC rank agreement)."""
    from threadpoolctl import threadpool_limits

    from prefill_router.probes import rank_agreement, run_probes, write_probe_outputs

    t = _step("layer probes (training rows of fold 1)")
    if train0.size > args.probe_rows:
        train0 = np.sort(np.random.default_rng(args.seed).choice(train0, args.probe_rows, replace=False))
    inputs = {"mean": chosen.X}
    states = {"mean": chosen.states}
    if chosen.last is not None:
        inputs["last"], states["last"] = chosen.last, chosen.last_states
    with threadpool_limits(args.threads or 1):  # small fits: an oversubscribed BLAS pool is several times slower
        reports = run_probes(inputs, ds.Y, ds.targets, train0, hidden_states=states, seed=args.seed)
    table = write_probe_outputs(reports, out / "probes")["md"].read_text()
    agreement = {view: rank_agreement(reports, j) for view, j in
                 (("raw", "mean_j"), ("standardized", "mean_j_std"), ("clean", "mean_j_clean"))}
    print(table, file=sys.stderr)
    print(f"J vs probe-AUC rank agreement (Spearman): {agreement} ({time.time() - t:.0f} s)", file=sys.stderr)
    return table, agreement


def _semantic_contenders(args, ds, names: list[str]):
    """The semantic baselines from the contender registry, with its defaults (k=20 cosine, C=1) and the
    MiniLM embeddings cached in the user cache."""
    from prefill_router.evaluate.contenders import ContenderSettings, build_contenders
    from prefill_router.features import cache_dir

    t = _step("semantic baselines' inputs (all-MiniLM-L6-v2 embeddings, cached; prompt texts for TF-IDF)")
    settings = ContenderSettings(cache_dir=str(Path(cache_dir()) / "embeddings"), seed=args.seed,
                                 threads=args.threads or 1)
    contenders = build_contenders(names, ds, settings)
    print(f"({time.time() - t:.0f} s)", file=sys.stderr)
    return contenders


def _evaluate_pools(args, ds, chosen: Chosen, folds, semantic, pools: list[str], notes: list[str], out: Path):
    from prefill_router.evaluate.harness import evaluate_contenders
    from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
    from prefill_router.evaluate.report import pool_markdown, pool_summary
    from prefill_router.router import TrunkConfig

    X = chosen.X.reshape(len(chosen.X), -1)
    settings = PrefillSettings(pca=args.pca, trunk=TrunkConfig(seeds=args.seeds, keep=args.keep, seed=args.seed,
                                                               threads=args.threads))
    cache = FitCache()
    tables, summary = [], {}
    for pool in pools:
        t = _step(f"evaluation, pool '{pool}' ({args.folds}-fold, held-out prompts only)")
        pds = ds if POOLS[pool] is None else ds.select_targets(POOLS[pool])
        cols = [ds.targets.index(name) for name in pds.targets]
        contenders = prefill_contenders(X, ds.Y, ds.C, cols, "mean", settings, cache) + semantic
        report = evaluate_contenders(pds.Y, pds.C, folds, contenders, targets=pds.targets, seed=args.seed,
                                     groups=pds.groups, notes=notes + [
                                         f"prefill features: mean pooling, hidden states {chosen.states} "
                                         f"concatenated, scaler + PCA {args.pca}; SharedTrunkNet {args.seeds} "
                                         f"seeds, best {args.keep} kept; trained on all {ds.k} targets' labels "
                                         f"and read at the pool's columns"])
        title = f"pool '{pool}': {pds.k} targets"
        report.save(out / f"pool-{pool}", title=f"MMLU-Pro, {title}")
        summary[pool] = pool_summary(report)
        tables.append(pool_markdown(title, summary[pool]))
        print(tables[-1], flush=True)
        print(f"({time.time() - t:.0f} s)", file=sys.stderr)
    return tables, summary


def _example(router) -> str:
    """One routed question, timed after a warm-up call so the latency excludes loading the encoder."""
    try:
        router.route(EXAMPLE)
        decision = router.route(EXAMPLE)
    except Exception as exc:  # the example is a demonstration; the checkpoint is already written
        return f"example routing failed: {exc}"
    return (f"`{EXAMPLE.splitlines()[0]}` -> **{decision.target}** ({decision.latency_ms:.0f} ms to route, "
            f"encoder already loaded)")


def run(args: argparse.Namespace) -> int:
    pools, semantic_names = _check_args(args)  # before importing torch: a mistyped option answers at once
    import torch

    from prefill_router.data import kfold

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    full_ds = _load_data(args)
    chosen, ds = _choose_rows(args, full_ds)
    folds = kfold(ds, k=args.folds, seed=args.seed, stratify=True)
    probes = _probes(args, ds, chosen, folds[0][0], out)
    semantic = _semantic_contenders(args, ds, semantic_names)
    notes = [f"MMLU-Pro rows: {chosen.what}."] + list(ds.notes)
    tables, summary = _evaluate_pools(args, ds, chosen, folds, semantic, pools, notes, out)
    router, ckpt = _checkpoint(args, ds, chosen, out)
    example = _example(router)
    print(example)
    _write_summary(args, out, chosen, tables, summary, probes, router, ckpt, example, started)
    print(f"\nwrote {out / 'summary.md'} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


def _check_args(args) -> tuple[list[str], list[str]]:
    """The pools and semantic baselines asked for, checked before any work starts."""
    pools = split_names(args.pools)
    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise ConfigError(f"--pools: unknown pool(s) {unknown}; known: {sorted(POOLS)}")
    semantic_names = split_names(args.semantic)
    if set(semantic_names) - set(SEMANTIC):
        raise ConfigError(f"--semantic: unknown baseline(s) {sorted(set(semantic_names) - set(SEMANTIC))}; "
                          f"known: {SEMANTIC}")
    if args.rows < 10 * args.folds:
        raise ConfigError(f"--rows: {args.rows} is too few for {args.folds} folds (at least {10 * args.folds})")
    return pools, semantic_names


def _load_data(args):
    from prefill_router.data import load_mmlu_pro

    t = _step("data (shipped MMLU-Pro outcomes)")
    full_ds = load_mmlu_pro(args.data_root)
    print(f"MMLU-Pro: {full_ds.n} prompts x {full_ds.k} targets ({time.time() - t:.0f} s)", file=sys.stderr)
    return full_ds


def _choose_rows(args, full_ds):
    """The evaluated prompts with their features, and the dataset of just those rows."""
    t = _step(f"features ({ENCODER_NAME} prefill, offline)")
    chosen = _features(args, full_ds)
    print(f"rows: {chosen.what}; mean pooling at hidden states {chosen.states} ({time.time() - t:.0f} s)",
          file=sys.stderr)
    return chosen, full_ds.subset(chosen.rows)


def _checkpoint(args, ds, chosen: Chosen, out: Path):
    """The router trained on every chosen prompt, saved under out/router; (router, its folder)."""
    from prefill_router.router import RouterTrainConfig, train_router

    t = _step("router checkpoint (every chosen prompt, all targets)")
    # layers "auto": the checkpoint reads the fewest encoder layers that keep its out-of-fold AUC (early exit).
    config = RouterTrainConfig.parse({"pca": args.pca, "seed": args.seed, "layers": "auto",
                                      "trunk": {"seeds": args.seeds, "keep": args.keep, "seed": args.seed,
                                                "threads": args.threads}})
    router = train_router(ds, chosen.X, np.arange(ds.n), config, hidden_states=chosen.states,
                          encoder=chosen.identity, progress=True)
    ckpt = router.save(out / "router")
    fallback = "" if router.fallback is None else f", fallback scorer's {router.describe_policy(scorer='fallback')}"
    print(f"checkpoint: {ckpt}, default policy {router.describe_policy()}{fallback} ({time.time() - t:.0f} s)",
          file=sys.stderr)
    return router, ckpt


def _write_summary(args, out: Path, chosen: Chosen, tables: list[str], summary: dict, probes: tuple[str, dict],
                   router, ckpt: Path, example: str, started: float) -> None:
    """summary.md (what a reader opens first) and summary.json (the same numbers for programs)."""
    probe_table, agreement = probes
    md = ["# prefill-router on MMLU-Pro", "",
          f"Rows: {chosen.what}. {args.folds}-fold, prompt-level, stratified by category; every number is on "
          f"held-out prompts, mean over folds. Encoder: {ENCODER_NAME}, mean pooling at hidden states "
          f"{chosen.states} (the checkpoint reads the fewest of them that keep its AUC: see \"AUC against encoder "
          f"layers run\").", "", *tables, LEGEND, "", _default_policy_section(router, ckpt), "",
          _layers_section(router, out), "",
          "## Layer probes", "", probe_table,
          f"J vs probe AUC rank agreement (Spearman; raw, standardized, outliers removed): "
          f"{json.dumps(agreement)}", "",
          "Plots: `probes/probes.png`, `pool-*/cost_quality.png`. Full reports: `pool-*/report.md`.", "",
          f"Example: {example}", "", f"Total time: {time.time() - started:.0f} s."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    atomic_write_json(out / "summary.json", {"rows": chosen.what, "pools": summary,
                                             "default_policy": router.default_policy, "probe_agreement": agreement,
                                             "fallback": None if router.fallback is None else {
                                                 "default_policy": router.fallback.policy,
                                                 "metrics": router.fallback.metrics},
                                             "layer_choice": router.metrics.get("layer_choice")})


def _layers_section(router, out: Path) -> str:
    """AUC against encoder layers run, from the checkpoint's layer choice (out-of-fold, training prompts)."""
    choice = router.metrics.get("layer_choice")
    if not choice:
        return ""
    rows = [[c["layers_run"], ", ".join(map(str, c["states"])), f"{c['oof_auc']:.4f}",
             "chosen" if c["states"] == choice["chosen"] else ""] for c in choice["candidates"]]
    _plot_layers(choice, out / "layers.png")
    return "\n".join([
        "## AUC against encoder layers run", "",
        f"Routing runs the encoder only up to the deepest hidden state the router reads (early exit). The checkpoint "
        f"reads states {choice['chosen']}, so it runs {choice['layers_run']} layers: {choice['rule']}. Mean AUC "
        f"over all targets on {choice['folds']}-fold out-of-fold predictions of the training prompts "
        f"(`prefill-router train --layers auto`); plot: `layers.png`.", "",
        *markdown_table(["layers run", "hidden states read", "out-of-fold mean AUC", ""], rows)])


def _plot_layers(choice: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [c["layers_run"] for c in choice["candidates"]]
    aucs = [c["oof_auc"] for c in choice["candidates"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(runs, aucs, marker="o")
    ax.axvline(choice["layers_run"], color="grey", linestyle="--", label=f"chosen: {choice['layers_run']} layers")
    ax.set_xticks(runs)
    ax.set_xlabel("encoder layers run per prompt")
    ax.set_ylabel("out-of-fold mean AUC")
    ax.set_title("Router AUC against routing compute")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fallback_section(router) -> str:
    """The fast fallback scorer next to the main router, on out-of-fold predictions of the same training rows."""
    fallback = router.fallback.metrics
    main, mine = router.metrics.get("default_policy", {}), fallback.get("default_policy", {})
    rows = []
    for name, info, auc in (("prefill router", main, _mean(main.get("oof_auc"))),
                            ("fallback scorer", mine, fallback.get("oof_mean_auc"))):
        if "accuracy" not in info:
            continue
        base = info.get("best_single_cost_per_query") or float("nan")
        rows.append([name, "—" if auc is None else f"{auc:.4f}", f"{info['accuracy']:.2%}",
                     f"{info['best_single_accuracy']:.2%}", f"{1 - info['cost_per_query'] / base:.0%}",
                     router.describe_policy(scorer="prefill" if info is main else "fallback")])
    return "\n".join([
        "When traffic outruns the encoder, the gateway routes with the checkpoint's fast fallback scorer: a logistic "
        "regression per target on the token-embedding mean (hidden state 0: no encoder layer runs), with its own "
        "default policy chosen the same way. Out-of-fold predictions of the training prompts:", "",
        *markdown_table(["scorer", "mean AUC", "default: acc", "best single acc", "saves vs best", "default policy"],
                        rows)])


def _mean(values) -> float | None:
    finite = [v for v in values or [] if v is not None]
    return float(np.mean(finite)) if finite else None


def _default_policy_section(router, folder: Path) -> str:
    info = router.metrics.get("default_policy", {})
    lines = ["## The router checkpoint", "",
             f"`{folder}` was trained on every evaluated prompt and all {len(router.targets)} targets. Its default "
             f"policy is `{router.describe_policy()}`: {info.get('rule', 'as configured')}."]
    if "accuracy" in info:
        base = info.get("best_single_cost_per_query") or float("nan")
        lines.append(f"On out-of-fold predictions of its training prompts: accuracy {info['accuracy']:.2%} against "
                     f"{info['best_single_accuracy']:.2%} for always calling "
                     f"{router.targets[info['best_single']]}, at {info['cost_per_query'] / base:.0%} of its cost.")
    lines.append("The accuracy bound is `prefill-router train --max-accuracy-drop` (default 0.01, one point; 0 keeps "
                 "the best single target's accuracy exactly, which few training sets of this size allow).")
    lines += ["", _fallback_section(router)] if router.fallback is not None else []
    lines += ["", "```python", "from prefill_router.router import Router", "",
              f'router = Router.load("{folder}")',
              'router.route("What is 17 * 23?").target          # the default policy',
              'router.route("What is 17 * 23?", lam=1.0).target  # a larger cost weight: cheaper targets', "```"]
    return "\n".join(lines)
