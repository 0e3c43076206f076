"""prefill-router: route LLM requests on an encoder LLM's prefill hidden states."""

__version__ = "0.1.0"
