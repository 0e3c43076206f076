"""Label efficiency on MMLU-Pro (issue 13, item 7): learning curves, and a new target from few labels.

    OMP_NUM_THREADS=1 .venv/bin/python bench/label_efficiency.py curves --out runs/label-efficiency
    OMP_NUM_THREADS=1 .venv/bin/python bench/label_efficiency.py new-target --out runs/label-efficiency
    .venv/bin/python bench/label_efficiency.py report --out runs/label-efficiency    # tables and PNGs again

Rows: the MMLU-Pro questions whose SmolLM2-135M features are done in --features (mean pooling, hidden states
0, 6, 12, 18 concatenated). Folds: `data.kfold` over all those rows (5, seed 0, stratified by category); the test
folds never change. Each training set of N prompts is a category-stratified sample of the fold's training rows
(`data.stratified_sample`, seed = fold index).

curves: for each N, `evaluate.harness.evaluate_contenders` on the subsampled folds with the prefill SharedTrunkNet
(`evaluate.prefill.prefill_contenders`, scaler + PCA fitted on the N prompts) and the MiniLM MLP and kNN
(`evaluate.contenders.build_contenders`, embeddings cached under --embedding-cache). Reported per fold: mean AUC,
gap captured (argmax), and the default policy chosen on training rows only (3-fold cross-fitted, the harness's
default): its test accuracy, savings against always calling the best single target, and gap captured.

new-target: per fold, a router trained on all of the fold's training rows for every target but --target, then
`router.add_target.add_target` fits --target's head from N of those rows' labels; its AUC on the fold's test rows
against two routers trained from scratch on the same N prompts (fresh scaler + PCA + SharedTrunkNet): one on
--target's labels only (the same labels add-target gets), one on all 28 targets' labels of those prompts (28 x
more labels). Reference lines: the 27-target router's mean old head before any label (N = 0), and a router
trained on all training rows and all 28 targets.

Each step rewrites <out>/<part>.json, .md and .png, so an interrupted run keeps what it finished; `curves` run
again with the same settings and --out skips the sizes already there.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before NumPy loads BLAS: the machine is shared

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill_router.data import kfold, load_mmlu_pro, stratified_sample
from prefill_router.features import FeatureSet
from prefill_router.router.trunk import TrunkConfig, TrunkEnsemble
from prefill_router.utils import markdown_table, roc_auc

SIZES = "250,500,1000,2000,4000,all"
NEW_TARGET_SIZES = "50,100,250,500,1000"
# metric key -> (column title, percent?)
CURVE_METRICS = {
    "mean_auc": ("mean AUC", False),
    "gap_captured": ("gap captured (argmax)", True),
    "accuracy_at_lambda_train": ("acc @ λ_train", True),
    "savings_vs_best_single_at_lambda_train": ("savings vs best single @ λ_train", True),
    "gap_captured_at_lambda_train": ("gap captured @ λ_train", True),
}
PLOTTED = ["mean_auc", "gap_captured", "savings_vs_best_single_at_lambda_train"]


def load(args):
    """(dataset of the used rows, features [n, states, H], folds, what) with every done row of the store."""
    ds = load_mmlu_pro(args.data_root)
    store = FeatureSet.open(args.features)
    at = store.rows_of(ds.prompts)
    used = np.flatnonzero(store.done[at])
    states = [int(s) for s in args.states.split(",")]
    X = store.get("mean", states, rows=at[used])
    sub = ds.subset(used)
    folds = kfold(sub, k=args.folds, seed=args.seed)
    what = (f"{len(used)} of {ds.n} MMLU-Pro questions (those whose features are done in {args.features}), "
            f"mean pooling at hidden states {states}, {args.folds} folds (seed {args.seed})")
    return sub, X, folds, store, states, what


def subsample(ds, train: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """`size` of the training rows, stratified by category (all of them for None)."""
    if size is None or size >= train.size:
        return train
    return train[stratified_sample(ds.subset(train), size, seed=seed)]


def sizes_of(text: str) -> list[int | None]:
    return [None if s.strip() == "all" else int(s) for s in text.split(",")]


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def stat(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def cell(values, pct: bool) -> str:
    mean, std = stat(values)
    if not np.isfinite(mean):
        return "—"
    return f"{100 * mean:.1f} ± {100 * std:.1f}%" if pct else f"{mean:.3f} ± {std:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# learning curves
# ----------------------------------------------------------------------------------------------------------------
def curves(args) -> int:
    from prefill_router.evaluate.contenders import ContenderSettings, build_contenders
    from prefill_router.evaluate.harness import evaluate_contenders
    from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sub, X, folds, _, states, what = load(args)
    X = X.reshape(len(X), -1)
    semantic = [n for n in args.semantic.split(",") if n]
    t = time.time()
    baselines = build_contenders(semantic, sub, ContenderSettings(cache_dir=args.embedding_cache, seed=args.seed,
                                                                  threads=args.threads)) if semantic else []
    print(f"{what}; semantic inputs in {time.time() - t:.0f} s", flush=True)
    trunk = TrunkConfig(seeds=args.seeds, keep=args.keep, seed=args.seed, threads=args.threads)
    result = {"what": what, "seeds": args.seeds, "keep": args.keep, "pca": args.pca,
              "calibration_folds": args.calibration_folds, "load_start": load_avg(), "sizes": []}
    settings = ("what", "seeds", "keep", "pca", "calibration_folds")
    previous = json.loads((out / "curves.json").read_text()) if (out / "curves.json").is_file() else None
    if previous and all(previous.get(key) == result[key] for key in settings):
        result = previous  # resume: the sizes an interrupted run finished are kept, not recomputed
    finished = {entry["size"] for entry in result["sizes"]}
    for size in sizes_of(args.sizes):
        if ("all" if size is None else size) in finished:
            continue
        t = time.time()
        folds_n = [(subsample(sub, train, size, args.seed + f), test) for f, (train, test) in enumerate(folds)]
        prefill = prefill_contenders(X, sub.Y, sub.C, list(range(sub.k)), "mean-" + "-".join(map(str, states)),
                                     PrefillSettings(pca=args.pca, trunk=trunk, logistic=False), FitCache())
        report = evaluate_contenders(sub.Y, sub.C, folds_n, prefill + baselines, targets=sub.targets,
                                     seed=args.seed, groups=sub.groups, calibration_folds=args.calibration_folds,
                                     progress=False)
        entry = {"size": "all" if size is None else size, "train_rows": [int(tr.size) for tr, _ in folds_n],
                 "seconds": round(time.time() - t), "load": load_avg(), "rows": {}}
        for row in report.rows:
            if row.kind == "router" or row.name == "best single":
                entry["rows"][row.name] = {m: [f.get(m) for f in row.folds] for m in CURVE_METRICS}
        result["sizes"].append(entry)
        result["seconds"] = sum(entry["seconds"] for entry in result["sizes"])
        result["load_end"] = load_avg()
        write_curves(out, result)
        print(f"N={entry['size']}: {entry['seconds']} s (load {entry['load']})", flush=True)
    print((out / "curves.md").read_text())
    return 0


def write_curves(out: Path, result: dict) -> None:
    (out / "curves.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    names = [n for n in result["sizes"][0]["rows"] if n != "best single"]
    lines = [f"Rows: {result['what']}. SharedTrunkNet {result['seeds']} seeds, {result['keep']} kept, PCA "
             f"{result['pca']}; λ_train chosen on {result['calibration_folds']}-fold cross-fitted predictions of "
             "the N training prompts. Mean ± std over folds, every number on the fixed test folds.", ""]
    header = ["N (train prompts)", "contender", *(title for title, _ in CURVE_METRICS.values())]
    rows = []
    for entry in result["sizes"]:
        n = f"{entry['size']} ({int(np.mean(entry['train_rows']))})" if entry["size"] == "all" else entry["size"]
        for name in names:
            rows.append([n, name, *(cell(entry["rows"][name][m], pct) for m, (_, pct) in CURVE_METRICS.items())])
    lines += markdown_table(header, rows, align="rl" + "r" * len(CURVE_METRICS))
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    plot(out / "curves.png", result["sizes"], names, PLOTTED, "MMLU-Pro learning curves (5-fold, test folds fixed)")


def plot(path: Path, sizes: list[dict], names: list[str], metrics: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [float(np.mean(e["train_rows"])) for e in sizes]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        title_m, pct = CURVE_METRICS[metric]
        scale = 100 if pct else 1
        for name in names:
            m, s = zip(*(stat(e["rows"][name][metric]) for e in sizes))
            ax.errorbar(x, scale * np.array(m), yerr=scale * np.nan_to_num(np.array(s)), marker="o", ms=3,
                        capsize=2, label=name)
        ax.set_xscale("log")
        _ticks(ax, x, [str(e["size"]) if e["size"] != "all" else f"all\n({int(v)})" for e, v in zip(sizes, x)])
        ax.set_xlabel("labelled training prompts")
        ax.set_title(title_m + (" (%)" if pct else ""), fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ticks(ax, values, labels) -> None:
    """Ticks at the measured sizes only (a log axis would label 3x10^2, 4x10^2, ...)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(values, labels, fontsize=8)


