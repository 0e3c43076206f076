"""The README's picture and headline table: cost against accuracy on MMLU-Pro, the prefill router against the
baselines (random, best single target, oracle, routers on MiniLM sentence embeddings), from one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/front_page.py run     # the evaluation (minutes), then the two below
    .venv/bin/python bench/front_page.py plot                     # docs/img/cost-accuracy.png from the JSON
    .venv/bin/python bench/front_page.py table                    # the README's headline table from the JSON

`run` evaluates, 5-fold on held-out prompts, every MMLU-Pro prompt whose SmolLM2-135M features the reference
store holds (8,713 of 12,002; found under ../shared/data or $PREFILL_ROUTER_DATA, imported once into
runs/features/mmlu-pro-smollm2-135m), all 28 targets: SharedTrunkNet on mean-pooled hidden states 0, 6, 12, 18
(scaler + PCA 200, 10 seeds, best 5 kept: the shipped router's recipe) against the MLP and kNN routers on
all-MiniLM-L6-v2 embeddings. It writes the fold-mean cost-accuracy curves and the headline numbers to
bench/results/front-page.json (committed), so `plot` and `table` redraw without rerunning. `--rows N` evaluates a
category-stratified sample of N of those prompts instead (quicker, noisier).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

RESULTS = ROOT / "bench" / "results" / "front-page.json"
PICTURE = ROOT / "docs" / "img" / "cost-accuracy.png"
STATES = [0, 6, 12, 18]  # the hidden states `make run`'s router reads (pipeline.QUICK_STATES)
SEMANTIC = ["mlp", "knn"]  # evaluate.contenders names: routers on MiniLM sentence embeddings
PREFILL = "prefill-trunk [mean-0-6-12-18]"
ROUTERS = {PREFILL: "tab:blue", "mlp-minilm": "tab:orange", "knn-minilm": "tab:green"}  # report rows, colours
# Report row name -> the label a reader sees.
LABELS = {PREFILL: "prefill router (SmolLM2-135M)", "mlp-minilm": "MLP on MiniLM",
          "knn-minilm": "kNN on MiniLM", "random": "random", "best single": "best single model",
          "oracle": "oracle"}
HEADLINE = [("accuracy", "argmax accuracy"), ("cost_per_1k", "USD / 1k (argmax)"),
            ("accuracy_at_lambda_train", "default policy: accuracy"),
            ("cost_per_1k_at_lambda_train", "default: USD / 1k"),
            ("savings_vs_best_single_at_lambda_train", "default: saves vs best single"), ("mean_auc", "mean AUC")]


def run(args: argparse.Namespace) -> None:
    import torch

    from prefill_router.data import find_reference_features, kfold, load_mmlu_pro, stratified_sample
    from prefill_router.evaluate.contenders import ContenderSettings, build_contenders
    from prefill_router.evaluate.harness import evaluate_contenders
    from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
    from prefill_router.features import FeatureSet, import_reference
    from prefill_router.features.store import is_store
    from prefill_router.router import TrunkConfig

    torch.set_num_threads(args.threads)
    started = time.time()
    ds = load_mmlu_pro(None)
    store = Path(args.features)
    if not is_store(store):
        reference = find_reference_features()
        if reference is None:
            raise SystemExit("error: no reference features found (../shared/data or $PREFILL_ROUTER_DATA); "
                             "extract them with `prefill-router extract --dataset mmlu-pro` first")
        import_reference(reference, store, prompts=ds.prompts)
    fs = FeatureSet.open(store)
    where = fs.rows_of(ds.prompts, missing_ok=True)
    held = np.flatnonzero((where >= 0) & np.asarray(fs.done, dtype=bool)[np.maximum(where, 0)])
    if args.rows:
        held = held[stratified_sample(ds.subset(held), args.rows, seed=0)]
    ds = ds.subset(held)
    X = fs.get("mean", STATES, rows=where[held]).reshape(len(held), -1).astype(np.float32)
    print(f"{ds.n} prompts x {ds.k} targets, {X.shape[1]} feature columns", file=sys.stderr)

    folds = kfold(ds, k=5, seed=0, stratify=True)
    settings = ContenderSettings(cache_dir=args.embedding_cache, seed=0, threads=args.threads)
    trunk = TrunkConfig(seeds=args.seeds, keep=args.keep, seed=0, threads=args.threads)
    contenders = prefill_contenders(X, ds.Y, ds.C, list(range(ds.k)), "mean-0-6-12-18",
                                    PrefillSettings(pca=200, trunk=trunk, logistic=False), FitCache())
    contenders += build_contenders(SEMANTIC, ds, settings)
    report = evaluate_contenders(ds.Y, ds.C, folds, contenders, targets=ds.targets, seed=0, groups=ds.groups)
    rows = {}
    for r in report.rows:
        entry = {key: _number(r.stat(key)[0]) for key, _ in HEADLINE} | {
            f"{key}_std": _number(r.stat(key)[1]) for key in ("accuracy_at_lambda_train",
                                                               "savings_vs_best_single_at_lambda_train")}
        curve = r.mean_curve()
        if curve is not None:
            entry["curve"] = {"lambda": curve.params.tolist(), "cost_per_1k": (curve.cost * 1000).tolist(),
                              "accuracy": curve.accuracy.tolist()}
        rows[r.name] = entry
    points = report.target_points
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "what": f"MMLU-Pro, {ds.n} prompts (those the SmolLM2-135M reference store holds"
                + (f", a stratified sample of {args.rows}" if args.rows else "") + f"), all {ds.k} targets, "
                f"5-fold, held-out prompts, mean over folds; SharedTrunkNet {args.seeds} seeds, best {args.keep} kept",
        "command": "bench/front_page.py run" + (f" --rows {args.rows}" if args.rows else "")
                   + (f" --seeds {args.seeds} --keep {args.keep}" if (args.seeds, args.keep) != (10, 5) else ""),
        "seconds": round(time.time() - started), "date": time.strftime("%Y-%m-%d"),
        "prompts": ds.n, "targets": ds.targets,
        "target_accuracy": np.nanmean([p["accuracy"] for p in points], axis=0).tolist(),
        "target_cost_per_1k": (np.nanmean([p["cost"] for p in points], axis=0) * 1000).tolist(),
        "rows": rows}, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.results} in {time.time() - started:.0f} s", file=sys.stderr)


def _number(value: float) -> float | None:
    """JSON has no NaN: a metric a row does not have (a baseline's AUC) is null."""
    return float(value) if np.isfinite(value) else None


def plot(results: dict, path: Path) -> Path:
    """Two panels of cost (log) against accuracy. Left, the whole range: each router's utility sweep, every single
    model as a grey dot, random, the best single model and the oracle. Right, a zoom on where the routers'
    default policies (stars) sit next to the best single model, which the whole range squeezes into a corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = results["rows"]
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 5.2), width_ratios=[1, 1.15])
    for ax in (full, zoom):
        ax.scatter(results["target_cost_per_1k"], results["target_accuracy"], s=12, color="0.75", zorder=1,
                   label="single models")
        for name, color in ROUTERS.items():
            r = rows[name]
            ax.plot(r["curve"]["cost_per_1k"], r["curve"]["accuracy"], color=color,
                    lw=2.2 if name == PREFILL else 1.3, label=LABELS[name], zorder=3)
            ax.scatter([r["cost_per_1k_at_lambda_train"]], [r["accuracy_at_lambda_train"]], marker="*", s=170,
                       color=color, edgecolor="black", zorder=5)
        for name, marker in (("best single", "D"), ("random", "s"), ("oracle", "o")):
            r = rows[name]
            ax.scatter([r["cost_per_1k"]], [r["accuracy"]], marker=marker, s=60, color="white", edgecolor="black",
                       zorder=4, label=LABELS[name])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"${x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.0%}"))
        ax.set_xlabel("USD per 1,000 queries (log scale)")
        ax.grid(True, alpha=0.3)
    full.scatter([], [], marker="*", s=170, color="white", edgecolor="black",
                 label="default policy (λ chosen on training prompts only)")
    full.set_ylabel("accuracy on held-out prompts")
    full.set_title("the whole range", fontsize=10)

    best, prefill = rows["best single"], rows[PREFILL]
    x0, x1 = prefill["cost_per_1k_at_lambda_train"] * 0.6, best["cost_per_1k"] * 1.3
    y0 = min(rows[name]["accuracy_at_lambda_train"] for name in ROUTERS) - 0.02
    y1 = max(max(rows[name]["curve"]["accuracy"]) for name in ROUTERS) + 0.01
    zoom.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)))
    zoom.set_xlim(x0, x1)
    zoom.set_ylim(y0, y1)
    full.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=1, color="0.4", zorder=6))
    zoom.annotate(f"{LABELS[PREFILL]}, default policy:\n{prefill['accuracy_at_lambda_train']:.1%} accurate, "
                  f"{prefill['savings_vs_best_single_at_lambda_train']:.0%} cheaper\nthan the best single model",
                  xy=(prefill["cost_per_1k_at_lambda_train"], prefill["accuracy_at_lambda_train"]),
                  xytext=(10, -52), textcoords="offset points", fontsize=8,
                  arrowprops={"arrowstyle": "->", "color": "0.3"})
    knn_is_best = rows["knn-minilm"]["savings_vs_best_single_at_lambda_train"] == 0  # its default never routes
    zoom.annotate("best single model" + (" = kNN's default" if knn_is_best else ""),
                  xy=(best["cost_per_1k"], best["accuracy"]), xytext=(-40, 18), textcoords="offset points",
                  fontsize=8, ha="center")
    zoom.set_title("zoom (dashed box): the default policies next to the best single model", fontsize=10)
    fig.suptitle(f"MMLU-Pro, {len(results['targets'])} models, {results['prompts']:,} questions, 5-fold: each curve "
                 "sweeps a router's cost weight λ", fontsize=11)
    handles, labels = full.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def table(results: dict) -> str:
    """The README's headline table: argmax and default-policy outcomes, one line per router and baseline."""
    from prefill_router.utils import markdown_table

    rows = results["rows"]
    best = rows["best single"]["cost_per_1k"]
    lines = []
    for name in (*ROUTERS, "best single", "random", "oracle"):
        r = rows[name]
        if r.get("accuracy_at_lambda_train") is not None:
            default = (f"{r['accuracy_at_lambda_train']:.1%} ± {r['accuracy_at_lambda_train_std'] * 100:.1f}",
                       f"${r['cost_per_1k_at_lambda_train']:.3f}",
                       f"{r['savings_vs_best_single_at_lambda_train']:.0%} ± "
                       f"{r['savings_vs_best_single_at_lambda_train_std'] * 100:.0f}")
        else:
            default = ("", "", f"{1 - r['cost_per_1k'] / best:.0%}" if name != "best single" else "—")
        auc = f"{r['mean_auc']:.3f}" if r.get("mean_auc") is not None else ""
        lines.append([LABELS[name], f"{r['accuracy']:.1%}", f"${r['cost_per_1k']:.3f}", *default, auc])
    return "\n".join(markdown_table(["", "argmax: accuracy", "USD / 1k", "default policy: accuracy", "USD / 1k",
                                     "saves vs best single", "mean AUC"], lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["run", "plot", "table"])
    p.add_argument("--rows", type=int, default=None, help="run: a stratified sample of N prompts (default: all held)")
    p.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m",
                   help="run: the feature store over all MMLU-Pro prompts (the reference is imported here once)")
    p.add_argument("--embedding-cache", default="runs/cache/minilm", help="run: MiniLM embedding cache folder")
    p.add_argument("--seeds", type=int, default=10, help="run: SharedTrunkNet seeds trained (the shipped recipe)")
    p.add_argument("--keep", type=int, default=5, help="run: seeds kept by validation loss")
    p.add_argument("--threads", type=int, default=2, help="run: torch and BLAS threads")
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON `run` writes and `plot` and `table` read")
    p.add_argument("--out", type=Path, default=PICTURE, help="plot: the PNG to write")
    args = p.parse_args()
    if args.step == "run":
        run(args)
        args.step = "plot"
    results = json.loads(args.results.read_text())
    if args.step == "plot":
        print(f"wrote {plot(results, args.out)}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
