"""Routing quality in one run, on the same folds: every feature source and baseline, several datasets.

Rows (contenders), each scored 5-fold on held-out prompts:
- `prefill-trunk [<source>]`: SharedTrunkNet on one encoder's mean-pooled hidden states (scaler + PCA 200);
- `prefill-trunk [<a>+<b>]`: two encoders at once, each source scaled and reduced on its own
  (router.transform.SourceTransform), then concatenated;
- `prefill-trunk [<source>+minilm]`: prefill states plus the MiniLM sentence embedding, the same way;
- `prefill-trunk [<source>+surprise]`: prefill states plus the encoder's surprise statistics (the `surprise`
  pooling, features/surprise.py), when --surprise names a store of them;
- `prefill-per-target [<source>]`: per-target feature selection (router/per_target.py): for each target the
  hidden state, pooling and PCA size with the best inner-CV AUC on the fold's training rows, then a logistic
  regression, against the all-states SharedTrunkNet rows above;
- `mlp-minilm`, `knn-minilm`, `tfidf-logreg`: the semantic baselines.

Columns: mean AUC, argmax accuracy, gap captured, the default policy's accuracy and savings against the best
single target at the lambda chosen on training rows only (mean ± std over folds), P-AUCCC.

Datasets: MMLU-Pro, a category-stratified sample of --mmlu-rows prompts (seed 0) restricted to the prompts every
given store holds, on three pools (all 28 targets, five, and gemini pro vs flash); with --mmlu-full, every
MMLU-Pro prompt one store holds; RouteLLM GSM8K (GPT-4 vs Mixtral), when --gsm8k names a store.

    .venv/bin/python bench/quality.py --mmlu smollm2=runs/features/mmlu-pro-smollm2-135m \\
        --mmlu gemma3=runs/features/mmlu-pro-gemma3-270m-sample3000-seed0 \\
        --gsm8k smollm2=runs/features/routellm-gsm8k-smollm2-135m --mmlu-rows 3000 --out runs/bench-quality \
        --mmlu-surprise runs/features/mmlu-pro-smollm2-135m-surprise-sample3000-seed0 \
        --gsm8k-surprise runs/features/routellm-gsm8k-smollm2-135m-surprise

Each store is read at mean pooling, every hidden state it holds up to --max-state (hidden states deeper than
that cost encoder time at serve time for little AUC; see `train --layers auto`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.cli.pipeline import POOLS  # noqa: E402
from prefill_router.data import kfold, load_dataset, stratified_sample  # noqa: E402
from prefill_router.evaluate.contenders import ContenderSettings, EvalInputs, build_contenders  # noqa: E402
from prefill_router.evaluate.harness import Contender, evaluate_contenders  # noqa: E402
from prefill_router.evaluate.prefill import (  # noqa: E402
    FitCache,
    PrefillSettings,
    per_target_contender,
    prefill_contenders,
)
from prefill_router.evaluate.report import pool_summary  # noqa: E402
from prefill_router.features import FeatureSet  # noqa: E402
from prefill_router.features.surprise import SURPRISE  # noqa: E402
from prefill_router.router import TrunkConfig  # noqa: E402
from prefill_router.router.per_target import PerTargetSelector  # noqa: E402
from prefill_router.utils import atomic_write_json, markdown_table  # noqa: E402

COLUMNS = [("mean_auc", "mean AUC", "{:.3f}"), ("accuracy", "argmax acc", "{:.2%}"),
           ("gap_captured", "gap captured", "{:.1%}"), ("accuracy_at_lambda_train", "default acc", "{:.2%}"),
           ("savings_vs_best_single_at_lambda_train", "default saves vs best", "{:.1%}"),
           ("p_auccc", "P-AUCCC", "{:.3f}")]
SPREAD = {"accuracy_at_lambda_train", "savings_vs_best_single_at_lambda_train"}


def parse_sources(values: list[str]) -> dict[str, Path]:
    out = {}
    for value in values:
        name, _, path = value.partition("=")
        if not path:
            raise SystemExit(f"error: expected NAME=STORE, got {value!r}")
        out[name] = Path(path)
    return out


def store_rows(fs: FeatureSet, prompts: list) -> np.ndarray:
    """Each prompt's row in the store, -1 where the store lacks it or has not computed it yet."""
    rows = fs.rows_of(prompts, missing_ok=True)
    return np.where((rows >= 0) & np.asarray(fs.done, dtype=bool)[np.maximum(rows, 0)], rows, -1)


def open_sources(stores: dict[str, Path], prompts: list) -> dict[str, tuple[FeatureSet, np.ndarray]]:
    sets = {name: FeatureSet.open(path) for name, path in stores.items()}
    return {name: (fs, store_rows(fs, prompts)) for name, fs in sets.items()}


