"""POST /v1/feedback: how good an answer was, for retraining the router (`prefill-router train --feedback`).

    {"id": "<x-router-request-id or the reply's OpenAI id>", "score": 0..1, "target": "<optional>"}

`target` is the target whose answer is scored (default: the one that answered). Answers: 200 with what was
recorded; 400 for a score outside [0, 1] or a target the router did not score; 404 for an unknown or expired id
(or feedback off); 409 for a second feedback on one request.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from prefill_router.serve.auth import client_key
from prefill_router.serve.errors import GatewayError
from prefill_router.serve.journal import FeedbackRefused
from prefill_router.serve.state import GatewayDep

router = APIRouter(dependencies=[Depends(client_key)])


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    score: float = Field(ge=0, le=1, allow_inf_nan=False)
    target: str | None = Field(default=None, min_length=1)


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, gw: GatewayDep) -> dict:
    if gw.journal is None:
        raise GatewayError(404, "feedback is off in this gateway: set feedback.dir in its config",
                           code="feedback_disabled")
    try:
        recorded = await asyncio.wrap_future(gw.journal.feedback(body.id, body.score, body.target))
    except FeedbackRefused as exc:
        gw.metrics.feedback.labels(outcome=exc.code).inc()
        raise GatewayError(exc.status, str(exc), code=exc.code) from None
    gw.metrics.feedback.labels(outcome="recorded").inc()
    for entry in gw.decisions:
        if entry["id"] == recorded["id"]:
            entry["feedback"] = {"score": recorded["score"], "target": recorded["target"]}
    return {"object": "feedback", "recorded": True, **recorded}
