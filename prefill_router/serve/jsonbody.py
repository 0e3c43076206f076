"""A request body the gateway can forward: a JSON object that is also valid JSON on the way out.

Python's `json` accepts things an upstream request cannot carry, and they used to fail later as a 500:
`NaN`, `Infinity` and numbers such as `1e999` (JSON has no non-finite numbers; httpx refuses to encode
them), `"\\ud800"` escapes that decode to a lone surrogate (not valid Unicode, cannot be UTF-8 encoded), and
nesting deep enough to raise RecursionError. `parse_json_body` turns each into a `BadBody` naming the problem
and, where it can, the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from prefill_router.serve.errors import GatewayError

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 128  # far beyond any chat request (tool JSON schemas included), far below the recursion limit

_SURROGATE = re.compile("[\ud800-\udfff]")


class BadBody(ValueError):
    """The body cannot be forwarded; the message names the problem (and the field, when there is one)."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadBody(f"request body: the number {text} is out of range (JSON numbers must be finite)")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > 300:  # past float range: arithmetic on it would overflow
        raise BadBody(f"request body: the number {text[:20]}... is out of range")
    return int(text)


def _constant(name: str) -> float:
    raise BadBody(f"request body: {name} is not valid JSON (JSON numbers must be finite)")


def _where(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "the body"


def _check(body: Any) -> None:
    """Depth and lone surrogates, walked without recursion so depth itself cannot crash the walk."""
    stack: list[tuple[Any, list[str | int]]] = [(body, [])]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise BadBody(f"request body is nested more than {MAX_DEPTH} levels deep (at {_where(path[:8])}...)")
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise BadBody(f"{_where(path)}: {found.group()!r} at character {found.start()} is a lone surrogate, "
                              "not valid Unicode text")
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise BadBody(f"{_where(path) if path else 'request body'}: a key holds a lone surrogate, "
                                  "not valid Unicode text")
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(value))


def parse_json_body(raw: bytes) -> dict:
    """The JSON object in `raw`, or BadBody saying why it cannot be forwarded."""
    try:
        body = json.loads(raw, parse_float=_finite, parse_int=_integer, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadBody(f"request body is nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(body, dict):
        raise BadBody("request body must be a JSON object")
    _check(body)
    return body


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, read up to `limit` bytes (413 beyond). Call it after the key check, so an
    unauthenticated client cannot make the gateway read a large body."""
    declared = request.headers.get("content-length")
    too_big = GatewayError(413, f"request body is larger than max_body_bytes={limit}", "invalid_request_error",
                           "request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_big
    except ClientDisconnect:  # it left, or was cut off for sending too slowly (listen.read_timeout_s)
        raise GatewayError(400, "the client disconnected before sending the whole body",
                           code="client_disconnected") from None
    try:
        return parse_json_body(bytes(raw))
    except BadBody as exc:
        raise GatewayError(400, str(exc), code="invalid_json") from None


async def read_model(request: Request, model: type[M], limit: int, empty_ok: bool = False) -> M:
    """`read_json`, validated by `model` (strict types: "1" is no number, "yes" no boolean); 400 names each bad
    field. An empty body is `model()` when `empty_ok`."""
    if empty_ok and request.headers.get("content-length") in ("0", None) and \
            "chunked" not in request.headers.get("transfer-encoding", ""):
        return model()
    body = await read_json(request, limit)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors: list[Any] = list(exc.errors())
        first = errors[0] if errors else {}
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
        raise GatewayError(400, problems, code="invalid_body",
                           param=".".join(str(p) for p in first.get("loc", ())) or None) from None
