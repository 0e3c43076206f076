"""prefill-router: route LLM requests on an encoder LLM's prefill hidden states."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import prefill_router` stays light: the client pulls in httpx and the serve stage.
    if name == "Client":
        from prefill_router.client import Client

        return Client
    raise AttributeError(f"module 'prefill_router' has no attribute {name!r}")
