"""Routing latency on a CPU: full fp32 prefill vs early exit vs early exit + int8 vs a second turn with prefix
reuse, in one run.

For each configuration, on the same MMLU-Pro prompts:
- p50 / p95 ms per prompt at batch 1 (tokenize + prefill + pooling, the encoder's share of routing);
- tokens/s at batch 16 (prompt tokens routed per second: 64 prompts in their sample order, four calls of exactly
  16 prompts each, after one untimed call of 16 other prompts, since a new batch shape is slow on its first call);
- GFLOP/s reached (2 x weights of the decoder layers run x tokens computed) and its share of this CPU's
  measured fp32 matmul peak (a 2048 x 2048 matmul, median of 5, same threads);
- the mean AUC (all 28 targets) of the matching router on held-out MMLU-Pro prompts.

AUC protocol: the held-out prompts are a stratified sample of --n-auc questions; the fp32 routers (all states
FULL, early-exit states EARLY) train on every other question the fp32 store holds (about 10,000), so one router
per row is scored on the same held-out prompts. int8 gets two numbers: the early-exit fp32 router fed int8
features (what serving int8 without retraining gives), and 5-fold cross-validation within the held-out prompts
of a router retrained on int8 features, next to the same cross-validation on their fp32 features (a paired
difference, so the sample's own noise cancels).

The second-turn row: turn 1 is the MMLU-Pro question (encoded first, which fills the prefix cache), turn 2 adds
the assistant's answer and a follow-up question (about 50 tokens with the template); only turn 2 is timed,
and its cost is compared with a full pass over the same turn-2 conversation.

    .venv/bin/python bench/route_latency.py --threads 2 --n-latency 100 --n-auc 2000

The fp32 features come from --features (the store `make run-full` or `pipeline --full` builds from the reference
features); int8 features of the held-out prompts are computed once (about 10 min for 2,000 prompts on 2 cores)
and kept under --work.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.data import load_mmlu_pro, stratified_sample
from prefill_router.evaluate import metrics
from prefill_router.features import FeatureSet, extract_to_store, load_encoder
from prefill_router.features.store import is_store
from prefill_router.router import train_router

FULL = [0, 6, 12, 18, 24, 30]
EARLY = [0, 6, 12, 18]
FOLLOW_UP = [{"role": "assistant", "content": "The answer is (B)."},
             {"role": "user", "content": "Explain briefly why each of the other options is wrong, then say how sure "
                                         "you are of the answer on a scale from one to ten, and why."}]
TRUNK = {"seeds": 5, "keep": 3}


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


def timed(encoder, prompts: list, layers: list[int], before=None) -> tuple[list[float], list[float]]:
    """(ms, tokens computed) per prompt, one at a time; `before(i)` runs untimed first (e.g. turn 1)."""
    cache = encoder.prefix_cache
    per_prompt, computed = [], []
    for i, p in enumerate(prompts):
        if before is not None:
            before(i)
        reused = cache.tokens_reused if cache is not None else 0
        start = time.perf_counter()
        encoder.encode([p], poolings=("mean",), layers=layers)
        per_prompt.append((time.perf_counter() - start) * 1000)
        computed.append(encoder.last_token_counts[0] - ((cache.tokens_reused - reused) if cache is not None else 0))
    return per_prompt, computed


def latency(encoder, prompts: list, layers: list[int], first_turns: list | None = None) -> dict:
    """Batch-1 latency and batch-16 throughput; with `first_turns`, each prompt's first turn is encoded (untimed)
    just before it, so the encoder's prefix cache holds its prefix."""
    tokens = encoder.count_tokens(prompts)
    encoder.encode((first_turns or prompts)[:2], poolings=("mean",), layers=layers)  # warm-up
    before = None
    if first_turns is not None:
        def before(i):
            encoder.encode([first_turns[i]], poolings=("mean",), layers=layers)
    per_prompt, computed = timed(encoder, prompts, layers, before)
    batch = prompts[:64]
    if first_turns is not None:
        encoder.use_prefix_cache(encoder.prefix_cache.max_bytes / 2**20)  # forget the timed turns, then
        encoder.encode(first_turns[:64], poolings=("mean",), layers=layers)  # hold only the first turns
    # Exactly 16 prompts per call, in sample order (as a gateway batches arrivals), after an untimed call of the
    # same size. (Before: one call over all 64 with a budget of 16 x the longest, so the planner, which sorts by
    # length, packed the shorter prompts into batches of up to 64 and the first call's set-up was timed too.)
    budget = 16 * int(max(tokens))
    encoder.encode((first_turns or prompts)[-16:], poolings=("mean",), layers=layers, batch_tokens=budget)
    start = time.perf_counter()
    for group in range(0, len(batch), 16):
        encoder.encode(batch[group:group + 16], poolings=("mean",), layers=layers, batch_tokens=budget)
    batch_s = time.perf_counter() - start
    flops = 2 * layer_weights(encoder, max(layers)) * float(np.sum(computed))
    return {"p50_ms": float(np.percentile(per_prompt, 50)), "p95_ms": float(np.percentile(per_prompt, 95)),
            "tokens_per_s_b16": float(np.sum(tokens[:64])) / batch_s, "per_prompt": per_prompt,
            "gflops": flops / (np.sum(per_prompt) / 1000) / 1e9, "median_tokens": float(np.median(tokens))}


