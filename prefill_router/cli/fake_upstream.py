"""`prefill-router fake-upstream`: a stand-in OpenAI-compatible upstream, to try the gateway without API keys.

    prefill-router fake-upstream --port 8001                   # every model answers "Hello from the fake upstream."
    prefill-router fake-upstream --port 8001 --delay 0.2       # ... after 0.2 s, like a real model
    prefill-router fake-upstream --port 8001 --fail-model gemini-1.5-flash-002   # that model always answers 503
    prefill-router fake-upstream --port 8001 --fail-rate 0.3   # 30 % of requests answer 503: watch the fallbacks

Point every target's `base_url` at http://127.0.0.1:8001/v1 (any `model`, any key). It answers
`POST /v1/chat/completions` (JSON, or SSE with "stream": true) and `GET /v1/models`; the reply names the
model it was asked for, so you can see where the gateway routed each request.
"""

from __future__ import annotations

import argparse
import time

from prefill_router.cli.common import HelpFormatter
from prefill_router.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser("fake-upstream", help="a fake OpenAI-compatible upstream to try the gateway offline",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8001, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--content", default=None,
                   help="fixed answer text (default: 'Hello from the fake upstream (model <name>).')")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each response starts")
    p.add_argument("--fail-model", action="append", default=[], metavar="MODEL",
                   help="answer 503 to every request for this model (repeatable), so the gateway's retries and "
                        "fallbacks show")
    p.add_argument("--fail-rate", type=float, default=0.0,
                   help="share of the other requests answered with 503, at random (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import random

    from prefill_router.serve.fake_upstream import Answer, Behaviour, Fail, FakeUpstream

    class FailingUpstream(FakeUpstream):
        def _next(self, model: str | None) -> Behaviour:
            if model in args.fail_model or random.random() < args.fail_rate:
                return Fail(503, f"fake upstream failure (model {model}; --fail-model / --fail-rate)")
            return super()._next(model)

    def reply(body: dict) -> str:
        return args.content if args.content is not None else \
            f"Hello from the fake upstream (model {body.get('model')!s})."

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not a port number (0-65535)")
    if args.delay < 0:
        raise ConfigError(f"--delay: {args.delay:g} is negative")
    if not 0 <= args.fail_rate <= 1:
        raise ConfigError(f"--fail-rate: {args.fail_rate:g} is not a share between 0 and 1")
    try:
        up = FailingUpstream(Answer(reply, delay_s=args.delay), port=args.port, host=args.host).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    print(f"fake upstream listening on {up.base_url} (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        up.stop()
    return 0
