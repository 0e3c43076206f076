"""MMLU-Pro routing with the reference SmolLM2-135M prefill features: SharedTrunkNet vs logistic vs baselines.

Rows: the questions whose reference features are done (see the features README; the category mix differs
from the full 12,002). Folds: `prefill_router.data.kfold` (prompt-level, stratified by category), seed 0.
Contenders per target pool and feature choice:
  prefill-trunk          SharedTrunkNet ensemble on scaler+PCA features (P averaged over kept seeds)
  prefill-trunk+robust   the same P through RobustPolicy (shrinkage, frontier pruning, margin to leave the best
                         target), fitted on out-of-fold predictions of the TRAINING rows only. The harness sweeps
                         the utility policy over the policy's adjusted scores (P' shrunk; ineligible targets -1;
                         anchor + margin), which is exactly RobustPolicy at each lambda. Its AUC column is that of
                         the adjusted scores (targets pruned or with alpha = 0 score 0.5), so read AUC on the plain row.
  prefill-logreg         one logistic regression per target on the same scaler+PCA features
plus random, best single (chosen on training rows) and oracle from the harness.

    .venv/bin/python bench/mmlu_pro_router.py --folds 5 --seeds 10 --keep 5 --features mean-all --out runs/h5

Costs: the dataset's C (prices x input tokens + recorded output tokens; unrecorded lengths imputed by
medians over all rows, as load_mmlu_pro does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill_router.data import kfold, load_mmlu_pro
from prefill_router.evaluate.harness import Contender, evaluate_contenders
from prefill_router.evaluate.sweep import Curve
from prefill_router.router.baselines import LogisticPredictor
from prefill_router.router.robust import fit_robust_policy, out_of_fold_proba
from prefill_router.router.transform import FeatureTransform
from prefill_router.router.trunk import TrunkConfig, TrunkEnsemble

POOLS = {
    "two": ["gemini-1.5-pro-002", "gemini-1.5-flash-002"],
    "five": ["gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-70B-Instruct",
             "Meta-Llama-3_1-8B-Instruct", "Qwen1.5-110B"],
    "all": None,
}
# name -> (pooling, hidden states); the reference holds mean at 0,6,12,18,24,30 and last at 18,24
FEATURES = {"mean-all": ("mean", None), "mean-18": ("mean", [18]), "last": ("last", None),
            "mean-12-18-24": ("mean", [12, 18, 24])}


def reference_features(folder: Path, pooling: str, states: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(done mask [N], features [N, L, H] float32) de-quantized as the reference README says."""
    layout = json.loads((folder / "layout.json").read_text())
    held = layout["hidden_states"][pooling]
    pick = list(range(len(held))) if states is None else [held.index(s) for s in states]
    done = np.load(folder / "done.npy")
    q = np.load(folder / f"{pooling}_int8.npy", mmap_mode="r")
    offset = np.load(folder / f"{pooling}_offset.npy")[pick]
    scale = np.load(folder / f"{pooling}_scale.npy")[pick]
    X = offset + scale * (q[:, pick, :].astype(np.float32) + 128)
    return done, X.astype(np.float32)


def _key(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else str(p).encode())
    return h.hexdigest()


class Cache:
    """Fitted transforms and ensembles shared by the contenders of one fold (each is fitted once)."""

    def __init__(self):
        self.store: dict[str, object] = {}

    def get(self, key: str, make):
        if key not in self.store:
            self.store[key] = make()
        return self.store[key]


def make_contenders(cols: list[int], X: np.ndarray, Y: np.ndarray, C: np.ndarray, feat: str, args, cache: Cache):
    """Contenders for the pool `cols` (column indices into Y and C, which hold every target).

    X given to the harness is row indices; the closures hold features, labels and costs of every row.
    Every model is trained on ALL targets' labels of the training rows (the multi-output trunk shares them;
    per-target logistic regressions are independent anyway) and then read at the pool's columns, so the three
    pools reuse one fit per fold. The robust policy is fitted per pool on those columns.
    """
    trunk_cfg = TrunkConfig(seeds=args.seeds, keep=args.keep, threads=args.threads, seed=0)
    small_cfg = trunk_cfg.model_copy(update={"seeds": args.robust_seeds, "keep": min(args.keep, args.robust_seeds)})

    def transform(rows):
        return cache.get(_key("tf", feat, rows), lambda: FeatureTransform(args.pca).fit(X[rows]))

    def Z(rows, fit_rows):
        return transform(fit_rows).transform(X[rows])

    class Base:
        def fit(self, idx, Ytr):
            self.rows = np.asarray(idx)
            return self

    class Trunk(Base):
        def model(self):
            return cache.get(_key("trunk", feat, self.rows),
                             lambda: TrunkEnsemble(trunk_cfg).fit(Z(self.rows, self.rows), Y[self.rows]))

        def fit(self, idx, Ytr):
            super().fit(idx, Ytr)
            self.model()
            return self

        def predict_proba(self, idx):
            return self.model().predict_proba(Z(np.asarray(idx), self.rows))[:, cols]

    class Robust(Trunk):
        def fit(self, idx, Ytr):
            super().fit(idx, Ytr)
            P_oof = cache.get(_key("oof", feat, self.rows), lambda: out_of_fold_proba(
                Z(self.rows, self.rows), Y[self.rows], lambda: TrunkEnsemble(small_cfg), args.robust_folds, 0))
            self.policy = fit_robust_policy(P_oof[:, cols], Y[self.rows][:, cols], C[self.rows][:, cols])
            return self

        def predict_proba(self, idx):
            p = self.policy
            S = p.calibrate(super().predict_proba(idx))
            S[:, ~p.eligible] = -1.0
            S[:, p.anchor] += p.margin
            return S

    class Logistic(Base):
        def fit(self, idx, Ytr):
            super().fit(idx, Ytr)
            self.model = cache.get(_key("logreg", feat, self.rows),
                                   lambda: LogisticPredictor().fit(Z(self.rows, self.rows), Y[self.rows]))
            return self

        def predict_proba(self, idx):
            return self.model.predict_proba(Z(np.asarray(idx), self.rows))[:, cols]

    rows = np.arange(len(Y))
    out = [Contender(f"prefill-trunk [{feat}]", Trunk, rows)]
    if not args.no_robust:
        out.append(Contender(f"prefill-trunk+robust [{feat}]", Robust, rows))
    if not args.no_logreg:
        out.append(Contender(f"prefill-logreg [{feat}]", Logistic, rows))
    return out