def mean_auc(X_train, Y_train, X_test, Y_test, threads: int) -> float:
    from prefill_router.data import RoutingDataset

    n = len(X_train)
    ds = RoutingDataset([str(i) for i in range(n)], ["-"] * n, [f"t{k}" for k in range(Y_train.shape[1])],
                        Y_train, np.zeros_like(Y_train))
    router = train_router(ds, X_train, None, {"pca": 200, "policy": "argmax", "calibration_folds": 0,
                                               "trunk": {**TRUNK, "threads": threads}})
    P = router.predict_proba_features(X_test)
    return float(np.nanmean(metrics.per_target_auc(Y_test, P)))


def cv_auc(X: np.ndarray, Y: np.ndarray, threads: int, folds: int = 5) -> np.ndarray:
    """Mean AUC of each of `folds` cross-validation folds (seeded, so two feature sets get the same folds)."""
    order = np.random.default_rng(0).permutation(len(X))
    out = []
    for k in range(folds):
        test = np.sort(order[k::folds])
        train = np.setdiff1d(np.arange(len(X)), test)
        out.append(mean_auc(X[train], Y[train], X[test], Y[test], threads))
    return np.array(out)


def fp32_store(args, ds) -> FeatureSet:
    store = Path(args.features)
    if not is_store(store):
        raise SystemExit(f"{store} is not a feature store: build it with `prefill-router pipeline --full` "
                         f"(or pass --features), or run with --no-auc")
    fs = FeatureSet.open(store)
    if fs.n != ds.n or not set(FULL) <= set(fs.hidden_states["mean"]):
        raise SystemExit(f"{store} must hold mean pooling at states {FULL} for all {ds.n} MMLU-Pro questions")
    return fs


def held_out(args, ds, fs: FeatureSet) -> np.ndarray:
    """The AUC columns' held-out questions: a stratified sample of those the fp32 store holds."""
    done = np.flatnonzero(np.asarray(fs.done, bool))
    return done[stratified_sample(ds.subset(done), args.n_auc, seed=2)]


