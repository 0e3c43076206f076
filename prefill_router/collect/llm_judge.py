"""The `llm` judge: an OpenAI-compatible judge model grades each answer with a rubric and a 0-1 score.

When the judge model fails (HTTP error, timeout, a reply without a readable score in [0, 1]) the label is
recorded as missing with the reason; it is never guessed. `--retry-failed` asks the judge again without
calling the target again.

A judge config file (YAML or TOML):

    judge:                       # an OpenAI-compatible endpoint, same fields as a target
      name: grader
      base_url: https://api.example.com/v1
      model: gpt-4o-mini
      api_key_env: OPENAI_API_KEY
    rubric: |                    # optional; replaces DEFAULT_RUBRIC
      ...
    max_tokens: 64               # optional
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefill_router.collect.openai_api import RateLimiter, RetryPolicy, Sleep, chat_completion
from prefill_router.errors import ConfigError, DataError
from prefill_router.targets import TargetConfig, read_config_file, validation_message

DEFAULT_RUBRIC = (
    "You grade answers to questions. Decide whether the candidate answer is correct. When a reference "
    "answer is given, the candidate is correct if it reaches the same final answer, whatever its wording. "
    "Give partial credit only when the question has several parts and some are right.\n"
    "Reply with your verdict on the last line, exactly in the form `SCORE: <number from 0 to 1>`, "
    "where 1 means fully correct and 0 means wrong."
)


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    judge: TargetConfig
    rubric: str = Field(default=DEFAULT_RUBRIC, min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)


def load_judge_config(path: str | Path) -> JudgeConfig:
    try:
        return JudgeConfig.model_validate(read_config_file(path))
    except ValidationError as exc:
        raise ConfigError(validation_message(path, exc)) from exc


def build_judge_messages(question: str, answer: str, reference: object | None, rubric: str = DEFAULT_RUBRIC
                         ) -> list[dict]:
    parts = [f"Question:\n{question}"]
    if reference is not None:
        ref = reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False)
        parts.append(f"Reference answer:\n{ref}")
    parts.append(f"Candidate answer:\n{answer}")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": "\n\n".join(parts)}]


_SCORE = re.compile(r"\bscore\b\s*[\"']?\s*[:=]\s*\**\s*(?P<v>[-+]?\d+(?:\.\d+)?|[-+]?\.\d+)\s*(?P<pct>%)?",
                    re.IGNORECASE)


def parse_judge_score(reply: str) -> float:
    """The score in a judge reply, in [0, 1]. Raises ValueError on a reply without one, or out of range.

    Accepted: "SCORE: 0.8" (the last one wins), a JSON object {"score": 0.8}, or a reply that is just a number.
    "80%" reads as 0.8. Nothing else is guessed: "7/10" or "correct" are refused.
    """
    if not isinstance(reply, str) or not reply.strip():
        raise DataError("empty judge reply")
    text = reply.strip()
    value: float | None = None
    matches = list(_SCORE.finditer(text))
    if matches:
        m = matches[-1]
        value = float(m.group("v")) / (100.0 if m.group("pct") else 1.0)
    else:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("score"), (int, float)) \
                and not isinstance(parsed.get("score"), bool):
            value = float(parsed["score"])
        elif isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            value = float(parsed)
    if value is None:
        raise DataError(f"no score in judge reply {text[:120]!r}")
    if not 0.0 <= value <= 1.0:
        raise DataError(f"judge score {value:g} is outside [0, 1]")
    return value


@dataclass
class LLMJudge:
    """Scores answers by asking a judge model. `score` returns (score, None) or (None, reason)."""

    config: JudgeConfig
    client: httpx.AsyncClient
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limiter: RateLimiter | None = None
    sleep: Sleep | None = None

    async def score(self, question: str, answer: str, reference: object | None) -> tuple[float | None, str | None]:
        params: dict = {"temperature": 0}
        if self.config.max_tokens:
            params["max_tokens"] = self.config.max_tokens
        kwargs = {"sleep": self.sleep} if self.sleep else {}
        result = await chat_completion(self.client, self.config.judge,
                                       build_judge_messages(question, answer, reference, self.config.rubric),
                                       params=params, limiter=self.limiter, retry=self.retry, **kwargs)
        if not result.ok:
            return None, f"judge call failed: {result.error}"
        try:
            return parse_judge_score(result.text or ""), None
        except ValueError as exc:
            return None, f"judge reply unreadable: {exc}"
