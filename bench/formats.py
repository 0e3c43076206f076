"""Number formats on this CPU: speed and routing AUC of the encoder in fp32, bf16 and int8, in one run (issue 22),
with the fast fallback scorer beside them and one worker of two threads against two workers of one.

Every format runs the real SmolLM2-135M encoder with the gateway's routing window (512 tokens) and early exit
at the router's deepest state (hidden state 18: the router reads mean pooling at 0, 6, 12, 18).

Speed: --n-speed MMLU-Pro prompts (stratified, seed 1) in a fixed random order, encoded in consecutive groups of
1, 4 or 16, one encoder call (one padded batch) per group: what a gateway forming batches in arrival order gets.
Each (format, batch size) first runs one untimed warm-up group of that size (a new batch shape allocates and
picks kernels on its first call), then the timed pass; formats are interleaved within each of --repeats rounds,
so load changes hit them alike, and the table gives the median over rounds of prompt tokens routed per second
(real tokens, padding not counted). fp32 at batch 1 is the naive baseline; ratios are against it.

AUC: one router (SharedTrunkNet, PCA 200; its fallback scorer comes with it) is trained on the reference fp32
features (`shared/data/mmlu-pro/features-smollm2-135m`, mean at 0, 6, 12, 18) of --n-train questions, then
scores --n-test other questions (stratified, seed 2) from each format's own features of them; mean AUC over the
28 targets. The router, the prompts and the labels are the same for every format, so the difference to fp32 is
the format's alone. The fallback row scores the same questions from the token-embedding mean.

Fallback: `Router.predict_fallback` per prompt (tokenize + embedding mean + logistic), median and p90 ms over the
speed prompts and over prompts of at least 512 tokens, which the window cuts to 512.

Workers: --n-workers prompts at batch 1, either by one worker with two torch threads, or by two workers (Python
threads, torch threads 1 each) taking alternate prompts; tokens/s over the whole pass, median of the rounds. This
part runs in two child processes, one with OpenMP's default wait policy (idle threads spin before they sleep)
and one with OMP_WAIT_POLICY=PASSIVE (they sleep at once): libgomp reads it once, when torch loads. On a busy
machine the spinning threads of one worker take the cores its other thread needs.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/formats.py --threads 2 --n-speed 32 --n-test 300 --repeats 2

The main table runs under the wait policy of the command's environment; its header says which.

    .venv/bin/python bench/formats.py --fallback-cost      # only the fallback's cost, beside the encoder's (2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.data import load_mmlu_pro, stratified_sample
from prefill_router.evaluate import metrics
from prefill_router.features import load_encoder
from prefill_router.features.formats import cpu_flags, resolve_format
from prefill_router.router import train_router

STATES = [0, 6, 12, 18]
WINDOW = 512
FORMATS = ("fp32", "bf16", "int8")
BATCHES = (1, 4, 16)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"CPU: {model}; {load}"


def groups(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def tokens_per_s(encoder, prompts: list, batch: int, warm_up: list) -> float:
    """Prompt tokens per second encoding `prompts` in consecutive groups of `batch`, one call (one batch) each,
    after one untimed call on `warm_up` (a group of the same size)."""
    budget = batch * WINDOW  # large enough that each call is exactly one batch
    encoder.encode(warm_up, poolings=("mean",), layers=STATES, batch_tokens=budget)
    tokens = 0
    start = time.perf_counter()
    for group in groups(prompts, batch):
        encoder.encode(group, poolings=("mean",), layers=STATES, batch_tokens=budget)
        tokens += int(encoder.last_token_counts.clip(max=WINDOW).sum())
    return tokens / (time.perf_counter() - start)


def latencies_ms(call, prompts: list, cpu: bool = False) -> np.ndarray:
    """Wall ms of `call([prompt])` per prompt; with `cpu`, the calling thread's CPU ms instead (what the call
    costs whatever else the machine runs: on a busy one, wall time adds the time spent waiting for a core)."""
    clock = time.thread_time if cpu else time.perf_counter
    out = []
    for p in prompts:
        start = clock()
        call([p])
        out.append((clock() - start) * 1e3)
    return np.array(out)


def two_workers(encoder, prompts: list) -> float:
    """Tokens/s of two Python threads encoding alternate prompts at batch 1 with one torch thread each."""
    counts = encoder.count_tokens(prompts).clip(max=WINDOW)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder.encode(prompts[:1], poolings=("mean",), layers=STATES)
        def work(part: list) -> None:
            for p in part:
                encoder.encode([p], poolings=("mean",), layers=STATES)

        workers = [threading.Thread(target=work, args=(part,)) for part in (prompts[0::2], prompts[1::2])]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return float(counts.sum()) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def worker_layouts(args, prompts: list) -> dict:
    """{format: {"1x": tokens/s of one worker with --threads, "2x1": of two with one}} at batch 1, median of the
    rounds, in this process."""
    encoders = {fmt: load_encoder(max_route_tokens=WINDOW, dtype=fmt) for fmt in FORMATS}
    out: dict = {fmt: {"1x": [], "2x1": []} for fmt in FORMATS}
    for _ in range(args.repeats):
        for fmt in FORMATS:
            torch.set_num_threads(args.threads)
            out[fmt]["1x"].append(tokens_per_s(encoders[fmt], prompts, 1, prompts[:1]))
            out[fmt]["2x1"].append(two_workers(encoders[fmt], prompts))
    return {fmt: {k: float(np.median(v)) for k, v in d.items()} for fmt, d in out.items()}


def fallback_cost(args) -> int:
    """The fallback scorer's cost per prompt (its P being beside the point here, its router is a quick one), and
    the fp32 encoder's at batch 1 on the same prompts, the baseline it stands in for."""
    started = machine()
    ds = load_mmlu_pro(args.data_root)
    encoder = load_encoder(max_route_tokens=WINDOW, dtype="fp32")
    done, X_ref = reference_features(Path(args.data_root) / "mmlu-pro" / "features-smollm2-135m")
    train = np.flatnonzero(done)[:1000]
    router = train_router(ds.subset(train), X_ref[train][:, :1], None,
                          {"pca": 50, "policy": "argmax", "calibration_folds": 2,
                           "trunk": {"seeds": 1, "keep": 1, "max_epochs": 2, "threads": args.threads}},
                          hidden_states=[0], encoder=encoder)
    order = np.random.default_rng(1).permutation(stratified_sample(ds, args.n_speed, seed=1))
    sets = {"MMLU-Pro prompts": [ds.prompts[i] for i in order],
            f"{WINDOW}-token prompts": sized_prompts(ds, encoder, args.n_speed, WINDOW),
            f"2,000-token prompts (the window keeps {WINDOW})": sized_prompts(ds, encoder, args.n_speed, 2000)}
    router.predict_fallback(sets["MMLU-Pro prompts"][:2])  # its tokenizer copy and table are made at the first call
    rows = []
    for label, prompts in sets.items():
        tokens = np.median(encoder.count_tokens(prompts))
        wall = np.concatenate([latencies_ms(router.predict_fallback, prompts) for _ in range(5)])
        cpu = np.concatenate([latencies_ms(router.predict_fallback, prompts, cpu=True) for _ in range(5)])
        call = lambda p: encoder.encode(p, poolings=("mean",), layers=STATES)  # noqa: E731
        call(prompts[:1])
        prefill = latencies_ms(call, prompts[:8])
        rows.append((label, tokens, wall, cpu, prefill))
    print(f"\n{started}\n{machine()}\n\n| prompts | median tokens | fallback wall ms, median / p90 | fallback CPU ms "
          f"(its thread), median / p90 | fp32 prefill (early exit at {max(STATES)}) wall ms, median | ratio of "
          f"medians (wall) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, tokens, wall, cpu, prefill in rows:
        print(f"| {label} | {tokens:.0f} | {np.median(wall):.2f} / {np.percentile(wall, 90):.2f} | "
              f"{np.median(cpu):.2f} / {np.percentile(cpu, 90):.2f} | {np.median(prefill):.0f} | "
              f"{np.median(prefill) / np.median(wall):.0f}x |")
    return 0


def sized_prompts(ds, encoder, n: int, tokens: int, seed: int = 5) -> list[str]:
    """`n` prompts of exactly `tokens` templated tokens: consecutive MMLU-Pro questions, cut to length."""
    overhead = int(encoder.count_tokens(["x"])[0]) - 1  # the chat template's tokens around the text
    out = []
    for text in long_prompts(ds, encoder, n, seed=seed, tokens=tokens):
        ids = encoder.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens - overhead]
        cut = encoder.tokenizer.decode(ids)
        while encoder.count_tokens([cut])[0] > tokens:  # decoding can merge across the cut: trim a character
            cut = cut[:-1]
        out.append(cut)
    return out