def int8_features(args, ds, rows: np.ndarray, encoder) -> np.ndarray:
    """int8 features [rows, EARLY, H] of those questions, computed once into --work."""
    return extract_to_store([ds.prompts[i] for i in rows], encoder, Path(args.work) / f"int8-{rows.size}",
                            poolings=["mean"], layers=EARLY).get("mean")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--n-latency", type=int, default=100, help="prompts timed one by one")
    ap.add_argument("--n-auc", type=int, default=2000, help="held-out prompts for the AUC columns")
    ap.add_argument("--features", default="runs/features/mmlu-pro-smollm2-135m", help="fp32 feature store")
    ap.add_argument("--work", default="runs/bench-route-latency", help="where int8 features are stored")
    ap.add_argument("--no-auc", action="store_true", help="latency only")
    ap.add_argument("--prepare", action="store_true",
                    help="only compute the held-out prompts' int8 features (the slow part), then stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = load_mmlu_pro()
    if args.prepare:
        int8_features(args, ds, held_out(args, ds, fp32_store(args, ds)), load_encoder(quantize="int8"))
        return 0
    peak = matmul_peak_gflops()
    log(f"fp32 matmul peak: {peak:.1f} GFLOP/s on {args.threads} threads")
    encoders = {"fp32": load_encoder(), "int8": load_encoder(quantize="int8")}
    for kind in ("fp32", "int8"):  # the same models, with prefix reuse on
        encoders[f"{kind}+reuse"] = copy.copy(encoders[kind])
        encoders[f"{kind}+reuse"].use_prefix_cache(1024)
    sample = stratified_sample(ds, args.n_latency, seed=1)
    prompts = [ds.prompts[i] for i in sample]
    turn_1 = [[{"role": "user", "content": p}] for p in prompts]
    turn_2 = [t + FOLLOW_UP for t in turn_1]
    rows = []
    for label, kind, layers in [("full fp32 (30 layers), the naive way", "fp32", FULL),
                                ("early exit (18 layers)", "fp32", EARLY), ("early exit + int8", "int8", EARLY)]:
        log(f"timing {label}")
        rows.append({"config": label, **latency(encoders[kind], prompts, layers)})
    added = encoders["fp32"].count_tokens(turn_2) - encoders["fp32"].count_tokens(turn_1)
    log("timing a second turn: full passes, then with prefix reuse")
    whole = {"naive": latency(encoders["fp32"], turn_2, FULL), "fp32": latency(encoders["fp32"], turn_2, EARLY),
             "int8": latency(encoders["int8"], turn_2, EARLY)}
    second = {}
    for kind, label in (("fp32", "early exit"), ("int8", "early exit + int8")):
        second[kind] = latency(encoders[f"{kind}+reuse"], turn_2, EARLY, first_turns=turn_1)
        rows.append({"config": f"second turn (+{np.median(added):.0f} tokens), {label} + prefix reuse", **second[kind]})

    cv = None
    if not args.no_auc:
        fs = fp32_store(args, ds)
        test = held_out(args, ds, fs)
        train = np.setdiff1d(np.flatnonzero(np.asarray(fs.done, bool)), test)
        log(f"AUC: routers trained on {train.size} questions, scored on {test.size} held-out ones")
        X_train, X_test = fs.get("mean", FULL, rows=train), fs.get("mean", FULL, rows=test)
        early = [FULL.index(s) for s in EARLY]
        log("int8 features of the held-out prompts")
        X8 = int8_features(args, ds, test, encoders["int8"])
        Y_train, Y_test = ds.Y[train], ds.Y[test]
        rows[0]["auc"] = mean_auc(X_train, Y_train, X_test, Y_test, args.threads)
        rows[1]["auc"] = mean_auc(X_train[:, early], Y_train, X_test[:, early], Y_test, args.threads)
        rows[2]["auc"] = mean_auc(X_train[:, early], Y_train, X8, Y_test, args.threads)
        rows[3]["auc"] = rows[1]["auc"]  # the same features within float rounding (tests/test_prefix_cache.py)
        rows[4]["auc"] = rows[2]["auc"]
        log("5-fold CV within the held-out prompts: fp32 vs int8 features")
        cv = {"fp32": cv_auc(X_test[:, early], Y_test, args.threads), "int8": cv_auc(X8, Y_test, args.threads)}

    print(f"\nCPU fp32 matmul peak {peak:.1f} GFLOP/s ({args.threads} threads); median prompt "
          f"{rows[0]['median_tokens']:.0f} tokens; {args.n_latency} prompts timed one by one"
          + ("" if args.no_auc else f"; AUC: mean over 28 targets on {args.n_auc} held-out prompts"))
    print("\n| configuration | p50 ms | p95 ms | tokens/s at batch 16 | GFLOP/s (% of fp32 peak) | mean AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        auc = "—" if "auc" not in r else f"{r['auc']:.3f}"
        print(f"| {r['config']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['tokens_per_s_b16']:.0f} | "
              f"{r['gflops']:.1f} ({100 * r['gflops'] / peak:.0f} %) | {auc} |")
    print(f"\nSecond turn: median {np.median(added):.0f} tokens added to a {whole['fp32']['median_tokens']:.0f}-token "
          f"conversation. Cost with prefix reuse (median of per-prompt ratios):")
    for kind, label in (("fp32", "early exit"), ("int8", "early exit + int8")):
        mine = np.array(second[kind]["per_prompt"])
        print(f"- {label}: {100 * np.median(mine / np.array(whole[kind]['per_prompt'])):.0f} % of a full pass in the "
              f"same configuration (p50 {whole[kind]['p50_ms']:.0f} ms), "
              f"{100 * np.median(mine / np.array(whole['naive']['per_prompt'])):.0f} % of the naive full fp32 pass "
              f"(p50 {whole['naive']['p50_ms']:.0f} ms)")
    if cv is not None:
        diff = cv["int8"] - cv["fp32"]
        print(f"Retrained on int8 features (5-fold CV within the held-out prompts): {cv['int8'].mean():.3f} vs "
              f"{cv['fp32'].mean():.3f} on fp32 features; paired difference {diff.mean():+.4f} "
              f"(fold std {diff.std(ddof=1):.4f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
