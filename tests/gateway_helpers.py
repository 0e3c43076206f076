"""What the gateway tests share: a tiny router over three priced targets, and one fake upstream per target.

    from gateway_helpers import TARGETS, PRICES, question, train_tiny_router, upstream_targets

A test takes the fake upstreams as the `upstreams` fixture (conftest.py: started once per module, fresh for each
test; a module names others by overriding `upstream_names`); `running_upstreams` starts them inside one test.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, PriceTable
from prefill_router.router import train_router
from prefill_router.serve.fake_upstream import Answer, FakeUpstream

TARGETS = ["big", "small", "mid"]
PRICES = {"big": (10.0, 30.0), "small": (0.1, 0.3), "mid": (1.0, 3.0)}  # USD per million tokens in / out


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}: what is {i} + {3 * i}? " + "fox " * (i % 7)}]


def train_tiny_router(encoder, folder: Path, n: int = 48) -> Path:
    """A small argmax router on `encoder`'s features of `n` questions: "big" always right, "small" on odd
    questions, "mid" at random. Saved to `folder`."""
    prompts = [question(i) for i in range(n)]
    features = encoder.encode(prompts, poolings=("mean",))
    rng = np.random.default_rng(0)
    Y = np.stack([np.ones(n), (np.arange(n) % 2).astype(float), rng.integers(0, 2, n).astype(float)], axis=1)
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([50.0, 50.0, 50.0]))
    data = RoutingDataset([str(i) for i in range(n)], prompts, TARGETS, Y,
                          cost_model.estimate(encoder.count_tokens(prompts)))
    router = train_router(data, features, config={
        "pca": 8, "policy": "argmax", "calibration_folds": 0,
        "trunk": {"seeds": 2, "keep": 1, "max_epochs": 5, "hidden": [16], "dropout": [0.0], "threads": 1}},
        encoder=encoder, cost_model=cost_model)
    return router.save(folder)


@contextmanager
def running_upstreams(names: Sequence[str]) -> Iterator[dict[str, FakeUpstream]]:
    """One started fake upstream per name, stopped on exit."""
    started = {name: FakeUpstream(name=name).start() for name in names}
    try:
        yield started
    finally:
        for up in started.values():
            up.stop()


def reset_upstreams(upstreams: dict[str, FakeUpstream]) -> None:
    """Forget scripts and recorded requests; each answers "answer from <name>" again."""
    for name, up in upstreams.items():
        up.reset()
        up.default = Answer(f"answer from {name}")


def upstream_targets(upstreams: dict[str, FakeUpstream]) -> list[dict]:
    """Gateway `targets` entries for the fake upstreams, priced as PRICES."""
    return [{"name": n, "base_url": up.base_url, "model": f"{n}-upstream", "timeout_s": 5,
             "usd_per_m_input": PRICES[n][0], "usd_per_m_output": PRICES[n][1]} for n, up in upstreams.items()]


def gateway_config(upstreams: dict[str, FakeUpstream], **overrides) -> dict:
    """A gateway config over the fake upstreams (`upstream_targets`; falling back mid, small, big; small quick
    batches); `overrides` replace whole top-level sections."""
    return {"router": {"checkpoint": None}, "targets": upstream_targets(upstreams),
            "fallback_order": ["mid", "small", "big"], "batching": {"max_batch_size": 8, "max_wait_ms": 2},
            **overrides}


def usage_cost(target: str, usage: dict) -> float:
    """USD of one reply's usage at PRICES."""
    usd_in, usd_out = PRICES[target]
    return (usage["prompt_tokens"] * usd_in + usage["completion_tokens"] * usd_out) / 1e6


def metric(text: str, name: str, **labels) -> float:
    """The sum of a Prometheus exposition's samples named `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real `redis-server` (Debian's package) on a free port of 127.0.0.1, its files in `folder`; `stop` and
    `start` again on the same port (an outage)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import shutil
        import subprocess
        import time

        import redis

        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (apt-get install redis-server; .ci/run does it)"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.folder), "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


@contextmanager
def gateway_process(config: dict, folder: Path, env: dict | None = None) -> Iterator[tuple[str, list[str], object]]:
    """`python -m prefill_router serve` in its own process with `config` (written to `folder`): (url, its output
    lines so far, the Popen). Stopped on exit."""
    import json
    import os
    import re
    import subprocess
    import sys
    import threading

    path = folder / "gateway.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "prefill_router", "serve", "--config", str(path), "--port", "0",
                             "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    bound = threading.Event()

    def drain() -> None:  # keep reading, so the server never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if "Uvicorn running on" in line:
                bound.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert bound.wait(180), "".join(lines)
        url = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", "".join(lines)).group(1)
        yield url, lines, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