# ----------------------------------------------------------------------------------------------------------------
# a new target from few labels
# ----------------------------------------------------------------------------------------------------------------
def new_target(args) -> int:
    from prefill_router.router import FeatureTransform, Router
    from prefill_router.router.add_target import add_target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sub, X, folds, store, states, what = load(args)
    k = sub.targets.index(args.target)
    others = [j for j in range(sub.k) if j != k]
    y = sub.Y[:, k]
    cfg = TrunkConfig(seeds=args.seeds, keep=args.keep, seed=args.seed, threads=args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"what": what, "target": args.target, "seeds": args.seeds, "keep": args.keep, "pca": args.pca,
              "sizes": sizes, "load_start": load_avg(), "folds": []}
    print(what, flush=True)
    for f, (train, test) in enumerate(folds):
        t = time.time()
        transform = FeatureTransform(dims=args.pca).fit(X[train], seed=args.seed)
        Ztr, Zte = transform.transform(X[train]), transform.transform(X[test])
        trunk = TrunkEnsemble(cfg).fit(Ztr, sub.Y[train][:, others])
        router = Router(targets=[sub.targets[j] for j in others], transform=transform, predictor=trunk,
                        pooling="mean", hidden_states=states, encoder_identity=store.identity)
        fold = {"fold": f, "train_rows": int(train.size), "test_rows": int(test.size),
                "prior": roc_auc(y[test], mean_old_head(trunk, Zte)),
                "full_28": roc_auc(y[test], TrunkEnsemble(cfg).fit(Ztr, sub.Y[train]).predict_proba(Zte)[:, k]),
                "add_target": [], "scratch_single": [], "scratch_28": [], "alpha": []}
        for size in sizes:
            rows = subsample(sub, train, size, args.seed + f)
            new = add_target(router, args.target, X[rows], y[rows], seed=f)
            fold["add_target"].append(roc_auc(y[test], new.predict_proba_features(X[test])[:, -1]))
            info = new.training["added_targets"][-1]
            fold["alpha"].append([info["alpha_mix"], info["alpha_free"]])
            scratch = FeatureTransform(dims=args.pca).fit(X[rows], seed=args.seed)
            Zn, Zn_te = scratch.transform(X[rows]), scratch.transform(X[test])
            fold["scratch_single"].append(roc_auc(y[test], TrunkEnsemble(cfg).fit(Zn, y[rows, None])
                                                  .predict_proba(Zn_te)[:, 0]))
            fold["scratch_28"].append(roc_auc(y[test], TrunkEnsemble(cfg).fit(Zn, sub.Y[rows])
                                              .predict_proba(Zn_te)[:, k]))
        fold["seconds"], fold["load"] = round(time.time() - t), load_avg()
        result["folds"].append(fold)
        result["seconds"], result["load_end"] = round(time.time() - started), load_avg()
        write_new_target(out, result)
        print(f"fold {f}: {fold['seconds']} s (load {fold['load']})", flush=True)
    print((out / "new_target.md").read_text())
    return 0


