"""Spend and routing figures as JSON, for people and the dashboard.

    GET /v1/stats       an admin key (or an open API): tokens and USD per target, traffic share, savings against
                        always the best target, spend per key alias; a client key: its own requests and spend
    GET /v1/decisions   the most recent decisions (newest first), with their feedback if any: an admin key sees
                        every key's, a client key its own

With shared state (Redis) both read what every replica recorded.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from prefill_router.serve.auth import CallerDep
from prefill_router.serve.state import GatewayDep

router = APIRouter()


@router.get("/v1/stats")
async def stats(gw: GatewayDep, who: CallerDep) -> dict:
    figures = await gw.stats(who)
    if not who.operator:
        return figures
    journal = gw.journal
    figures["feedback"] = {"enabled": journal is not None,
                           "recorded": 0 if journal is None else journal.feedback_recorded,
                           "routed_stored": 0 if journal is None else journal.routed_stored,
                           "dropped": 0 if journal is None else journal.dropped}
    figures["router"] = {"checkpoint": gw.checkpoint, "loaded_unix": gw.loaded_unix,
                         "targets": gw.routed_targets}
    return figures


@router.get("/v1/decisions")
async def decisions(gw: GatewayDep, who: CallerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict:
    return {"object": "list", "data": await gw.recent_decisions(who, limit)}
