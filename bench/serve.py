"""Gateway load test on loopback: micro-batching on vs off, at several concurrencies, in one run.

    .venv/bin/python bench/serve.py --load                # routing under traffic: savings that hold (issue 22)

The `--load` case: `--load-prompts` (2,000) different MMLU-Pro prompts, held out from the router's training
rows, at concurrency 1, 8, 32 and 64, through the gateway with its defaults to a fake upstream priced at the
shipped prices. Per level: req/s (and per core), routing p50/p99 (x-router-latency-ms), the share decided by the
prefill router / the fast fallback scorer / the default target (x-router-decided-by), and the accuracy and
dollars of the targets chosen, counted from the targets' known outcomes and costs on those prompts, against
always calling the best single target (by training accuracy). The same run repeats each level with the gateway
as it was before (a checkpoint without a fallback scorer, batches of up to 16: a missed deadline goes to the
default target) as the baseline rows.

    .venv/bin/python bench/serve.py                       # SmolLM2-135M encoder, MMLU-Pro prompts
    .venv/bin/python bench/serve.py --requests 16 64 128  # requests per concurrency level (1, 8, 32)

What runs, each in its own process so they do not share a GIL:
- a fake OpenAI-compatible upstream (prefill_router/serve/fake_upstream.py, `prefill-router fake-upstream`)
  answering after a fixed delay;
- the gateway, `python -m prefill_router serve`, once with batching on (max_batch_size 32) and once with
  batching off (max_batch_size 1, the naive baseline: one encoder forward per request); the LRU cache is off
  and every request carries a different MMLU-Pro question, so every request costs a forward pass;
- this script, the load generator: N requests per level from C concurrent workers.

The router is trained here in seconds on the shared reference SmolLM2 features of the first MMLU-Pro rows
(3 targets); the load-test prompts are the questions after them. Reported per (mode, concurrency): requests/s, and
routing
overhead = latency seen by the client minus the upstream's latency (the gateway's x-router-upstream-ms
header), p50 and p99, plus the mean forward-pass batch size read from the gateway's /metrics. Request counts
are bounded, so the run stops by itself.

    .venv/bin/python bench/serve.py --flood --threads 1   # the long-prompt flood case (issue 12)

The long-prompt flood case: short routed requests ("What is 17 + 23?", each different, one at a time) are
timed on a quiet gateway, then again while `--flood-workers` clients keep sending 171 KB prompts (the issue's
'Lorem ipsum ... ' * 3000, each different so nothing is cached). Reported: the short requests' overhead p50
and p99 quiet and under the flood, their ratio (the target: at most 2x), deadline fallbacks, and how many long
prompts were routed meanwhile. The gateway runs with its defaults for the routing window (512 tokens for this
checkpoint, which records none), length buckets and sessions; the routing deadline is raised to 60 s so that
it cannot hide a slow short request. `--flood-baseline` also runs the gateway as it was before issue 12 (one
batch queue, prompts cut only at the encoder's 8,192-token context, no deadline) with a few short requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-8B-Instruct"]
# --load routes over the pool `make run` ships a money-saving default for: the best model and its cheap sibling.
LOAD_TARGETS = ["gemini-1.5-pro-002", "gemini-1.5-flash-002"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_router(out: Path, encoder_name: str, train_rows: int, total_rows: int, data_root: str,
                 policy: str | None = "argmax", targets: list[str] = TARGETS):
    """A router on the first `train_rows` MMLU-Pro questions; returns the prompts of the rows after them.

    It trains on the shared reference features (SmolLM2 mean pooling, 6 hidden states), so no prompt is
    encoded here; the checkpoint records the SmolLM2 encoder's identity, and the gateway encodes live.
    """
    from prefill_router.data import CostModel, load_mmlu_pro
    from prefill_router.features import load_encoder
    from prefill_router.router import train_router as fit

    data = load_mmlu_pro(data_root, targets=targets, limit=total_rows)
    reference = Path(data_root) / "mmlu-pro" / "features-smollm2-135m"
    layout = json.loads((reference / "layout.json").read_text())
    done = np.load(reference / "done.npy")[:train_rows]
    if not done.all():
        raise SystemExit(f"reference features are missing for some of the first {train_rows} rows")
    q = np.load(reference / "mean_int8.npy", mmap_mode="r")[:train_rows]
    X = np.load(reference / "mean_offset.npy") + np.load(reference / "mean_scale.npy") * (
        q.astype(np.float32) + 128)
    encoder = load_encoder(encoder_name)
    train = data.subset(np.arange(train_rows))
    # policy None: the default the gateway ships (chosen on the training rows, with its calibration folds), from
    # a router closer to the shipped one (PCA 200, 4 seeds), since the policy it picks is what --load measures
    config = {"pca": 64, "trunk": {"seeds": 2, "keep": 1, "max_epochs": 30}, "policy": policy,
              "calibration_folds": 0} if policy else {"pca": 200, "trunk": {"seeds": 4, "keep": 2}}
    router = fit(train, X, config=config,
                 encoder=encoder, hidden_states=layout["hidden_states"]["mean"], cost_model=CostModel.fit(train))
    router.save(out)
    return [[{"role": "user", "content": p}] for p in data.prompts[train_rows:]]


def start_process(args: list[str], ready: str, env: dict | None = None, timeout_s: float = 600) -> tuple:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + timeout_s
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.search(ready, line)
        if match:
            return proc, match
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{args[:4]} did not start:\n{''.join(seen[-30:])}")


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def load(url: str, prompts: list, concurrency: int) -> tuple[float, list[float], list[float], list[str]]:
    """Send every prompt once, `concurrency` at a time. Returns wall seconds, overheads (ms), routing ms, errors."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    overheads, routing, errors = [], [], []

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                messages = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={"model": "router", "messages": messages,
                                                                 "max_tokens": 8})
            total_ms = (time.perf_counter() - start) * 1000
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            overheads.append(total_ms - float(r.headers["x-router-upstream-ms"]))
            routing.append(float(r.headers["x-router-latency-ms"]))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return wall, overheads, routing, errors


