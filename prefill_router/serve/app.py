"""The OpenAI-compatible routing gateway (FastAPI): one APIRouter per concern.

    serve/proxy.py     POST /v1/chat/completions, POST /v1/route, GET /v1/models, GET /health, GET /metrics
    serve/feedback.py  POST /v1/feedback
    serve/stats.py     GET /v1/stats, GET /v1/decisions
    serve/admin.py     POST /admin/reload (and SIGHUP)
    serve/ui.py        the dashboard at /ui

Every error the gateway itself produces has OpenAI's shape {"error": {"message", "type", "code"}}
(serve/errors.py); what one gateway holds while it runs is a `Gateway` (serve/state.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI

from prefill_router.errors import ConfigError
from prefill_router.features.encoder import set_cpu_threads
from prefill_router.serve import admin, feedback, proxy, stats
from prefill_router.serve.capacity import measure_capacity
from prefill_router.serve.config import GatewayConfig
from prefill_router.serve.engine import RouterScorer, Scorer
from prefill_router.serve.errors import GatewayError, error_body, install_error_handlers
from prefill_router.serve.state import Gateway
from prefill_router.serve.ui import mount_ui

if TYPE_CHECKING:
    from prefill_router.router import Router

__all__ = ["GatewayError", "build_gateway", "create_app", "error_body", "load_router"]


def create_app(config: GatewayConfig, scorer: Scorer, *, encoder_info: dict | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The gateway for `config`, routing with `scorer` (see `RouterScorer` for a trained `Router`)."""
    gw = Gateway(config, scorer, encoder_info=encoder_info, transport=transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        admin.install_sighup(app)
        yield
        admin.remove_sighup()
        await gw.close()

    app = FastAPI(title="prefill-router gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gw
    app.state.config = config  # read by serve/server.py (listen settings)
    install_error_handlers(app, gw.metrics)
    for module in (proxy, feedback, stats, admin):
        app.include_router(module.router)
    if config.ui.enabled:
        mount_ui(app)
    return app


def load_router(config: GatewayConfig) -> Router:
    """The Router named by `router.checkpoint` (with `router.encoder` instead of the checkpoint's, if given)."""
    from prefill_router.router import Router

    if config.router.checkpoint is None:
        raise ConfigError("router.checkpoint: required (the folder `prefill-router train --out` wrote)")
    encoder = None
    if config.router.encoder:
        from prefill_router.features import load_encoder

        encoder = load_encoder(config.router.encoder)
    return Router.load(config.router.checkpoint, encoder=encoder)


def build_gateway(config: GatewayConfig, router: Router | None = None) -> FastAPI:
    """Load the router (unless given), load its encoder and warm it up, and build the app."""
    set_cpu_threads(config.router.threads)
    scorer = RouterScorer(router if router is not None else load_router(config), config.router.max_route_tokens,
                          config.router.prefix_cache_mb, config.router.dtype)
    scorer.warm_up()
    if config.batching.max_batch_size is None:  # measure whether batches pay on this machine (a second or two)
        capacity = measure_capacity(scorer, seconds=1.0)
        scorer.preferred_batch_size, scorer.seconds_per_char = capacity["batch_size"], capacity["seconds_per_char"]
        scorer.capacity = capacity
    return create_app(config, scorer)