def summary_rows(report) -> list[dict]:
    out = []
    for r in report.rows:
        def m(key, r=r):
            return r.stat(key)[0]
        best_curve_acc = float("nan")
        if r.curves:
            best_curve_acc = float(np.mean([np.nanmax(Curve.from_dict(c).accuracy) for c in r.curves]))
        out.append({"name": r.name, "mean_auc": m("mean_auc"), "accuracy": m("accuracy"),
                    "gap_captured": m("gap_captured"), "cost_per_1k": m("cost_per_1k"),
                    "savings_vs_most_expensive": m("savings_vs_most_expensive"),
                    "savings_at_best_single_accuracy": m("savings_at_best_single_accuracy"),
                    "savings_at_lambda_train": m("savings_at_lambda_train"),
                    "accuracy_at_lambda_train": m("accuracy_at_lambda_train"),
                    "max_curve_accuracy": best_curve_acc, "aiq": m("aiq")})
    return out


def fmt_table(pool: str, rows: list[dict]) -> str:
    def pct(x):
        return "—" if not np.isfinite(x) else f"{100 * x:.1f}%"

    def num(x, d=3):
        return "—" if not np.isfinite(x) else f"{x:.{d}f}"

    lines = [f"### pool: {pool}", "",
             "| contender | mean AUC | argmax acc | gap captured | $/1k q (argmax) | savings @ best-single acc "
             "(test sweep) | savings @ λ_train | acc @ λ_train | max acc on curve | AIQ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {num(r['mean_auc'])} | {pct(r['accuracy'])} | {pct(r['gap_captured'])} | "
                     f"{num(r['cost_per_1k'], 4)} | {pct(r['savings_at_best_single_accuracy'])} | "
                     f"{pct(r['savings_at_lambda_train'])} | {pct(r['accuracy_at_lambda_train'])} | "
                     f"{pct(r['max_curve_accuracy'])} | {num(r['aiq'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--pca", type=int, default=200)
    ap.add_argument("--robust-seeds", type=int, default=2)
    ap.add_argument("--robust-folds", type=int, default=3)
    ap.add_argument("--features", default="mean-all", help=f"comma list of {sorted(FEATURES)}")
    ap.add_argument("--pools", default="two,five,all", help=f"comma list of {sorted(POOLS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-robust", action="store_true")
    ap.add_argument("--no-logreg", action="store_true")
    ap.add_argument("--out", default="runs/h5-mmlu-pro-router")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    ds = load_mmlu_pro(args.data_root)
    ref = Path(args.data_root) / "mmlu-pro" / "features-smollm2-135m"
    tables = []
    all_rows: dict = {}
    for feat in args.features.split(","):
        pooling, states = FEATURES[feat]
        done, X_all = reference_features(ref, pooling, states)
        rows = np.flatnonzero(done)
        sub = ds.subset(rows)
        X = X_all[rows]
        folds = kfold(sub, k=args.folds, seed=0)
        cache = Cache()
        for pool in args.pools.split(","):
            pds = sub if POOLS[pool] is None else sub.select_targets(POOLS[pool])
            cols = [sub.targets.index(t) for t in pds.targets]
            contenders = make_contenders(cols, X, sub.Y, sub.C, feat, args, cache)
            report = evaluate_contenders(pds.Y, pds.C, folds, contenders, targets=pds.targets,
                                         notes=[f"{len(rows)} MMLU-Pro questions with done reference features",
                                                f"features: {feat} ({pooling} pooling), PCA {args.pca}, "
                                                f"SharedTrunkNet {args.seeds} seeds keep {args.keep}, trained on all "
                                                f"{sub.k} targets' labels and read at the pool's columns"])
            report.save(out / feat / pool)
            rs = summary_rows(report)
            all_rows[f"{feat}/{pool}"] = rs
            table = fmt_table(f"{pool} ({len(pds.targets)} targets), features {feat}", rs)
            tables.append(table)
            print(table, "\n", flush=True)
    (out / "summary.json").write_text(json.dumps(all_rows, indent=1, default=float))
    (out / "summary.md").write_text("\n\n".join(tables) + "\n")
    print(f"done in {time.time() - started:.0f} s; tables in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
