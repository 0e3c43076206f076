"""The gateway's own errors and how they reach a client: OpenAI's shape
{"error": {"message", "type", "param", "code"}} (`param`: the request field at fault, when one is).

Raise `GatewayError(status, message, code=...)` anywhere in a request; `install_error_handlers` turns it (and
FastAPI's own 404/405 and request-model validation errors) into that shape and counts it in the metrics.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefill_router.errors import PrefillRouterError
from prefill_router.serve.metrics import GatewayMetrics

log = logging.getLogger("prefill_router.serve")


class GatewayError(PrefillRouterError):
    """An error the gateway answers with `status`; the message names the problem."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers
        self.param = param


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(metrics: GatewayMetrics, status: int, message: str, type_: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    metrics.errors.labels(status=str(status), code=code or "").inc()
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """One line per problem, naming the body field: "score: Input should be less than or equal to 1"."""
    problems = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # its loc is a character offset, not a field
            error = (e.get("ctx") or {}).get("error") or e.get("msg", "JSON decode error")
            problems.append(f"request body is not valid JSON: {error} at character {e['loc'][-1]}")
            continue
        where = [str(p) for p in e.get("loc", ()) if p != "body"]
        problems.append(f"{'.'.join(where) or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request body"


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(metrics, exc.status, exc.message, exc.type, exc.code, exc.headers, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(metrics, exc.status_code, str(exc.detail), "invalid_request_error", code,
                              getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict = next(iter(exc.errors()), {})
        where = [str(p) for p in first.get("loc", ()) if p != "body"] if first.get("type") != "json_invalid" else []
        return error_response(metrics, 400, validation_message(exc), "invalid_request_error", "invalid_body",
                              param=".".join(where) or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(metrics, 500, f"internal error: {type(exc).__name__}", "server_error",
                              "internal_error")
