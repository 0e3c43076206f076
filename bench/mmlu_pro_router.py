"""MMLU-Pro routing with the reference SmolLM2-135M prefill features: SharedTrunkNet vs logistic vs baselines.

Rows: the questions whose reference features are done (see the features README; the category mix differs
from the full 12,002). Folds: `prefill_router.data.kfold` (prompt-level, stratified by category), seed 0.
Contenders per target pool and feature choice:
  prefill-trunk          SharedTrunkNet ensemble on scaler+PCA features (P averaged over kept seeds)
  prefill-logreg         one logistic regression per target on the same scaler+PCA features
plus random, best single (chosen on training rows) and oracle from the harness.

    .venv/bin/python bench/mmlu_pro_router.py --folds 5 --seeds 10 --keep 5 --features mean-all --out runs/h5

Costs: the dataset's C (prices x input tokens + recorded output tokens; unrecorded lengths imputed by
medians over all rows, as load_mmlu_pro does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill_router.data import kfold, load_mmlu_pro
from prefill_router.evaluate.harness import evaluate_contenders
from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
from prefill_router.evaluate.report import pool_markdown, pool_summary
from prefill_router.router.trunk import TrunkConfig

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--pca", type=int, default=200)
    ap.add_argument("--features", default="mean-all", help=f"comma list of {sorted(FEATURES)}")
    ap.add_argument("--pools", default="two,five,all", help=f"comma list of {sorted(POOLS)}")
    ap.add_argument("--threads", type=int, default=1)
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
        cache = FitCache()
        settings = PrefillSettings(pca=args.pca, logistic=not args.no_logreg,
                                   trunk=TrunkConfig(seeds=args.seeds, keep=args.keep, threads=args.threads, seed=0))
        for pool in args.pools.split(","):
            pds = sub if POOLS[pool] is None else sub.select_targets(POOLS[pool])
            cols = [sub.targets.index(t) for t in pds.targets]
            contenders = prefill_contenders(X.reshape(len(X), -1), sub.Y, sub.C, cols, feat, settings, cache)
            report = evaluate_contenders(pds.Y, pds.C, folds, contenders, targets=pds.targets,
                                         notes=[f"{len(rows)} MMLU-Pro questions with done reference features",
                                                f"features: {feat} ({pooling} pooling), PCA {args.pca}, "
                                                f"SharedTrunkNet {args.seeds} seeds keep {args.keep}, trained on all "
                                                f"{sub.k} targets' labels and read at the pool's columns"])
            report.save(out / feat / pool)
            rs = pool_summary(report)
            all_rows[f"{feat}/{pool}"] = rs
            table = pool_markdown(f"pool: {pool} ({len(pds.targets)} targets), features {feat}", rs)
            tables.append(table)
            print(table, "\n", flush=True)
    (out / "summary.json").write_text(json.dumps(all_rows, indent=1, default=float))
    (out / "summary.md").write_text("\n\n".join(tables) + "\n")
    print(f"done in {time.time() - started:.0f} s; tables in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
