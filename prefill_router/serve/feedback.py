"""POST /v1/feedback: how good an answer was, for retraining the router (`prefill-router train --feedback`).

    {"id": "<x-router-request-id or the reply's OpenAI id>", "score": 0..1, "target": "<optional>"}

`target` is the target whose answer is scored (default: the one that answered). Answers: 200 with what was
recorded; 400 for a score outside [0, 1] (a number: "1" and true are refused) or a target the router did not
score; 404 for an unknown or expired id, another key's request, or feedback off; 409 for a second feedback on one
request (across replicas, with shared state). A client key scores only its own requests; an admin key any.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from prefill_router.serve.auth import CallerDep
from prefill_router.serve.errors import GatewayError
from prefill_router.serve.journal import FeedbackRefused
from prefill_router.serve.jsonbody import read_model
from prefill_router.serve.state import GatewayDep

router = APIRouter()
MAX_FEEDBACK_BYTES = 16_384  # an id, a score and a target name


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=256)
    score: float = Field(ge=0, le=1, allow_inf_nan=False)
    target: str | None = Field(default=None, min_length=1, max_length=256)


@router.post("/v1/feedback")
async def feedback(request: Request, gw: GatewayDep, who: CallerDep) -> dict:
    body = await read_model(request, FeedbackRequest, min(MAX_FEEDBACK_BYTES, gw.config.max_body_bytes))
    if gw.journal is None:
        raise GatewayError(404, "feedback is off in this gateway: set feedback.dir in its config",
                           code="feedback_disabled")
    try:
        recorded = await gw.feedback(who, body.id, body.score, body.target)
    except FeedbackRefused as exc:
        gw.metrics.feedback.labels(outcome=exc.code).inc()
        raise GatewayError(exc.status, str(exc), code=exc.code) from None
    gw.metrics.feedback.labels(outcome="recorded").inc()
    return {"object": "feedback", "recorded": True, **recorded}
