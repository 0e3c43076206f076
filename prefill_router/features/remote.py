"""An encoder hosted behind HTTP: the interface the router needs, a client, and a reference server.

The router and the gateway use an encoder through the `PrefillEncoder` protocol (features/protocol.py):
`identity()`, `encode(prompts, poolings=, layers=)` returning {pooling: float32 [N, L, H]}, `count_tokens`,
`last_token_counts`, `max_tokens` and the model's shape. A loaded `Encoder` has them; so does `RemoteEncoder`,
which asks a server for them. That lets a
large encoder live on its own GPU machine (one copy, batched across gateway replicas) while the gateway stays
a small CPU process.

The protocol (version `prefill-router-encoder/1`), small enough to implement in any server:

    GET  /v1/encoder  -> {"format": "prefill-router-encoder/1", "identity": {...}, "num_hidden_states": 31,
                          "hidden_size": 576, "max_tokens": 8192, "poolings": ["mean", "last"]}
    POST /v1/prefill  <- {"prompts": [text or chat messages, ...], "poolings": ["mean"], "layers": [0, 18]}
                      -> 200, application/octet-stream: a safetensors file with one float32 tensor per pooling
                         [N, len(layers), hidden] and `tokens` int32 [N] (templated length before truncation).
                         `poolings: []` returns `tokens` only. `layers: null` means every hidden state.
                      -> 4xx/5xx, JSON {"error": {"message": "..."}} naming the problem (e.g. an empty prompt)

The server applies the template, truncation and pooling, so the features are exactly those of the same
encoder run locally, and its `identity` is the local encoder's (router checkpoints check it).
`create_encoder_app(encoder)` is the reference server: a FastAPI app over a loaded `Encoder`. A vLLM-hosted
encoder would implement the same two routes (see the README's note on vLLM).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at runtime.
import json
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from prefill_router.data.prompt import prompt_hashes
from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features.encoder import POOLINGS, Encoder, _as_prompt_list, _check_poolings
from prefill_router.features.protocol import PrefillEncoder  # noqa: F401  (re-exported: it was defined here)

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI

PROTOCOL = "prefill-router-encoder/1"


def _httpx() -> ModuleType:
    try:
        import httpx
    except ImportError:
        raise ConfigError("a remote encoder needs httpx: pip install 'prefill-router[serve]'") from None
    return httpx


class RemoteEncoder:
    """A `PrefillEncoder` served over HTTP (see the module docstring for the wire protocol).

    url: the server's base URL, e.g. http://encoder-host:8100.
    max_prompts: prompts per request; larger calls are split (bounds each response's size).
    """

    def __init__(self, url: str, *, timeout: float = 120.0, api_key: str | None = None,
                 max_prompts: int = 64):
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError(f"encoder url: expected http(s)://host:port, got {url!r}")
        if max_prompts <= 0:
            raise ConfigError(f"max_prompts: must be positive, got {max_prompts}")
        http = _httpx()
        self.url = url.rstrip("/")
        self.max_prompts = max_prompts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.Client = http.Client(base_url=self.url, timeout=timeout, headers=headers)
        info = self._request("GET", "/v1/encoder").json()
        if info.get("format") != PROTOCOL:
            raise EncoderError(f"encoder server {self.url}: speaks {info.get('format')!r}, "
                               f"expected {PROTOCOL!r}")
        try:
            self._identity: dict = info["identity"]
            self.num_hidden_states = int(info["num_hidden_states"])
            self.hidden_size = int(info["hidden_size"])
            self.max_tokens = int(info["max_tokens"])
            self.poolings = list(info.get("poolings", POOLINGS))
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderError(f"encoder server {self.url}: /v1/encoder lacks a valid field "
                               f"({exc})") from None
        self.spec = None  # loaded by URL: no EncoderSpec describes it (checkpoints fall back to the identity)
        # (prompt hashes, token counts) of this thread's latest call: per thread, like the local encoder's
        # diagnostics, so concurrent gateway workers never read each other's counts.
        self._calls = threading.local()

    def __repr__(self) -> str:
        return (f"RemoteEncoder({self.url!r}, model={self._identity.get('model')!r}, "
                f"hidden_states={self.num_hidden_states}, hidden={self.hidden_size})")

    def identity(self) -> dict:
        return self._identity

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteEncoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, route: str, **kwargs: Any) -> "httpx.Response":
        httpx = _httpx()
        try:
            response = self._client.request(method, route, **kwargs)
        except httpx.HTTPError as exc:
            raise EncoderError(f"encoder server {self.url}{route} unreachable: "
                               f"{type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise EncoderError(f"encoder server {self.url}{route} answered {response.status_code}: {message}")
        return response

    def _prefill(self, prompts: list, poolings: list[str], layers: list[int] | None) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        out: dict[str, list[np.ndarray]] = {name: [] for name in [*poolings, "tokens"]}
        for start in range(0, len(prompts), self.max_prompts):
            chunk = prompts[start:start + self.max_prompts]
            body = {"prompts": chunk, "poolings": poolings, "layers": layers, "row_offset": start}
            try:
                tensors = load(self._request("POST", "/v1/prefill", json=body).content)
            except EncoderError:
                raise
            except Exception as exc:  # a body that is not a safetensors file
                raise EncoderError(f"encoder server {self.url}: unreadable /v1/prefill reply "
                                   f"({exc})") from None
            for name in out:
                if name not in tensors or len(tensors[name]) != len(chunk):
                    raise EncoderError(f"encoder server {self.url}: /v1/prefill reply lacks {name!r} for "
                                       f"{len(chunk)} prompts")
                out[name].append(tensors[name])
        result = {name: np.concatenate(parts) for name, parts in out.items()}
        self._calls.tokens = (prompt_hashes(prompts), result["tokens"].astype(np.int64))
        return result

    def encode(self, prompts: Sequence[Any], *, poolings: Sequence[str] = POOLINGS,
               layers: Sequence[int] | str | None = None, batch_tokens: int | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
        """{pooling: float32 [N, L, H]} in input order, computed by the server. (batch_tokens and progress
        are accepted for signature compatibility; the server batches.)"""
        prompts = _as_prompt_list(prompts)
        if not prompts:
            raise EncoderError("prompts: nothing to encode (empty list)")
        poolings = _check_poolings(poolings)
        if isinstance(layers, str) and layers == "all":
            layers = None
        layers = None if layers is None else [int(x) for x in layers]
        result = self._prefill(prompts, poolings, layers)
        return {p: result[p].astype(np.float32, copy=False) for p in poolings}

    def count_tokens(self, prompts: Sequence[Any]) -> np.ndarray:
        """Templated prompt lengths before truncation; free right after `encode` of the same prompts."""
        prompts = _as_prompt_list(prompts)
        last = getattr(self._calls, "tokens", None)
        if last is not None and last[0] == prompt_hashes(prompts):
            counts: np.ndarray = last[1].copy()
            return counts
        return self._prefill(prompts, [], None)["tokens"].astype(np.int64)

    @property
    def last_token_counts(self) -> np.ndarray:
        """Templated lengths of this thread's latest call's prompts (the server sends them with the features)."""
        last = getattr(self._calls, "tokens", None)
        return np.zeros(0, dtype=np.int64) if last is None else last[1].copy()


# ----------------------------------------------------------------------------------------------------------
# The reference server


def create_encoder_app(encoder: Encoder, *, api_key: str | None = None) -> "FastAPI":
    """A FastAPI app serving `encoder` (a loaded `Encoder`) with the protocol above. One request runs at a
    time on the model (a lock), each as one batched `encode` call.

        uvicorn.run(create_encoder_app(load_encoder("smollm2-135m")), host="0.0.0.0", port=8100)
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response
    except ImportError:
        raise ConfigError("the encoder server needs FastAPI: pip install 'prefill-router[serve]'") from None
    from safetensors.numpy import save

    app = FastAPI(title="prefill-router encoder", version=PROTOCOL)
    lock = threading.Lock()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    def authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization", "") == f"Bearer {api_key}"

    @app.get("/v1/encoder")
    def describe(request: Request) -> JSONResponse:
        if not authorised(request):
            return error(401, "missing or wrong API key")
        return JSONResponse({"format": PROTOCOL, "identity": encoder.identity(),
                             "num_hidden_states": encoder.num_hidden_states, "hidden_size": encoder.hidden_size,
                             "max_tokens": encoder.max_tokens, "poolings": list(POOLINGS)})

    @app.post("/v1/prefill")
    def prefill(request: Request, body: dict) -> Response:
        if not authorised(request):
            return error(401, "missing or wrong API key")
        prompts, layers = body.get("prompts"), body.get("layers")
        poolings = body.get("poolings", list(POOLINGS))
        offset = body.get("row_offset", 0) if isinstance(body.get("row_offset"), int) else 0
        if not isinstance(prompts, list) or not prompts:
            return error(400, "'prompts' must be a non-empty list of texts or chat-message lists")
        if not isinstance(poolings, list) or (layers is not None and not isinstance(layers, list)):
            return error(400, "'poolings' must be a list and 'layers' a list or null")
        try:
            with lock:
                tokens = encoder.count_tokens(prompts).astype(np.int32)
                tensors = encoder.encode(prompts, poolings=poolings, layers=layers) if poolings else {}
        except EncoderError as exc:
            return error(400, _shift_rows(str(exc), offset))
        tensors = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}
        metadata = {"layers": json.dumps(encoder.resolve_layers(layers)), "format": PROTOCOL}
        return Response(save({**tensors, "tokens": tokens}, metadata=metadata),
                        media_type="application/octet-stream")

    return app


def _shift_rows(message: str, offset: int) -> str:
    """Name the row of the caller's whole list, not of the request chunk ("prompt at row 3" -> row 67)."""
    import re

    if not offset:
        return message
    return re.sub(r"\brow (\d+)", lambda m: f"row {int(m.group(1)) + offset}", message)
