"""Spend and routing figures as JSON, for people and the dashboard.

    GET /v1/stats       tokens and USD per target, traffic share, savings against always the best target
    GET /v1/decisions   the most recent decisions (newest first), with their feedback if any
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from prefill_router.serve.auth import client_key
from prefill_router.serve.state import GatewayDep

router = APIRouter(dependencies=[Depends(client_key)])


@router.get("/v1/stats")
async def stats(gw: GatewayDep) -> dict:
    figures = gw.spend.snapshot(gw.best_target)
    journal = gw.journal
    figures["feedback"] = {"enabled": journal is not None,
                           "recorded": 0 if journal is None else journal.feedback_recorded,
                           "routed_stored": 0 if journal is None else journal.routed_stored,
                           "dropped": 0 if journal is None else journal.dropped}
    figures["router"] = {"checkpoint": gw.checkpoint, "loaded_unix": gw.loaded_unix,
                         "targets": gw.routed_targets}
    return figures


@router.get("/v1/decisions")
async def decisions(gw: GatewayDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict:
    recent = list(gw.decisions)[-limit:]
    return {"object": "list", "data": recent[::-1]}
