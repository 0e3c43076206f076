"""`prefill-router serve`: the OpenAI-compatible routing gateway.

    prefill-router serve --config gateway.yaml --check    # validate the config, keys and router, then exit
    prefill-router serve --config gateway.yaml --port 8000
"""

from __future__ import annotations

import os
import sys

from prefill_router.cli.common import HelpFormatter
from prefill_router.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible routing gateway",
        description=__doc__ + "\nRoute each /v1/chat/completions request with a trained router checkpoint and "
                              "proxy it to the chosen upstream.\nThe config file format: docs/serving.md and "
                              "prefill_router/serve/config.py.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="gateway config file (YAML or TOML)")
    p.add_argument("--host", default=None, help="listen address (default: listen.host of the config)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: listen.port of the config)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.add_argument("--check", action="store_true",
                   help="validate the config and that every API key variable it names is set (before loading "
                        "anything), then load the router and its encoder, measure the prompts per second it "
                        "routes (10 s), and exit without serving")
    p.set_defaults(func=run)


def run(args) -> int:
    # The encoder's OpenMP threads sleep rather than spin between the forward's parallel regions: they share the
    # cores with the event loop and tokenization, and on a busy CPU spinning threads made one worker of two
    # threads 7-10x slower (bench/README.md, number formats). Read once, when torch loads, so it is set first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from prefill_router.serve.app import build_gateway, load_router
    from prefill_router.serve.config import load_gateway_config
    from prefill_router.serve.server import serve_forever

    # Everything cheap first, so a bad config or an unset key is reported in a second, not after loading the encoder.
    config = load_gateway_config(args.config)
    unset = config.unset_variables()
    if unset and args.check:
        raise ConfigError(f"{args.config}: " + "; ".join(unset))
    config.auth.all_keys()  # an unset auth.keys_env stops the gateway too: it would accept no client
    config.admin.all_keys("admin")  # likewise for admin.keys_env: reported once, as the error it is
    try:  # tenants' keys and the shared state's URL: found now, not after the encoder has loaded
        for i, tenant in enumerate(config.auth.all_tenants()):
            tenant.secret(f"auth.tenants.{i}")
        config.state.url()
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    for problem in unset:  # a target without its key: its requests go to the fallbacks
        print(f"warning: {problem}", file=sys.stderr)
    router = load_router(config)  # reads the checkpoint; its encoder loads at warm-up below
    missing = [t for t in router.targets if t not in {c.name for c in config.targets}]
    if missing:
        raise ConfigError(f"{args.config}: targets: the router predicts for {missing}, which have no upstream "
                          "entry in the config")
    app = build_gateway(config, router)
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    routed = app.state.gateway.routed_targets
    print(f"router: {config.router.checkpoint} ({len(routed)} targets: {', '.join(routed)})")
    if args.check:
        from prefill_router.serve.capacity import describe_capacity, measure_capacity

        print("API keys set; config and router OK")
        scorer = app.state.gateway.engine.scorer
        if getattr(scorer, "has_fallback", False):
            print("fallback scorer: in the checkpoint (decides what the prefill router cannot in time)")
        else:
            print("fallback scorer: none (an older checkpoint; train again for one): a request the prefill router "
                  "cannot decide in time goes to the default target")
        print("measuring capacity for 10 s ...", flush=True)
        print(describe_capacity(measure_capacity(scorer, seconds=10.0), config.router.deadline_ms))
        return 0
    print(f"serving on http://{host}:{port}/v1  (models: router, "
          + ", ".join(f"router:{p}" for p in config.presets) + ", or a target name)")
    serve_forever(app, host, port, log_level=args.log_level)
    return 0
