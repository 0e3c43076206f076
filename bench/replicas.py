"""What shared state costs: the gateway's own overhead with Redis against without, in one run.

    .venv/bin/python bench/replicas.py                   # 600 requests per row, concurrency 4

Rows (each gateway its own process, `python -m prefill_router serve`, in front of one fake upstream that answers
at once, all on 127.0.0.1):
- one replica, local state (the naive baseline: no Redis);
- one replica on Redis (`state.redis_url`): the same, plus its Redis round trips (limits, spend, decisions,
  routed requests, pins);
- two replicas on one Redis, requests alternating between them (what a load balancer does).
Every request carries a tenant key with a rate limit and a budget and a sticky session id, so every Redis path
runs. The router is tiny and random (the tests' 2-layer Llama, built here from a config) so that routing costs
little and the overhead measured is the gateway's own: overhead = client latency minus the upstream's
(x-router-upstream-ms), p50 and p99, and req/s. Needs `redis-server` on PATH (Debian's package).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from serve import cpu_model, log, running_gateway, start_process  # noqa: E402

KEY = "bench-tenant-secret-key"


async def drive(urls: list[str], n: int, concurrency: int) -> tuple[float, list[float], int]:
    """n chat requests, alternating between `urls`, `concurrency` at a time: (wall s, overheads ms, errors)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    overheads: list[float] = []
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            r = await client.post(f"{urls[i % len(urls)]}/v1/chat/completions",
                                  headers={"Authorization": f"Bearer {KEY}", "x-session-id": f"s{i % 50}"},
                                  json={"model": "router", "messages": [
                                      {"role": "user", "content": f"question {i % 200}: what is {i} + {i}?"}]})
            total = (time.perf_counter() - start) * 1000
            if r.status_code != 200:
                errors += 1
                continue
            overheads.append(total - float(r.headers["x-router-upstream-ms"]))

    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start, overheads, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    from conftest import make_tiny_encoder
    from gateway_helpers import RedisServer, train_tiny_router

    from prefill_router.features import load_encoder

    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        folder = Path(tmp)
        encoder = load_encoder(str(make_tiny_encoder(folder / "encoder")))
        checkpoint = train_tiny_router(encoder, folder / "router")
        redis = RedisServer(folder).start()
        upstream, match = start_process([sys.executable, "-m", "prefill_router", "fake-upstream", "--port", "0"],
                                        r"listening on (http://\S+)")
        targets = [{"name": t, "base_url": match.group(1), "timeout_s": 30, "usd_per_m_input": p[0],
                    "usd_per_m_output": p[1]} for t, p in {"big": (10, 30), "small": (0.1, 0.3),
                                                           "mid": (1, 3)}.items()]
        rows = []
        try:
            for label, replicas, state in (("1 replica, local state (no Redis)", 1, None),
                                           ("1 replica, Redis", 1, redis.url),
                                           ("2 replicas, one Redis", 2, redis.url)):
                config = {"router": {"checkpoint": str(checkpoint), "quantize": None},
                          "targets": targets, "sessions": {"mode": "sticky"}, "batching": {"max_batch_size": 1},
                          "auth": {"tenants": [{"alias": "bench", "key": KEY, "rpm": 10**6,
                                                "budget_usd_per_day": 10**6}]},
                          **({"state": {"redis_url": state}} if state else {})}
                with ExitStack() as stack:
                    urls = [stack.enter_context(running_gateway(config, folder / f"gw-{len(rows)}-{i}.yaml", None))
                            for i in range(replicas)]
                    asyncio.run(drive(urls, 40, args.concurrency))  # warm-up
                    wall, overheads, errors = asyncio.run(drive(urls, args.requests, args.concurrency))
                rows.append({"label": label, "rps": len(overheads) / wall, "errors": errors,
                             "p50": float(np.percentile(overheads, 50)), "p99": float(np.percentile(overheads, 99))})
                log(str(rows[-1]))
        finally:
            upstream.terminate()
            upstream.wait(timeout=30)
            redis.stop()
    print(f"\nShared state cost: {args.requests} requests per row at concurrency {args.concurrency}, tiny random "
          f"router, fake upstream answering at once; {cpu_model()}, {os.cpu_count()} cores, load average at the end "
          f"{os.getloadavg()[0]:.1f}. Overhead = client latency - upstream latency.")
    print("| gateway | req/s | overhead p50 (ms) | overhead p99 (ms) | p50 added by Redis (ms) | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['rps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['p50'] - rows[0]['p50']:+.2f} | {r['errors']} |")


if __name__ == "__main__":
    main()