@dataclass
class Features:
    """What the prefill rows of one dataset read, for its rows: each source's mean-pooled states up to
    --max-state, flattened; the first source's per-target views (every held state and pooling up to
    --max-state); the surprise statistics when a store of them was given."""

    sources: dict[str, np.ndarray]
    views: dict[str, np.ndarray]
    surprise: np.ndarray | None


def open_surprise(path: str | None, prompts: list) -> tuple[FeatureSet, np.ndarray] | None:
    if path is None:
        return None
    fs = FeatureSet.open(path)
    if SURPRISE not in fs.hidden_states:
        raise SystemExit(f"error: {path} holds no surprise pooling (extract it with --poolings surprise)")
    return fs, store_rows(fs, prompts)


def source_features(sources: dict[str, tuple[FeatureSet, np.ndarray]], rows: np.ndarray, max_state: int,
                    surprise: tuple[FeatureSet, np.ndarray] | None) -> Features:
    out = {}
    for name, (fs, where) in sources.items():
        states = [s for s in fs.hidden_states["mean"] if s <= max_state]
        out[name] = fs.get("mean", states, rows=where[rows]).reshape(len(rows), -1).astype(np.float32)
        print(f"  {name}: {fs.path} mean states {states} -> {out[name].shape[1]} columns", file=sys.stderr)
    fs, where = next(iter(sources.values()))
    views = {f"{pooling}@{state}": fs.get(pooling, [state], rows=where[rows])[:, 0].astype(np.float32)
             for pooling, held in fs.hidden_states.items() if pooling in ("mean", "last")
             for state in held if state <= max_state}
    print(f"  per-target views of {next(iter(sources))}: {', '.join(views)}", file=sys.stderr)
    stats = None
    if surprise is not None:
        stats = surprise[0].get(SURPRISE, rows=surprise[1][rows]).reshape(len(rows), -1).astype(np.float32)
    return Features(out, views, stats)


def prefill_rows(ds, features: Features, minilm: np.ndarray, cols: list[int], args,
                 cache: FitCache) -> list[Contender]:
    """The prefill contenders of one pool: trained on every target's labels (once per fold, through the shared
    fit cache) and read at the pool's columns."""
    trunk = TrunkConfig(seeds=args.seeds, keep=args.keep, seed=0, threads=args.threads)
    out: list[Contender] = []

    def add(label: str, blocks: list[np.ndarray]) -> None:
        settings = PrefillSettings(pca=args.pca, trunk=trunk, logistic=False,
                                   sources=tuple(b.shape[1] for b in blocks) if len(blocks) > 1 else None)
        out.extend(prefill_contenders(np.concatenate(blocks, axis=1), ds.Y, ds.C, cols, label, settings, cache))

    blocks = features.sources
    names = list(blocks)
    for name in names:
        add(name, [blocks[name]])
    if len(names) > 1:
        add("+".join(names), [blocks[n] for n in names])
    add(f"{names[0]}+minilm", [blocks[names[0]], minilm])
    if features.surprise is not None:
        add(f"{names[0]}+surprise", [blocks[names[0]], features.surprise])
    selector = PerTargetSelector(pcas=tuple(args.per_target_pcas), folds=3, seed=0)
    out.append(per_target_contender(features.views, ds.Y, cols, names[0], selector, cache))
    return out


