"""The serve stage: an OpenAI-compatible gateway that routes each request, then proxies it upstream.

    from prefill_router.serve import load_gateway_config, build_gateway, BackgroundServer
    app = build_gateway(load_gateway_config("gateway.yaml"))   # FastAPI app; `prefill-router serve` runs it

It composes the router stage (`Router.predict_batch` / `Router.choose`) and defines no math.
"""

from prefill_router.serve.app import build_gateway, create_app, load_router
from prefill_router.serve.config import GatewayConfig, load_gateway_config, parse_gateway_config
from prefill_router.serve.engine import RouterScorer, RoutingEngine, Scores
from prefill_router.serve.errors import GatewayError
from prefill_router.serve.journal import FeedbackJournal, read_feedback
from prefill_router.serve.models import ModelChoice, UnknownModel, resolve_model
from prefill_router.serve.server import BackgroundServer, serve_forever
from prefill_router.serve.state import Gateway
from prefill_router.serve.upstream import AllUpstreamsFailed, Attempt, UpstreamPool, UpstreamReply

__all__ = ["AllUpstreamsFailed", "Attempt", "BackgroundServer", "FeedbackJournal", "Gateway", "GatewayConfig",
           "GatewayError", "ModelChoice", "RouterScorer", "RoutingEngine", "Scores", "UnknownModel", "UpstreamPool",
           "UpstreamReply", "build_gateway", "create_app", "load_gateway_config", "load_router",
           "parse_gateway_config", "read_feedback", "resolve_model", "serve_forever"]