@contextmanager
def running_gateway(config: dict, path: Path, threads: int | None):
    """Serve `config` (written to `path`) in a subprocess; yields its URL once /health answers."""
    path.write_text(json.dumps(config))
    port = free_port()
    proc, _ = start_process([sys.executable, "-m", "prefill_router", "serve", "--config", str(path), "--port",
                             str(port), "--log-level", "warning"], r"serving on",
                            env={"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the server binds shortly after printing its banner
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_mode(mode: str, checkpoint: Path, upstream_url: str, prompts: list, levels: list[tuple[int, int]],
             max_wait_ms: float, folder: Path, threads: int | None) -> list[dict]:
    config = {
        "router": {"checkpoint": str(checkpoint)},
        "targets": [{"name": t, "base_url": upstream_url, "timeout_s": 60} for t in TARGETS],
        "batching": {"max_batch_size": 32 if mode == "on" else 1, "max_wait_ms": max_wait_ms if mode == "on" else 0},
        "cache_size": 0,
        "max_body_bytes": 10_000_000,
    }
    rows = []
    with running_gateway(config, folder / f"gateway-{mode}.yaml", threads) as url:
        # warm-up: a few requests through the whole path before timing anything
        asyncio.run(load(url, prompts[:4], 4))
        offset = 4
        for concurrency, n in levels:
            batch = prompts[offset:offset + n]
            offset += n
            before = httpx.get(url + "/metrics").text
            wall, overheads, routing, errors = asyncio.run(load(url, batch, concurrency))
            after = httpx.get(url + "/metrics").text
            forwards = metric_sum(after, "prefill_router_batch_size_count") - \
                metric_sum(before, "prefill_router_batch_size_count")
            batched = metric_sum(after, "prefill_router_batch_size_sum") - \
                metric_sum(before, "prefill_router_batch_size_sum")
            row = {"mode": mode, "concurrency": concurrency, "requests": n, "errors": len(errors),
                   "wall_s": wall, "rps": len(overheads) / wall,
                   "overhead_p50_ms": float(np.percentile(overheads, 50)),
                   "overhead_p99_ms": float(np.percentile(overheads, 99)),
                   "routing_p50_ms": float(np.percentile(routing, 50)),
                   "mean_batch": batched / forwards if forwards else float("nan")}
            if errors:
                log(f"  errors: {errors[:3]}")
            log(f"  batching {mode:3s} c={concurrency:<3d} {row['rps']:7.2f} req/s  overhead p50 "
                f"{row['overhead_p50_ms']:8.1f} ms  p99 {row['overhead_p99_ms']:8.1f} ms  mean batch "
                f"{row['mean_batch']:.1f}")
            rows.append(row)
    return rows


# --- routing under traffic (--load) -----------------------------------------------------------------------
async def load_decisions(url: str, prompts: list, concurrency: int) -> tuple[float, list[dict]]:
    """Send prompt i once each, `concurrency` at a time; (wall seconds, per request: index, target, scorer, ms)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    seen: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await client.post("/v1/chat/completions", json={"model": "router", "messages": prompts[i],
                                                                 "max_tokens": 8})
            seen.append({"i": i, "status": r.status_code, "target": r.headers.get("x-router-target"),
                         "by": r.headers.get("x-router-decided-by", "?"),
                         "ms": float(r.headers.get("x-router-latency-ms", "nan"))})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start, seen


def main_load(args) -> None:
    from prefill_router.data import load_mmlu_pro
    from prefill_router.router import Router

    n, cores = args.load_prompts, os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-serve-load-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        train_rows = args.load_train_rows
        data = load_mmlu_pro(args.data, targets=LOAD_TARGETS, limit=train_rows + n)
        if args.load_checkpoint:  # a router this mode trained before (its folder, kept with --keep-checkpoint)
            shutil.copytree(args.load_checkpoint, folder / "router")
        else:
            train_router(folder / "router", args.encoder, train_rows, train_rows + n, args.data, policy=None,
                         targets=LOAD_TARGETS)
        if args.keep_checkpoint:
            shutil.copytree(folder / "router", args.keep_checkpoint, dirs_exist_ok=True)
        prompts = [[{"role": "user", "content": p}] for p in data.prompts[train_rows:train_rows + n]]
        router = Router.load(folder / "router")
        log(f"router trained in {time.perf_counter() - start:.0f}s: default policy {router.default_policy}, "
            f"fallback {router.fallback.policy if router.fallback else None}")
        old = Router.load(folder / "router")
        old.fallback = None  # the gateway as it was: no fallback scorer, so a missed deadline goes to the default
        old.save(folder / "router-without-fallback")
        train_acc = np.nanmean(data.Y[:train_rows], axis=0)
        best = int(np.argmax(train_acc))
        Y, C = data.Y[train_rows:train_rows + n], data.C[train_rows:train_rows + n]
        prices = {t: price_of(t) for t in LOAD_TARGETS}
        upstream, match = start_process([sys.executable, "-m", "prefill_router", "fake-upstream", "--port", "0",
                                         "--delay", str(args.upstream_delay_ms / 1000), "--content",
                                         "The answer is (B)."], r"listening on (http://\S+)")
        rows = []
        try:
            modes = (("learned fallback (defaults)", "router", {}),
                     ("baseline: deadline -> default", "router-without-fallback", {"max_batch_size": 16}))
            for mode, checkpoint, batching in [m for i, m in enumerate(modes) if str(i) in args.load_modes]:
                config = {"router": {"checkpoint": str(folder / checkpoint), "prefix_cache_mb": 0},
                          "targets": [{"name": t, "base_url": match.group(1), "timeout_s": 60,
                                       "usd_per_m_input": prices[t][0], "usd_per_m_output": prices[t][1]}
                                      for t in LOAD_TARGETS],
                          "batching": batching, "cache_size": 0, "max_body_bytes": 10_000_000,
                          "listen": {"max_connections": 4096}}
                log(f"gateway: {mode}")
                with running_gateway(config, folder / f"gateway-{len(rows)}.yaml", args.threads) as url:
                    asyncio.run(load_decisions(url, prompts[:4], 4))  # warm-up through the whole path
                    for concurrency in args.load_concurrency:
                        wall, seen = asyncio.run(load_decisions(url, prompts, concurrency))
                        rows.append(load_row(mode, concurrency, wall, seen, Y, C, best, cores))
                        log("  " + json.dumps(rows[-1]))
        finally:
            upstream.terminate()
            upstream.wait(timeout=30)
    print(f"\nRouting under traffic: {n} held-out MMLU-Pro prompts per level, targets {', '.join(LOAD_TARGETS)}; "
          f"best single target (training accuracy): {LOAD_TARGETS[best]} "
          f"({100 * np.nanmean(Y[:, best]):.2f} % on these prompts, ${np.nansum(C[:, best]):.4f}); "
          f"{cpu_model()}, {cores} cores, load average at the end {os.getloadavg()[0]:.1f}; fake upstream delay "
          f"{args.upstream_delay_ms:g} ms. Accuracy and dollars from the targets' known outcomes and costs.")
    print("| gateway | concurrency | req/s | req/s per core | routing p50 / p99 (ms) | prefill / fallback / default "
          "| accuracy | $ saved vs best single | errors |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['rps']:.1f} | {r['rps_per_core']:.1f} | "
              f"{r['routing_p50_ms']:.0f} / {r['routing_p99_ms']:.0f} | {r['share_prefill']:.0%} / "
              f"{r['share_fallback']:.0%} / {r['share_default']:.0%} | {r['accuracy']:.2%} | "
              f"${r['saved_usd']:.4f} ({r['saved_share']:.1%}) | {r['errors']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def load_row(mode: str, concurrency: int, wall: float, seen: list[dict], Y: np.ndarray, C: np.ndarray, best: int,
             cores: int) -> dict:
    ok = [s for s in seen if s["status"] == 200]
    picks = np.array([LOAD_TARGETS.index(s["target"]) for s in ok])
    rows = np.array([s["i"] for s in ok])
    spent, always_best = float(np.nansum(C[rows, picks])), float(np.nansum(C[rows, best]))
    by = [s["by"] for s in ok]
    ms = [s["ms"] for s in ok]
    return {"mode": mode, "concurrency": concurrency, "requests": len(seen), "errors": len(seen) - len(ok),
            "rps": len(ok) / wall, "rps_per_core": len(ok) / wall / cores,
            "routing_p50_ms": float(np.percentile(ms, 50)), "routing_p99_ms": float(np.percentile(ms, 99)),
            **{f"share_{k}": by.count(k) / len(by) for k in ("prefill", "fallback", "default")},
            "accuracy": float(np.nanmean(Y[rows, picks])), "best_accuracy": float(np.nanmean(Y[rows, best])),
            "usd": spent, "always_best_usd": always_best, "saved_usd": always_best - spent,
            "saved_share": (always_best - spent) / always_best}


def price_of(target: str) -> tuple[float, float]:
    import csv

    from prefill_router.data.builtin import SHIPPED_DATA

    with open(SHIPPED_DATA / "mmlu-pro" / "models.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["model"] == target:
                return float(row["usd_per_m_input"]), float(row["usd_per_m_output"])
    raise SystemExit(f"no shipped price for {target}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU unknown"


LONG_TEXT = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 3000  # 171 KB, as in issue 12


def short_prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {17 + i} + {23 + 2 * i}?"}]


async def timed_shorts(client: httpx.AsyncClient, start: int, n: int) -> tuple[list[float], int, list[str]]:
    """n short routed requests one after another: overheads (ms), deadline fallbacks, errors."""
    overheads, deadlines, errors = [], 0, []
    for i in range(start, start + n):
        began = time.perf_counter()
        r = await client.post("/v1/chat/completions", json={"model": "router", "messages": short_prompt(i),
                                                             "max_tokens": 8})
        total_ms = (time.perf_counter() - began) * 1000
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:200]}")
            continue
        overheads.append(total_ms - float(r.headers["x-router-upstream-ms"]))
        deadlines += r.headers.get("x-router-deadline") == "exceeded"
    return overheads, deadlines, errors


async def flood_and_measure(url: str, n_short: int, workers: int) -> dict:
    """Quiet short requests, then the same number while `workers` clients keep sending long prompts."""
    limits = httpx.Limits(max_connections=workers + 2)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        await timed_shorts(client, 10_000, 2)  # warm-up
        quiet, quiet_deadlines, errors = await timed_shorts(client, 0, n_short)
        stop, long_done, long_ms = asyncio.Event(), [0], []

        async def flood(worker: int) -> None:
            i = 0
            while not stop.is_set():
                began = time.perf_counter()
                body = {"model": "router", "max_tokens": 8,
                        "messages": [{"role": "user", "content": f"[{worker}.{i}] {LONG_TEXT}"}]}
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    long_done[0] += 1
                    long_ms.append((time.perf_counter() - began) * 1000)
                i += 1

        flooders = [asyncio.create_task(flood(w)) for w in range(workers)]
        await asyncio.sleep(1.0)  # the long prompts are queued and their forward passes running
        forwards_before = metric_sum((await client.get("/metrics")).text, "prefill_router_batch_size_count")
        busy, busy_deadlines, busy_errors = await timed_shorts(client, n_short, n_short)
        # forward passes that started while the short ones were timed, less the short ones' own
        long_forwards = metric_sum((await client.get("/metrics")).text, "prefill_router_batch_size_count") - \
            forwards_before - n_short
        stop.set()
        for task in flooders:  # leaving: the gateway drops what nobody waits for any more
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
    return {"short_requests": n_short, "quiet_p50_ms": float(np.percentile(quiet, 50)),
            "quiet_p99_ms": float(np.percentile(quiet, 99)), "flood_p50_ms": float(np.percentile(busy, 50)),
            "flood_p99_ms": float(np.percentile(busy, 99)),
            "ratio_p50": float(np.percentile(busy, 50) / np.percentile(quiet, 50)),
            "deadline_fallbacks": quiet_deadlines + busy_deadlines, "errors": errors + busy_errors,
            "long_forwards": long_forwards, "long_routed": long_done[0],
            "long_p50_ms": float(np.percentile(long_ms, 50)) if long_ms else None}


def run_flood(label: str, checkpoint: Path, upstream_url: str, folder: Path, threads: int | None, n_short: int,
              workers: int, router_extra: dict, batching_extra: dict) -> dict:
    config = {
        "router": {"checkpoint": str(checkpoint), "deadline_ms": 60_000, **router_extra},
        "targets": [{"name": t, "base_url": upstream_url, "timeout_s": 60} for t in TARGETS],
        "batching": {"max_batch_size": 16, "max_wait_ms": 5, **batching_extra},
        "cache_size": 0,
        "max_body_bytes": 10_000_000,
    }
    with running_gateway(config, folder / f"gateway-flood-{label}.yaml", threads) as url:
        window = httpx.get(url + "/health").json().get("window")
        row = {"gateway": label, "window": window, **asyncio.run(flood_and_measure(url, n_short, workers))}
    log(f"  {label}: short overhead p50 quiet {row['quiet_p50_ms']:.1f} ms, under the flood "
        f"{row['flood_p50_ms']:.1f} ms ({row['ratio_p50']:.2f}x); {row['long_routed']} long prompts routed")
    return row


def main_flood(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-serve-flood-") as tmp:
        folder = Path(tmp)
        train_router(folder / "router", args.encoder, args.train_rows, args.train_rows + 1, args.data)
        upstream, match = start_process([sys.executable, "-m", "prefill_router", "fake-upstream", "--port", "0",
                                         "--delay", str(args.upstream_delay_ms / 1000), "--content",
                                         "The answer is (B)."], r"listening on (http://\S+)")
        try:
            rows = [run_flood("bounded (defaults)", folder / "router", match.group(1), folder, args.threads,
                              args.flood_shorts, args.flood_workers, {}, {})]
            if args.flood_baseline:
                rows.append(run_flood("unbounded (before issue 12)", folder / "router", match.group(1), folder,
                                      args.threads, args.flood_baseline_shorts, args.flood_workers,
                                      {"max_route_tokens": 8192, "deadline_ms": None}, {"length_buckets": []}))
        finally:
            upstream.terminate()
            upstream.wait(timeout=30)
    print(f"\nLong-prompt flood: encoder {args.encoder}, {os.cpu_count()} CPU(s), gateway threads "
          f"{args.threads or 'default'}, {args.flood_workers} clients sending 171 KB prompts; load average at the "
          f"end {os.getloadavg()[0]:.1f}; overhead = client latency - upstream latency")
    print("| gateway | window | short requests | overhead p50 quiet (ms) | p50 under flood (ms) | ratio | "
          "p99 quiet / flood (ms) | deadline fallbacks | long forward passes meanwhile | long prompts routed (p50 s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        window = r["window"] or {}
        long_p50 = f"{r['long_p50_ms'] / 1000:.1f}" if r["long_p50_ms"] is not None else "-"
        print(f"| {r['gateway']} | {window.get('max_route_tokens')} ({window.get('source')}) | {r['short_requests']}"
              f"{' (' + str(len(r['errors'])) + ' errors)' if r['errors'] else ''} | {r['quiet_p50_ms']:.1f} | "
              f"{r['flood_p50_ms']:.1f} | {r['ratio_p50']:.2f}x | {r['quiet_p99_ms']:.0f} / {r['flood_p99_ms']:.0f} | "
              f"{r['deadline_fallbacks']} | {r['long_forwards']:.0f} | {r['long_routed']} ({long_p50}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="smollm2-135m")
    parser.add_argument("--data", default=os.environ.get("PREFILL_ROUTER_DATA", str(REPO.parent / "shared" / "data")),
                        help="the shared data folder (MMLU-Pro and its reference features)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[8, 32, 64],
                        help="requests per concurrency level (one number per level)")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--upstream-delay-ms", type=float, default=20.0)
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batch wait with batching on")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in the gateway (OMP_NUM_THREADS); default: torch's choice")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--flood", action="store_true", help="run the long-prompt flood case instead")
    parser.add_argument("--load", action="store_true", help="run the routing-under-traffic case instead")
    parser.add_argument("--load-prompts", type=int, default=2000, help="held-out prompts per concurrency level")
    parser.add_argument("--load-concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--load-train-rows", type=int, default=4000, help="training rows of the --load router")
    parser.add_argument("--load-checkpoint", type=Path, default=None,
                        help="use this router (trained by an earlier --load run on the same rows) instead of training")
    parser.add_argument("--keep-checkpoint", type=Path, default=None, help="copy the --load router here")
    parser.add_argument("--load-modes", default="01", help="which gateways: 0 defaults, 1 the baseline")
    parser.add_argument("--flood-shorts", type=int, default=40, help="short requests timed, quiet and flooded")
    parser.add_argument("--flood-workers", type=int, default=2, help="clients sending long prompts")
    parser.add_argument("--flood-baseline", action="store_true",
                        help="also run the flood against the gateway as it was before (slow: minutes per request)")
    parser.add_argument("--flood-baseline-shorts", type=int, default=3)
    args = parser.parse_args()
    if args.flood:
        main_flood(args)
        return
    if args.load:
        main_load(args)
        return
    if len(args.requests) != len(args.concurrency):
        parser.error("--requests needs one number per --concurrency level")
    levels = list(zip(args.concurrency, args.requests))
    needed = 4 + sum(args.requests)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        prompts = train_router(folder / "router", args.encoder, args.train_rows, args.train_rows + needed,
                               args.data)
        log(f"router trained in {time.perf_counter() - start:.0f}s; {len(prompts)} load-test prompts")
        upstream, match = start_process([sys.executable, "-m", "prefill_router", "fake-upstream", "--port", "0",
                                         "--delay",
                                         str(args.upstream_delay_ms / 1000), "--content", "The answer is (B)."],
                                        r"listening on (http://\S+)")
        try:
            rows = []
            for mode in ("off", "on"):
                log(f"gateway with micro-batching {mode}")
                rows += run_mode(mode, folder / "router", match.group(1), prompts, levels, args.max_wait_ms, folder,
                                 args.threads)
        finally:
            upstream.terminate()
            upstream.wait(timeout=30)

    import torch

    print(f"\nGateway load test: encoder {args.encoder}, {os.cpu_count()} CPU(s), gateway threads "
          f"{args.threads or 'default'}, torch {torch.__version__}, "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; "
          f"load average at the end {os.getloadavg()[0]:.1f}; fake upstream delay {args.upstream_delay_ms:g} ms; "
          f"overhead = client latency - upstream latency")
    print("| batching | concurrency | requests | req/s | speed-up vs off | overhead p50 (ms) | overhead p99 (ms) "
          "| routing p50 (ms) | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    off = {r["concurrency"]: r["rps"] for r in rows if r["mode"] == "off"}
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["mode"] != "off")):
        speedup = r["rps"] / off[r["concurrency"]] if off.get(r["concurrency"]) else float("nan")
        errors = f" ({r['errors']} errors)" if r["errors"] else ""
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']}{errors} "
              f"| {r['rps']:.2f} | {speedup:.2f}x | {r['overhead_p50_ms']:.1f} | {r['overhead_p99_ms']:.1f} "
              f"| {r['routing_p50_ms']:.1f} | {r['mean_batch']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
