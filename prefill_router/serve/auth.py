"""Who is calling: bearer keys as FastAPI dependencies.

    caller (CallerDep)  the API: a client key (a plain key or a tenant's), or an admin key; none configured at all:
                        the API is open and every caller is an operator
    admin_key           /admin/*: admin keys only (none configured: /admin/* is off, 403)

A client key sees and scores only its own traffic (its decisions, its feedback, its spend); an admin key is an
operator's and sees every key's. Keys are compared in constant time (hmac.compare_digest), every one of them
on every request, so timing does not tell which key matched. Bodies are read only after this check.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prefill_router.serve.config import GatewayConfig, Tenant
from prefill_router.serve.errors import GatewayError

_bearer = HTTPBearer(auto_error=False)  # our own 401 below, in the gateway's error shape
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
OPERATOR = "admin"  # the alias an admin key's requests are counted under


@dataclass(frozen=True)
class Caller:
    alias: str | None           # the key's alias (a plain key: "key-" and a digest of it); None: an open API
    tenant: Tenant | None = None  # its limits, allowed targets and trade-off (plain and admin keys: none)
    operator: bool = False      # an admin key, or an open API: sees every key's traffic

    def sees(self, owner: str | None) -> bool:
        return self.operator or owner == self.alias


def plain_alias(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def key_table(config: GatewayConfig) -> list[tuple[bytes, Caller]]:
    """Every accepted bearer key with the caller it makes. ConfigError for a tenant whose key is unset."""
    table = [(k.encode(), Caller(plain_alias(k))) for k in sorted(config.auth.all_keys())]
    for i, tenant in enumerate(config.auth.all_tenants()):
        table.append((tenant.secret(f"auth.tenants.{i}").encode(), Caller(tenant.alias, tenant)))
    admin = sorted(config.admin.all_keys("admin"))
    if table:  # with client keys configured, an admin key works on the API too (as an operator)
        table += [(k.encode(), Caller(OPERATOR, operator=True)) for k in admin]
    return table


def _match(credentials: HTTPAuthorizationCredentials | None, table: list[tuple[bytes, Caller]]) -> Caller:
    if credentials is None or not credentials.credentials.strip():
        raise GatewayError(401, "missing bearer key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                           "invalid_api_key", _CHALLENGE)
    token = credentials.credentials.strip().encode()
    found = None
    for key, who in table:  # no early exit: the time taken does not depend on which key matched
        if hmac.compare_digest(token, key):
            found = who
    if found is None:
        raise GatewayError(401, "invalid bearer key", "invalid_request_error", "invalid_api_key", _CHALLENGE)
    return found


def caller(request: Request, credentials: Bearer) -> Caller:
    table = request.app.state.gateway.client_keys
    if not table:
        return Caller(None, operator=True)
    return _match(credentials, table)


CallerDep = Annotated[Caller, Depends(caller)]


def admin_key(request: Request, credentials: Bearer) -> None:
    table = request.app.state.gateway.admin_keys
    if not table:
        raise GatewayError(403, "the admin API is off: set admin.keys or admin.keys_env in the gateway config",
                           "invalid_request_error", "admin_disabled")
    _match(credentials, table)


def admin_table(config: GatewayConfig) -> list[tuple[bytes, Caller]]:
    return [(k.encode(), Caller(OPERATOR, operator=True)) for k in sorted(config.admin.all_keys("admin"))]