def mean_old_head(trunk: TrunkEnsemble, Z: np.ndarray) -> np.ndarray:
    """The ensemble's mean over members of sigmoid(mean old output row): the new head's prior, before labels."""
    with torch.no_grad():
        Zt = torch.from_numpy(np.ascontiguousarray(Z, dtype=np.float32))
        return np.mean([torch.sigmoid(net.trunk(Zt) @ net.head.weight.mean(0) + net.head.bias.mean()).numpy()
                        for net in trunk.members], axis=0)


NEW_TARGET_ROWS = {
    "add_target": "add-target: new head on the frozen 27-target trunk",
    "scratch_single": "from scratch: SharedTrunkNet on the N prompts, this target's labels only",
    "scratch_28": "from scratch: SharedTrunkNet on the N prompts, all 28 targets' labels",
}


def write_new_target(out: Path, result: dict) -> None:
    (out / "new_target.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    folds, sizes = result["folds"], result["sizes"]
    lines = [f"Target {result['target']}, held out from the trunk. Rows: {result['what']}. SharedTrunkNet "
             f"{result['seeds']} seeds, {result['keep']} kept, PCA {result['pca']}; {len(folds)} fold(s) done. AUC "
             "of the target on the fixed test folds, mean ± std over folds.", ""]
    header = ["router", *(f"N={n}" for n in sizes)]
    rows = [[title, *(cell([fo[key][i] for fo in folds], False) for i in range(len(sizes)))]
            for key, title in NEW_TARGET_ROWS.items()]
    lines += markdown_table(header, rows)
    alphas = [[fo["alpha"][i] for fo in folds] for i in range(len(sizes))]
    prior, full = cell([fo["prior"] for fo in folds], False), cell([fo["full_28"] for fo in folds], False)
    lines += ["", f"Reference: the 27-target trunk's mean old head before any label {prior}; a router on all "
              f"~{int(np.mean([fo['train_rows'] for fo in folds]))} training prompts and all 28 targets {full}. "
              "add-target's penalties (α_mix/α_free, per fold; – = no free correction): "
              + "; ".join(f"N={n}: " + ", ".join(f"{m:g}/{'–' if f is None else f'{f:g}'}" for m, f in al)
                          for n, al in zip(sizes, alphas))]
    (out / "new_target.md").write_text("\n".join(lines) + "\n")
    plot_new_target(out / "new_target.png", result)


def plot_new_target(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds, sizes = result["folds"], result["sizes"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, title in NEW_TARGET_ROWS.items():
        m, s = zip(*(stat([fo[key][i] for fo in folds]) for i in range(len(sizes))))
        ax.errorbar(sizes, m, yerr=np.nan_to_num(np.array(s)), marker="o", ms=3, capsize=2, label=title)
    for key, style, title in (("prior", ":", "mean old head, 0 labels"),
                              ("full_28", "--", "all training prompts x 28 targets")):
        ax.axhline(stat([fo[key] for fo in folds])[0], color="grey", ls=style, lw=1, label=title)
    ax.set_xscale("log")
    _ticks(ax, sizes, [str(n) for n in sizes])
    ax.set_xlabel(f"labelled prompts for {result['target']}")
    ax.set_ylabel("held-out AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"A new target from few labels: {result['target']} on MMLU-Pro", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["curves", "new-target", "report"],
                    help="report: rewrite the tables and PNGs from the JSON files in --out")
    ap.add_argument("--data-root", default=None, help="MMLU-Pro data folder (default: the shipped data)")
    ap.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m")
    ap.add_argument("--states", default="0,6,12,18", help="mean-pooled hidden states concatenated")
    ap.add_argument("--sizes", default=None, help=f"training prompts per fold (curves: {SIZES}; new-target: "
                                                  f"{NEW_TARGET_SIZES})")
    ap.add_argument("--target", default="gemini-1.5-flash-002", help="new-target: the target held out")
    ap.add_argument("--semantic", default="mlp,knn", help="curves: semantic baselines (MiniLM)")
    ap.add_argument("--embedding-cache", default="runs/cache/embeddings")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=5, help="SharedTrunkNet seeds trained")
    ap.add_argument("--keep", type=int, default=3, help="seeds kept")
    ap.add_argument("--pca", type=int, default=200)
    ap.add_argument("--calibration-folds", type=int, default=3, help="curves: λ_train's cross-fitting folds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/label-efficiency")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "report":
        out = Path(args.out)
        for name, write in (("curves", write_curves), ("new_target", write_new_target)):
            if (out / f"{name}.json").is_file():
                write(out, json.loads((out / f"{name}.json").read_text()))
                print((out / f"{name}.md").read_text())
        return 0
    if args.part == "curves":
        args.sizes = args.sizes or SIZES
        return curves(args)
    args.sizes = args.sizes or NEW_TARGET_SIZES
    return new_target(args)


if __name__ == "__main__":
    raise SystemExit(main())
