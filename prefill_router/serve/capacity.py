"""How many prompts per second this machine routes, measured on the loaded router itself.

`measure_capacity` runs the scorer on distinct prompts that fill the routing window (the most a prompt costs),
one at a time and in batches, and returns prompts/s for each batch size. It decides two things:
- the batch size the gateway forms (`batching.max_batch_size: null`): a batch only where it routes more prompts
  per second than one prompt at a time (by `MIN_GAIN`), else 1: on a CPU a padded batch is often no faster;
- the drain rate the admission control starts from (seconds per character of window), before the first
  batches have taught it the real one.

`prefill-router serve --check` prints it from a 10-second run; the gateway's start runs a short one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from prefill_router.data.prompt import Message

MIN_GAIN = 1.1  # a batch must route 10 % more prompts per second than one at a time to be worth forming
WORDS = ("route", "model", "answer", "question", "token", "cost", "layer", "state", "prefill", "encoder", "target",
         "price", "budget", "window", "batch", "queue", "deadline", "replica", "session", "feedback")


def window_prompts(n: int, window_tokens: int, seed: int = 0) -> list[list[Message]]:
    """`n` different prompts of about `window_tokens` tokens each (different, so no prefix cache helps)."""
    rng = np.random.default_rng(seed)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS, size=window_tokens))}] for _ in range(n)]


def measure_capacity(scorer: Any, seconds: float = 10.0, batch_sizes: Sequence[int] = (1, 4),
                     min_batches: int = 2) -> dict:
    """prompts/s at each batch size over about `seconds` in all (at least `min_batches` batches each, after one
    warm-up batch), the batch size to use, and seconds per window character at that size."""
    from prefill_router.serve.engine import DEFAULT_MAX_ROUTE_TOKENS

    window = int(getattr(scorer, "max_route_tokens", DEFAULT_MAX_ROUTE_TOKENS))
    quiet = logging.getLogger("prefill_router.features.encoder")  # its prompts are cut to the window on purpose
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _measure(scorer, window, seconds, batch_sizes, min_batches)
    finally:
        quiet.setLevel(level)


def _measure(scorer: Any, window: int, seconds: float, batch_sizes: Sequence[int], min_batches: int) -> dict:
    from prefill_router.serve.engine import CHARS_PER_TOKEN, PROMPT_OVERHEAD_CHARS

    per_size = seconds / len(batch_sizes)
    rates: dict[int, float] = {}
    seed = 0
    for size in batch_sizes:
        seed += 1
        scorer.score_batch(window_prompts(size, window, seed))  # warm-up: shapes, allocator
        done, started = 0, time.perf_counter()
        while done < min_batches * size or time.perf_counter() - started < per_size:
            seed += 1
            scorer.score_batch(window_prompts(size, window, seed))
            done += size
        rates[size] = done / (time.perf_counter() - started)
    single = rates[min(batch_sizes)]
    best = max(batch_sizes, key=lambda b: rates[b] if rates[b] >= MIN_GAIN * single or b == min(batch_sizes)
               else 0.0)
    chars = CHARS_PER_TOKEN * window + PROMPT_OVERHEAD_CHARS
    return {"window_tokens": window, "prompts_per_s": rates, "batch_size": best,
            "seconds_per_char": 1.0 / (rates[best] * chars)}


def describe_capacity(capacity: dict, deadline_ms: float | None) -> str:
    rates = capacity["prompts_per_s"]
    lines = [f"capacity at the {capacity['window_tokens']}-token routing window (prompts that fill it, the most a "
             "prompt costs): " + ", ".join(f"{r:.1f} prompts/s at batch {b}" for b, r in rates.items()),
             f"batch size the gateway forms: {capacity['batch_size']} (a batch only where it routes at least "
             f"{MIN_GAIN:.1f}x the prompts per second of one at a time)"]
    best = rates[capacity["batch_size"]]
    if deadline_ms is not None:
        lines.append(f"with a {deadline_ms:g} ms deadline, about {best:.1f} window-filling prompts/s (more for "
                     "shorter ones) are decided by the prefill router; beyond that the fast fallback scorer decides "
                     "at arrival")
    return "\n".join(lines)
