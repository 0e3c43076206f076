"""`prefill-router serve`: the OpenAI-compatible routing gateway."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible routing gateway",
        description="Route each /v1/chat/completions request with a trained router checkpoint and proxy it to "
                    "the chosen upstream. See prefill_router/serve/config.py for the config file format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="gateway config file (YAML or TOML)")
    p.add_argument("--host", default=None, help="listen address (overrides listen.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (overrides listen.port)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--check", action="store_true",
                   help="validate the config, load the router and encoder, then exit without serving")
    p.set_defaults(func=run)


def run(args) -> int:
    from prefill_router.serve.app import build_gateway
    from prefill_router.serve.config import load_gateway_config
    from prefill_router.serve.server import serve_forever

    config = load_gateway_config(args.config)
    app = build_gateway(config)
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    routed = app.state.engine.targets
    print(f"router: {config.router.checkpoint} ({len(routed)} targets: {', '.join(routed)})")
    if args.check:
        print("config and router OK")
        return 0
    print(f"serving on http://{host}:{port}/v1  (models: router, "
          + ", ".join(f"router:{p}" for p in config.presets) + ", or a target name)")
    serve_forever(app, host, port, log_level=args.log_level)
    return 0
