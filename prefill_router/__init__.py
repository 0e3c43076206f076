"""prefill-router: route LLM requests on an encoder LLM's prefill hidden states."""

__version__ = "0.1.0"
__all__ = ["Client", "RouteDecision", "Router", "RoutingDataset"]


def __getattr__(name: str):
    # Lazy, so `import prefill_router` stays light: the client pulls in httpx and the serve stage.
    if name == "Client":
        from prefill_router.client import Client

        return Client
    if name in ("Router", "RouteDecision"):
        from prefill_router import router

        return getattr(router, name)
    if name == "RoutingDataset":
        from prefill_router.data import RoutingDataset

        return RoutingDataset
    raise AttributeError(f"module 'prefill_router' has no attribute {name!r}")
