"""Faults a tester found in `collect`, each reproduced against a real fake upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import httpx

from prefill_router.cli import main
from prefill_router.collect.openai_api import RetryPolicy, chat_completion
from prefill_router.serve.fake_upstream import Answer, Fail, FakeUpstream
from prefill_router.targets import TargetConfig

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def call(up: FakeUpstream, retry: RetryPolicy):
    """One chat_completion against `up`, recording every wait instead of sleeping."""
    target = TargetConfig(name="t", base_url=up.base_url, timeout_s=10)
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    async def run():
        async with httpx.AsyncClient() as client:
            return await chat_completion(client, target, MESSAGES, retry=retry, sleep=record_sleep)

    return asyncio.run(run()), waits


def test_a_prompt_with_a_lone_surrogate_is_a_recorded_failure_and_the_run_goes_on(tmp_path, capsys):
    lines = [json.dumps({"prompt_id": f"q{i}", "prompt": f"question {i}? A. yes B. no", "answer": "A"})
             for i in range(10)]
    # json.dumps would escape it validly; a hand-written "\ud800" escape decodes to a lone surrogate.
    lines[4] = '{"prompt_id": "bad", "prompt": "hi \\ud800 there", "answer": "A"}'
    lines[7] = '{"prompt": "no id \\udfff here", "answer": "A"}'  # its id is a hash of the text
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "labels.jsonl"
    with FakeUpstream(Answer("The answer is (A).")) as up:
        (tmp_path / "targets.yaml").write_text(f"targets:\n  - name: t\n    base_url: {up.base_url}\n")
        args = ["collect", "--prompts", str(prompts), "--targets", str(tmp_path / "targets.yaml"),
                "--judge", "choice", "--out", str(out), "--concurrency", "2"]
        assert main(args) == 0
        assert up.calls() == 8  # every good prompt was sent; the two bad ones never were
        failures = [json.loads(line) for line in (tmp_path / "labels.failures.jsonl").read_text().splitlines()]
        assert len(failures) == 2
        by_line = {f["error"].split("line ")[1].split(",")[0]: f for f in failures}
        assert set(by_line) == {"5", "8"}
        assert by_line["5"]["prompt_id"] == "bad" and "'bad'" in by_line["5"]["error"]
        assert "surrogate" in by_line["5"]["error"] and by_line["5"]["attempts"] == 0
        assert len(out.read_text().splitlines()) == 8
        # A rerun keeps the recorded failures (no new call, no crash) ...
        assert main(args) == 0 and up.calls() == 8
        # ... and --retry-failed fails them the same way, still without a call.
        assert main(args + ["--retry-failed"]) == 0 and up.calls() == 8
    assert "Traceback" not in capsys.readouterr().err


def test_a_body_json_cannot_carry_is_a_failed_call_not_an_exception():
    target = TargetConfig(name="t", base_url="http://127.0.0.1:9/v1")  # never reached

    async def run(messages, params):
        async with httpx.AsyncClient() as client:
            return await chat_completion(client, target, messages, params=params, retry=RetryPolicy())

    nan = asyncio.run(run(MESSAGES, {"temperature": float("nan")}))
    assert not nan.ok and nan.attempts == 0 and "not valid JSON" in nan.error
    surrogate = asyncio.run(run([{"role": "user", "content": "a \ud800 b"}], None))
    assert not surrogate.ok and surrogate.attempts == 0 and "surrogate" in surrogate.error


def test_a_retry_after_over_the_cap_is_not_waited_for():
    with FakeUpstream(Answer("4")) as up:
        up.script(Fail(429, retry_after=600))
        result, waits = call(up, retry=RetryPolicy(max_retry_after_s=30))
        assert not result.ok and waits == [] and up.calls() == 1 and "over the cap" in result.error


def test_a_redirect_or_refused_key_is_not_retried():
    with FakeUpstream(Answer("4")) as up:
        for status in (302, 401, 403):
            up.reset()
            up.script(Fail(status))
            result, waits = call(up, retry=RetryPolicy(max_attempts=5))
            assert not result.ok and result.status == status and up.calls() == 1 and waits == []