def long_prompts(ds, encoder, n: int, seed: int = 3, tokens: int = WINDOW + 8) -> list[str]:
    """`n` prompts of at least `tokens` templated tokens, made of consecutive MMLU-Pro questions."""
    order = np.random.default_rng(seed).permutation(ds.n)
    out, i = [], 0
    while len(out) < n:
        text = ""
        while encoder.count_tokens([text or "-"])[0] < tokens:
            text += ("\n\n" if text else "") + ds.prompts[order[i]]
            i += 1
        out.append(text)
    return out


def reference_features(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(done mask [N], mean features [N, 4, H] at STATES) de-quantized as the reference README says."""
    layout = json.loads((folder / "layout.json").read_text())
    pick = [layout["hidden_states"]["mean"].index(s) for s in STATES]
    q = np.load(folder / "mean_int8.npy", mmap_mode="r")
    offset, scale = np.load(folder / "mean_offset.npy")[pick], np.load(folder / "mean_scale.npy")[pick]
    return np.load(folder / "done.npy"), (offset + scale * (q[:, pick, :].astype(np.float32) + 128)).astype(np.float32)


def held_out_features(encoder, fmt: str, prompts: list, work: Path) -> np.ndarray:
    """Mean features [N, 4, H] of the held-out prompts in format `fmt`, computed once into `work`."""
    path = work / f"held-out-{fmt}-{len(prompts)}.npy"
    if path.is_file():
        return np.load(path)
    started = time.perf_counter()
    X = encoder.encode(prompts, poolings=("mean",), layers=STATES)["mean"]
    log(f"  {fmt}: {len(prompts)} held-out prompts encoded in {time.perf_counter() - started:.0f} s")
    work.mkdir(parents=True, exist_ok=True)
    np.save(path, X)
    return X


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of one worker")
    ap.add_argument("--n-speed", type=int, default=48, help="prompts timed per format and batch size")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the speed measurements (median reported)")
    ap.add_argument("--n-train", type=int, default=3000, help="questions the AUC router trains on")
    ap.add_argument("--n-test", type=int, default=400, help="held-out questions scored in every format")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--work", default="runs/bench-formats", help="where held-out features are kept")
    ap.add_argument("--n-workers", type=int, default=16, help="prompts of the workers comparison")
    ap.add_argument("--no-auc", action="store_true", help="speed only")
    ap.add_argument("--workers-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fallback-cost", action="store_true",
                    help="only the fallback scorer's cost per prompt, beside the fp32 encoder's at batch 1")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.workers_child:  # one wait policy's workers comparison, as JSON (see the docstring)
        ds = load_mmlu_pro(args.data_root)
        order = np.random.default_rng(1).permutation(stratified_sample(ds, args.n_speed + 16, seed=1))
        print(json.dumps(worker_layouts(args, [ds.prompts[i] for i in order[:args.n_workers]])))
        return 0
    if args.fallback_cost:
        return fallback_cost(args)
    started = machine()
    log(started)
    auto, why = resolve_format("auto", "cpu")
    flags = sorted(f for f in cpu_flags() if "bf16" in f or "vnni" in f or f.startswith("amx"))
    log(f"dtype auto on this CPU: {auto} ({why}); flags: {flags}")

    ds = load_mmlu_pro(args.data_root)
    encoders = {fmt: load_encoder(max_route_tokens=WINDOW, dtype=fmt) for fmt in FORMATS}
    sample = stratified_sample(ds, args.n_speed + 16, seed=1)
    order = np.random.default_rng(1).permutation(sample)
    prompts, spare = [ds.prompts[i] for i in order[:args.n_speed]], [ds.prompts[i] for i in order[args.n_speed:]]
    median_tokens = float(np.median(encoders["fp32"].count_tokens(prompts)))

    speed: dict[tuple[str, int], list[float]] = {}
    p50: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    for round_ in range(args.repeats):
        log(f"speed, round {round_ + 1} of {args.repeats}")
        for batch in BATCHES:
            for fmt in FORMATS:
                speed.setdefault((fmt, batch), []).append(
                    tokens_per_s(encoders[fmt], prompts, batch, spare[:batch]))
        for fmt in FORMATS:
            call = lambda p, e=encoders[fmt]: e.encode(p, poolings=("mean",), layers=STATES)  # noqa: E731
            p50[fmt].append(float(np.median(latencies_ms(call, prompts[:16]))))

    aucs: dict[str, float] = {}
    fallback_ms: dict[str, np.ndarray] = {}
    router = None
    if not args.no_auc:
        done, X_ref = reference_features(Path(args.data_root) / "mmlu-pro" / "features-smollm2-135m")
        rows = np.flatnonzero(done)
        test = rows[stratified_sample(ds.subset(rows), args.n_test, seed=2)]
        rest = np.setdiff1d(rows, test)
        train = np.sort(np.random.default_rng(4).choice(rest, size=min(args.n_train, rest.size), replace=False))
        log(f"AUC: training on {train.size} questions' reference fp32 features")
        sub = ds.subset(train)
        router = train_router(sub, X_ref[train], None, {"pca": 200, "policy": "argmax", "calibration_folds": 3,
                                                         "trunk": {"seeds": 5, "keep": 3, "threads": args.threads}},
                              hidden_states=STATES)
        held = [ds.prompts[i] for i in test]
        Y = ds.Y[test]
        for fmt in FORMATS:
            X = held_out_features(encoders[fmt], fmt, held, Path(args.work))
            aucs[fmt] = float(np.nanmean(metrics.per_target_auc(Y, router.predict_proba_features(X))))
        router.attach_encoder(encoders["fp32"])
        P0, _ = router.predict_fallback(held)
        aucs["fallback"] = float(np.nanmean(metrics.per_target_auc(Y, P0)))
        aucs["reference"] = float(np.nanmean(metrics.per_target_auc(Y, router.predict_proba_features(X_ref[test]))))
        from prefill_router.features.embedding_mean import EmbeddingMean

        fp32_states = np.load(Path(args.work) / f"held-out-fp32-{len(held)}.npy")
        gap = np.abs(EmbeddingMean.of(encoders["fp32"])(held)[0] - fp32_states[:, 0]).max()
        log(f"token-embedding mean vs the encoder's state 0 mean on the held-out prompts: max |diff| {gap:.2e}")
        longs = long_prompts(ds, encoders["fp32"], 32)
        router.predict_fallback(prompts[:2])  # its tokenizer copy and table are made at the first call
        fallback_ms = {"speed prompts": latencies_ms(router.predict_fallback, prompts * 3),
                       f">= {WINDOW}-token prompts (cut to {WINDOW})": latencies_ms(router.predict_fallback, longs * 3)}

    workers = {}
    for policy in ("default", "PASSIVE"):
        log(f"workers comparison, OpenMP wait policy {policy}")
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"OMP_WAIT_POLICY": "PASSIVE"} if policy == "PASSIVE" else {})
        child = subprocess.run([sys.executable, __file__, "--workers-child", "--threads", str(args.threads),
                                "--n-speed", str(args.n_speed), "--n-workers", str(args.n_workers), "--repeats",
                                str(args.repeats), "--data-root", args.data_root],
                               env=env, capture_output=True, text=True, check=True)
        workers[policy] = json.loads(child.stdout.strip().splitlines()[-1])

    ended = machine()
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"\n{started}\n{ended}\n\ndtype auto here: {auto} ({why}). SmolLM2-135M, window {WINDOW}, early exit at "
          f"hidden state {max(STATES)}; {args.threads} torch threads, OpenMP wait policy {policy}; {args.n_speed} "
          f"prompts (median {median_tokens:.0f} tokens), median of {args.repeats} rounds.\n")
    base = float(np.median(speed[("fp32", 1)]))
    header = "| format | " + " | ".join(f"tokens/s at batch {b}" for b in BATCHES) + \
        " | p50 ms at batch 1 | mean AUC | AUC - fp32 |"
    print(header)
    print("|---" + "|---:" * (len(BATCHES) + 3) + "|")
    for fmt in FORMATS:
        cells = [f"{np.median(speed[(fmt, b)]):,.0f} ({np.median(speed[(fmt, b)]) / base:.2f}x)" for b in BATCHES]
        auc = f"{aucs[fmt]:.4f}" if fmt in aucs else "—"
        diff = f"{aucs[fmt] - aucs['fp32']:+.4f}" if fmt in aucs else "—"
        label = f"{fmt}{' (auto)' if fmt == auto else ''}{' (naive baseline at batch 1)' if fmt == 'fp32' else ''}"
        print(f"| {label} | {' | '.join(cells)} | {np.median(p50[fmt]):.0f} | {auc} | {diff} |")
    if aucs:
        print(f"| fallback scorer (token-embedding mean, no layer) | — | — | — | "
              f"{np.median(fallback_ms['speed prompts']):.2f} | {aucs['fallback']:.4f} | "
              f"{aucs['fallback'] - aucs['fp32']:+.4f} |")
        print(f"\nThe same router on the reference features of the held-out questions: {aucs['reference']:.4f}. "
              f"{len(held)} held-out questions, router trained on {train.size}.")
        print("\nFallback scorer per prompt (Router.predict_fallback, tokenization included):")
        for label, ms in fallback_ms.items():
            print(f"- {label}: median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms")
    print(f"\n{args.n_workers} prompts at batch 1, tokens/s (median of {args.repeats} rounds; ratio to one worker "
          "under the default wait policy):\n")
    print("| workers x torch threads | OpenMP wait policy | " + " | ".join(f"{fmt} tokens/s" for fmt in FORMATS) + " |")
    print("|---|---" + "|---:" * len(FORMATS) + "|")
    for name, results in workers.items():
        for layout, label in (("1x", f"1 worker x {args.threads} threads"), ("2x1", "2 workers x 1 thread")):
            cells = [f"{results[fmt][layout]:,.0f} ({results[fmt][layout] / workers['default'][fmt]['1x']:.1f}x)"
                     for fmt in FORMATS]
            print(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