def evaluate(title: str, ds, features, args, pools: dict[str, list[str] | None]) -> dict[str, list[dict]]:
    folds = kfold(ds, k=args.folds, seed=0, stratify=True)
    settings = ContenderSettings(cache_dir=args.embedding_cache, seed=0, threads=args.threads)
    minilm = np.asarray(EvalInputs(ds, settings).embeddings(), dtype=np.float32)  # cached on disk
    semantic = build_contenders(["mlp", "knn", "tfidf"], ds, settings)
    cache = FitCache()
    results = {}
    for pool, members in pools.items():
        pds = ds if members is None else ds.select_targets(members)
        cols = [ds.targets.index(t) for t in pds.targets]
        contenders = prefill_rows(ds, features, minilm, cols, args, cache) + semantic
        t = time.time()
        report = evaluate_contenders(pds.Y, pds.C, folds, contenders, targets=pds.targets, seed=0,
                                     groups=pds.groups)
        key = f"{title} / {pool} ({pds.k} targets)"
        results[key] = pool_summary(report)
        print(f"{key}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
        print(table(key, results[key]), flush=True)
    return results


def table(title: str, rows: list[dict]) -> str:
    body = []
    for r in rows:
        if r["name"] in ("random", "oracle"):
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            value = r.get(key, float("nan"))
            text = "—" if not np.isfinite(value) else fmt.format(value)
            std = r.get(f"{key}_std", float("nan"))
            if key in SPREAD and np.isfinite(value) and np.isfinite(std):
                text += " ± " + fmt.format(std).rstrip("%") + ("%" if "%" in fmt else "")
            cells.append(text)
        body.append([r["name"], *cells])
    return "\n".join([f"### {title}", "", *markdown_table(["contender", *(h for _, h, _ in COLUMNS)], body), ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mmlu", action="append", default=[], help="NAME=STORE of MMLU-Pro features (repeatable)")
    p.add_argument("--gsm8k", action="append", default=[], help="NAME=STORE of RouteLLM GSM8K features")
    p.add_argument("--mmlu-full", help="NAME=STORE: also every MMLU-Pro prompt this store holds (one encoder, "
                                       "no surprise)")
    p.add_argument("--mmlu-surprise", help="store of the first --mmlu encoder's surprise statistics")
    p.add_argument("--gsm8k-surprise", help="store of the --gsm8k encoder's surprise statistics")
    p.add_argument("--per-target-pcas", type=int, nargs="+", default=[16, 64, 200],
                   help="PCA sizes the per-target selection tries on each view")
    p.add_argument("--mmlu-rows", type=int, default=3000)
    p.add_argument("--pools", default="all,five,two", help="MMLU-Pro target pools (see pipeline --pools)")
    p.add_argument("--max-state", type=int, default=18)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--pca", type=int, default=200)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--keep", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embedding-cache", default="runs/cache/minilm")
    p.add_argument("--out", default="runs/bench-quality")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    results: dict[str, list[dict]] = {}
    notes = []
    if args.mmlu:
        ds = load_dataset("mmlu-pro")
        sample = stratified_sample(ds, args.mmlu_rows, seed=0)
        prompts = [ds.prompts[i] for i in sample]
        sources = open_sources(parse_sources(args.mmlu), prompts)
        surprise = open_surprise(args.mmlu_surprise, prompts)
        held = np.all([where >= 0 for _, where in [*sources.values(), *([surprise] if surprise else [])]], axis=0)
        notes.append(f"MMLU-Pro: {held.sum()} of a {sample.size}-prompt stratified sample (seed 0) held by every "
                     f"store ({', '.join(sources)}{', surprise' if surprise else ''})")
        print(notes[-1], file=sys.stderr)
        results |= evaluate("MMLU-Pro", ds.subset(sample[held]),
                            source_features(sources, np.flatnonzero(held), args.max_state, surprise), args,
                            {pool: POOLS[pool] for pool in args.pools.split(",")})
    if args.mmlu_full:
        ds = load_dataset("mmlu-pro")
        sources = open_sources(parse_sources([args.mmlu_full]), list(ds.prompts))
        rows = np.flatnonzero(next(iter(sources.values()))[1] >= 0)
        notes.append(f"MMLU-Pro, every prompt the store holds: {rows.size} of {ds.n} ({', '.join(sources)})")
        print(notes[-1], file=sys.stderr)
        results |= evaluate("MMLU-Pro (all held)", ds.subset(rows), source_features(sources, rows, args.max_state,
                                                                                   None), args,
                            {pool: POOLS[pool] for pool in args.pools.split(",")})
    if args.gsm8k:
        ds = load_dataset("routellm-gsm8k")
        sources = open_sources(parse_sources(args.gsm8k), list(ds.prompts))
        surprise = open_surprise(args.gsm8k_surprise, list(ds.prompts))
        wheres = [where for _, where in [*sources.values(), *([surprise] if surprise else [])]]
        rows = np.flatnonzero(np.all([where >= 0 for where in wheres], axis=0))
        notes.append(f"RouteLLM GSM8K: {rows.size} of {ds.n} prompts")
        results |= evaluate("RouteLLM GSM8K", ds.subset(rows),
                            source_features(sources, rows, args.max_state, surprise), args, {"two": None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(["# Routing quality", "", *[f"- {n}" for n in notes],
                      f"- {args.folds}-fold, held-out prompts; mean pooling at hidden states <= {args.max_state}; "
                      f"PCA {args.pca} per source; SharedTrunkNet {args.seeds} seeds, best {args.keep} kept",
                      f"- wall time {time.time() - started:.0f} s", "",
                      *[table(title, rows_) for title, rows_ in results.items()]])
    (out / "quality.md").write_text(text + "\n")
    atomic_write_json(out / "quality.json", {"notes": notes, "results": results})
    print(f"wrote {out / 'quality.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
