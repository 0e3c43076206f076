"""Feature extraction throughput: the Ray engine with 1 and 2 actors next to the single-machine engine.

    .venv/bin/python bench/extract_ray.py                        # SmolLM2-135M, 32 MMLU-Pro questions
    .venv/bin/python bench/extract_ray.py --prompts 256 --actors 1,2,4 --shard-size 16 --cpus 8

Every engine extracts the same prompts (MMLU-Pro questions from the shared data when present, else synthetic
questions) into a fresh float32 store, mean and last pooling at every hidden state, on all the CPUs Ray is
given (the single-machine engine uses as many torch threads as the Ray runs use CPUs in all). Times are wall
clock from the call to the finished store and include loading the encoder (the single-machine engine) and
starting the actors, each loading the encoder (Ray): both are paid on every real run. Ray's own start-up is
paid once before the runs, as on a standing cluster, and reported apart. The last column is the largest
difference from the single-machine features (float rounding only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.features import extract_to_store, load_encoder  # noqa: E402
from prefill_router.features.distributed import extract_to_store_ray, require_ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_prompts(n: int, data_root: str | None) -> tuple[list[str], str]:
    data_root = data_root or os.environ.get("PREFILL_ROUTER_DATA") or str(REPO.parent / "shared" / "data")
    try:
        from prefill_router.data import load_mmlu_pro

        return list(load_mmlu_pro(data_root).prompts[:n]), "MMLU-Pro"
    except Exception as exc:  # no shared data here: the numbers stay comparable across engines all the same
        print(f"MMLU-Pro unavailable ({type(exc).__name__}: {exc}); using synthetic questions",
              file=sys.stderr)
        words = "what is the capital of france option paris rome berlin madrid answer briefly".split()
        return [" ".join(words[(i + j) % len(words)] for j in range(20 + i % 60)) + "?" for i in range(n)], \
            "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="smollm2-135m", help="encoder (default smollm2-135m)")
    parser.add_argument("--prompts", type=int, default=32, help="prompt count (default 32)")
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts (default 1,2)")
    parser.add_argument("--shard-size", type=int, default=4, help="prompts per shard (default 4)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(),
                        help="CPUs for Ray and for the local engine")
    parser.add_argument("--data-root",
                        help="shared data folder (default: $PREFILL_ROUTER_DATA, else ../shared/data)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray = require_ray()
    import torch

    prompts, source = load_prompts(args.prompts, args.data_root)
    tokens = load_encoder(args.encoder).count_tokens(prompts)  # also converts a GGUF once, before timing
    workdir = Path(tempfile.mkdtemp(prefix="bench-extract-ray-"))
    rows = []
    try:
        torch.set_num_threads(args.cpus)
        started = time.perf_counter()
        local = extract_to_store(prompts, load_encoder(args.encoder), workdir / "local", dtype="float32",
                                 progress=False)
        local_s = time.perf_counter() - started
        rows.append(("single-machine (naive baseline)", "-", f"{args.cpus}", local_s, 0.0))
        print(f"single-machine: {local_s:.1f} s", file=sys.stderr, flush=True)
        reference = {p: local.get(p) for p in local.poolings}

        started = time.perf_counter()
        if os.environ.get("RAY_ADDRESS"):  # a standing cluster: its own resources
            ray.init(log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        ray_start_s = time.perf_counter() - started
        for actors in [int(a) for a in args.actors.split(",")]:
            started = time.perf_counter()
            run = extract_to_store_ray(prompts, args.encoder, workdir / f"ray-{actors}", actors=actors,
                                       shard_size=args.shard_size, dtype="float32", progress=False,
                                       cpus_per_actor=max(1, args.cpus // actors))
            seconds = time.perf_counter() - started
            diff = max(float(np.abs(run.features.get(p) - reference[p]).max()) for p in reference)
            rows.append(("ray", str(actors), str(max(1, args.cpus // actors)), seconds, diff))
            print(f"ray, {actors} actor(s): {seconds:.1f} s", file=sys.stderr, flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"\n{len(prompts)} {source} prompts, {int(tokens.sum())} tokens (mean {tokens.mean():.0f}), "
          f"encoder {args.encoder}, {args.cpus} CPUs, shard size {args.shard_size}; "
          f"ray.init {ray_start_s:.1f} s (not counted); 1-min load average at the end {load:.1f}\n")
    print("| engine | actors | threads per worker | wall s | prompts/s | vs single-machine | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for engine, actors, threads, seconds, diff in rows:
        print(f"| {engine} | {actors} | {threads} | {seconds:.1f} | {len(prompts) / seconds:.2f} | "
              f"{local_s / seconds:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
