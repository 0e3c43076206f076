"""Bearer-key checks as FastAPI dependencies: `client_key` for the API, `admin_key` for /admin/*.

Client keys come from `auth` in the config (none configured: the API is open). Admin keys come from `admin`
(none configured: /admin/* is off, 403, so a gateway never exposes reloads by accident).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prefill_router.serve.errors import GatewayError

_bearer = HTTPBearer(auto_error=False)  # our own 401 below, in the gateway's error shape
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check(credentials: HTTPAuthorizationCredentials | None, keys: set[str]) -> None:
    if credentials is None or not credentials.credentials.strip():
        raise GatewayError(401, "missing bearer key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                           "invalid_api_key", _CHALLENGE)
    token = credentials.credentials.strip().encode()
    if not any(hmac.compare_digest(token, k.encode()) for k in keys):
        raise GatewayError(401, "invalid bearer key", "invalid_request_error", "invalid_api_key", _CHALLENGE)


def client_key(request: Request, credentials: Bearer) -> None:
    keys = request.app.state.gateway.client_keys
    if keys:
        _check(credentials, keys)


def admin_key(request: Request, credentials: Bearer) -> None:
    keys = request.app.state.gateway.admin_keys
    if not keys:
        raise GatewayError(403, "the admin API is off: set admin.keys or admin.keys_env in the gateway config",
                           "invalid_request_error", "admin_disabled")
    _check(credentials, keys)
