"""Routing latency on a CPU: full fp32 prefill vs early exit vs early exit + dynamic int8, in one run.

For each configuration, on the same MMLU-Pro prompts:
- p50 / p95 ms per prompt at batch 1 (tokenize + prefill + pooling, the encoder's share of routing);
- tokens/s at batch 16;
- GFLOP/s reached (2 x weights of the decoder layers run x tokens) and its share of this CPU's measured fp32
  matmul peak (a 2048 x 2048 matmul, median of 5, same threads);
- the mean AUC (all 28 targets) of the matching router on a held-out split: a SharedTrunkNet trained on
  training-split features and scored on test-split features. For int8 two numbers: the fp32-trained router
  fed int8 features, and a router retrained on int8 features.

    .venv/bin/python bench/route_latency.py --threads 2 --n-latency 100 --n-auc 2000

The fp32 features for the AUC columns come from --features (the store `make run-full` or `pipeline` builds
from the reference features), else they are computed (slow: about 20 min for 2,000 prompts on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.data import load_mmlu_pro, stratified_sample, train_test_split
from prefill_router.evaluate import metrics
from prefill_router.features import FeatureSet, extract_to_store, load_encoder
from prefill_router.features.store import is_store
from prefill_router.router import train_router

FULL = [0, 6, 12, 18, 24, 30]
EARLY = [0, 6, 12, 18]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times)) / 1e9


def layer_weights(encoder, layers_run: int) -> int:
    """Multiply-accumulate weights per token of the first `layers_run` decoder layers (embeddings excluded)."""
    total = 0
    for layer in encoder.model.get_decoder().layers[:layers_run]:
        for module in layer.modules():
            weight = getattr(module, "weight", None)
            weight = weight() if callable(weight) else weight  # dynamic int8 Linear keeps it behind a method
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                total += weight.numel()
    return total


def latency(encoder, prompts: list, layers: list[int]) -> dict:
    tokens = encoder.count_tokens(prompts)
    encoder.encode(prompts[:2], poolings=("mean",), layers=layers)  # warm-up
    per_prompt = []
    for p in prompts:
        start = time.perf_counter()
        encoder.encode([p], poolings=("mean",), layers=layers)
        per_prompt.append((time.perf_counter() - start) * 1000)
    batch = prompts[:64]
    start = time.perf_counter()
    encoder.encode(batch, poolings=("mean",), layers=layers, batch_tokens=16 * int(max(tokens[:64])))
    batch_s = time.perf_counter() - start
    flops = 2 * layer_weights(encoder, max(layers)) * float(np.sum(tokens))
    return {"p50_ms": float(np.percentile(per_prompt, 50)), "p95_ms": float(np.percentile(per_prompt, 95)),
            "tokens_per_s_b16": float(np.sum(encoder.count_tokens(batch))) / batch_s,
            "gflops": flops / (np.sum(per_prompt) / 1000) / 1e9, "median_tokens": float(np.median(tokens))}


def mean_auc(X_train, Y_train, X_test, Y_test, threads: int) -> float:
    from prefill_router.data import RoutingDataset

    n = len(X_train)
    ds = RoutingDataset([str(i) for i in range(n)], ["-"] * n, [f"t{k}" for k in range(Y_train.shape[1])],
                        Y_train, np.zeros_like(Y_train))
    router = train_router(ds, X_train, None, {"pca": 200, "policy": "argmax", "calibration_folds": 0,
                                               "trunk": {"seeds": 5, "keep": 3, "threads": threads}})
    P = router.predict_proba_features(X_test)
    return float(np.nanmean(metrics.per_target_auc(Y_test, P)))


def auc_rows(args, ds) -> np.ndarray:
    """A stratified sample for the AUC split, among the rows the fp32 store already holds when there is one."""
    store = Path(args.features)
    if not is_store(store):
        return stratified_sample(ds, args.n_auc, seed=2)
    done = np.flatnonzero(np.asarray(FeatureSet.open(store).done, bool)[:ds.n])
    return done[stratified_sample(ds.subset(done), args.n_auc, seed=2)]


def fp32_features(args, ds, rows: np.ndarray) -> np.ndarray:
    """float32 [rows, 6 states, hidden] mean-pooled at FULL, from the store when it holds the rows."""
    store = Path(args.features)
    if is_store(store):
        fs = FeatureSet.open(store)
        if fs.n == ds.n and np.asarray(fs.done, bool)[rows].all() and set(FULL) <= set(fs.hidden_states["mean"]):
            return fs.get("mean", FULL, rows=rows)
    log(f"{store} lacks these rows: computing fp32 features of {rows.size} prompts (slow)")
    path = Path(args.work) / f"fp32-{rows.size}"
    return extract_to_store([ds.prompts[i] for i in rows], load_encoder(), path, poolings=["mean"],
                            layers=FULL).get("mean")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--n-latency", type=int, default=100, help="prompts timed one by one")
    ap.add_argument("--n-auc", type=int, default=2000, help="prompts for the AUC split (75 %% train, 25 %% test)")
    ap.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m", help="fp32 feature store")
    ap.add_argument("--work", default="runs/bench-route-latency", help="where int8 features are stored")
    ap.add_argument("--no-auc", action="store_true", help="latency only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = load_mmlu_pro()
    peak = matmul_peak_gflops()
    log(f"fp32 matmul peak: {peak:.1f} GFLOP/s on {args.threads} threads")
    encoders = {"fp32": load_encoder(), "int8": load_encoder(quantize="int8")}
    configs = [("full fp32 (30 layers)", "fp32", FULL), ("early exit (18 layers)", "fp32", EARLY),
               ("early exit + int8", "int8", EARLY)]
    sample = stratified_sample(ds, args.n_latency, seed=1)
    prompts = [ds.prompts[i] for i in sample]
    rows = []
    for label, kind, layers in configs:
        log(f"timing {label}")
        rows.append({"config": label, **latency(encoders[kind], prompts, layers)})

    if not args.no_auc:
        chosen = auc_rows(args, ds)
        sub = ds.subset(chosen)
        train, test = train_test_split(sub, test_size=0.25, seed=0, stratify=True)
        X = fp32_features(args, ds, chosen)
        Y = sub.Y
        log("int8 features of the AUC prompts")
        X8 = extract_to_store([ds.prompts[i] for i in chosen], encoders["int8"], Path(args.work) / f"int8-{chosen.size}",
                              poolings=["mean"], layers=EARLY).get("mean")
        early = [FULL.index(s) for s in EARLY]
        rows[0]["auc"] = mean_auc(X[train], Y[train], X[test], Y[test], args.threads)
        rows[1]["auc"] = mean_auc(X[train][:, early], Y[train], X[test][:, early], Y[test], args.threads)
        rows[2]["auc"] = mean_auc(X[train][:, early], Y[train], X8[test], Y[test], args.threads)
        rows[2]["auc_retrained"] = mean_auc(X8[train], Y[train], X8[test], Y[test], args.threads)

    print(f"\nCPU fp32 matmul peak {peak:.1f} GFLOP/s ({args.threads} threads); median prompt "
          f"{rows[0]['median_tokens']:.0f} tokens; {args.n_latency} prompts timed one by one"
          + ("" if args.no_auc else f"; AUC: mean over 28 targets, {args.n_auc} prompts, 25 % held out"))
    print("\n| configuration | p50 ms | p95 ms | tokens/s at batch 16 | GFLOP/s (% of fp32 peak) | mean AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        auc = "—" if "auc" not in r else f"{r['auc']:.3f}" + (
            f" (retrained on int8: {r['auc_retrained']:.3f})" if "auc_retrained" in r else "")
        print(f"| {r['config']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['tokens_per_s_b16']:.0f} | "
              f"{r['gflops']:.1f} ({100 * r['gflops'] / peak:.0f} %) | {auc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
