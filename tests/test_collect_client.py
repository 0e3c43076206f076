"""The collection client against a real fake OpenAI-compatible server: retries, Retry-After, backoff,
non-retryable errors, timeouts, rate limits, usage parsing; plus the journal and the prompts reader."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import threading
import time

import httpx
import pytest

from prefill_router.collect.journal import Journal
from prefill_router.collect.openai_api import RateLimiter, RetryPolicy, chat_completion, parse_retry_after
from prefill_router.collect.prompts import read_prompts
from prefill_router.errors import ConfigError, DataError
from prefill_router.serve.fake_upstream import Answer, Drop, Fail, FakeUpstream, Raw, Stall
from prefill_router.targets import TargetConfig

MESSAGES = [{"role": "user", "content": "What is 2+2? Reply with a number."}]


def call(up: FakeUpstream, *, retry: RetryPolicy, timeout_s: float = 10.0, api_key_env: str | None = None,
         limiter: RateLimiter | None = None):
    """One chat_completion against `up`, recording every wait instead of sleeping."""
    target = TargetConfig(name="t", base_url=up.base_url, model="upstream-t", timeout_s=timeout_s,
                          api_key_env=api_key_env)
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    async def run():
        async with httpx.AsyncClient() as client:
            return await chat_completion(client, target, MESSAGES, params={"temperature": 0}, retry=retry,
                                         sleep=record_sleep, limiter=limiter, estimated_tokens=10)

    return asyncio.run(run()), waits


def test_success_reads_text_usage_and_sends_model_and_params():
    with FakeUpstream(Answer("4", prompt_tokens=11, completion_tokens=1)) as up:
        result, waits = call(up, retry=RetryPolicy())
        assert result.ok and result.text == "4" and result.attempts == 1 and waits == []
        assert (result.input_tokens, result.output_tokens, result.finish_reason) == (11, 1, "stop")
        body = up.requests[0].body
        assert body["model"] == "upstream-t" and body["messages"] == MESSAGES and body["temperature"] == 0


def test_api_key_from_environment_is_sent(monkeypatch):
    monkeypatch.setenv("COLLECT_TEST_KEY", "sk-test-123")
    with FakeUpstream(Answer("4")) as up:
        result, _ = call(up, retry=RetryPolicy(), api_key_env="COLLECT_TEST_KEY")
        assert result.ok
        headers = {k.lower(): v for k, v in up.requests[0].headers.items()}
        assert headers["authorization"] == "Bearer sk-test-123"


def test_missing_api_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("COLLECT_TEST_MISSING", raising=False)
    with FakeUpstream(Answer("4")) as up, pytest.raises(ConfigError, match="COLLECT_TEST_MISSING"):
        call(up, retry=RetryPolicy(), api_key_env="COLLECT_TEST_MISSING")


def test_429_honours_retry_after():
    with FakeUpstream(Answer("4")) as up:
        up.script(Fail(429, retry_after=7), Fail(429, retry_after=0.5))
        result, waits = call(up, retry=RetryPolicy(backoff_s=100.0))
        assert result.ok and result.attempts == 3 and up.calls() == 3
        assert waits == [7.0, 0.5]  # the server's word, not the (huge) computed backoff


def test_5xx_backs_off_exponentially_with_jitter():
    with FakeUpstream(Answer("4")) as up:
        up.script(Fail(500), Fail(502), Fail(503))
        result, waits = call(up, retry=RetryPolicy(max_attempts=4, backoff_s=0.5, max_backoff_s=1.5))
        assert result.ok and result.attempts == 4
        assert len(waits) == 3
        # base 0.5, 1.0, then 2.0 capped at 1.5; jitter draws from [base/2, base]
        for wait, base in zip(waits, [0.5, 1.0, 1.5]):
            assert base / 2 <= wait <= base


def test_gives_up_after_max_attempts_and_says_why():
    with FakeUpstream(Fail(503, message="overloaded")) as up:
        result, waits = call(up, retry=RetryPolicy(max_attempts=3, backoff_s=0.01))
        assert not result.ok and up.calls() == 3 and len(waits) == 2
        assert "HTTP 503" in result.error and "overloaded" in result.error and "3 attempts" in result.error


def test_client_errors_are_not_retried():
    with FakeUpstream(Fail(400, message="bad model")) as up:
        result, waits = call(up, retry=RetryPolicy(max_attempts=5))
        assert not result.ok and up.calls() == 1 and waits == []
        assert result.error.startswith("HTTP 400") and "bad model" in result.error and result.status == 400


def test_connection_drop_and_timeout_are_retried():
    with FakeUpstream(Answer("4")) as up:
        up.script(Drop(), Stall(2.0))
        result, waits = call(up, retry=RetryPolicy(max_attempts=3, backoff_s=0.01), timeout_s=0.3)
        assert result.ok and result.attempts == 3 and len(waits) == 2


def test_malformed_200_is_a_recorded_failure_not_retried():
    with FakeUpstream(Answer("4")) as up:
        up.script(Raw(200, "<html>gateway</html>"))
        result, _ = call(up, retry=RetryPolicy(max_attempts=3))
        assert not result.ok and "not JSON" in result.error and up.calls() == 1
        up.script(Raw(200, json.dumps({"choices": []}), "application/json"))
        result, _ = call(up, retry=RetryPolicy(max_attempts=3))
        assert not result.ok and "malformed" in result.error


def test_missing_usage_leaves_tokens_unknown():
    with FakeUpstream() as up:
        up.script(Raw(200, json.dumps({"choices": [{"message": {"content": "4"}, "finish_reason": "stop"}]}),
                      "application/json"))
        result, _ = call(up, retry=RetryPolicy())
        assert result.ok and result.text == "4" and result.input_tokens is None and result.output_tokens is None


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_rate_limiter_requests_per_second_with_a_fake_clock():
    now = [0.0]
    limiter = RateLimiter(requests_per_second=2, clock=lambda: now[0])
    # A burst of 2 goes at once; then one every 0.5 s, each reservation queued behind the previous one.
    assert [limiter.reserve(0) for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    now[0] = 10.0  # long idle: the bucket is full again, but never above its capacity
    assert [limiter.reserve(0) for _ in range(3)] == [0.0, 0.0, 0.5]


def test_rate_limiter_tokens_per_minute_and_settling():
    now = [0.0]
    limiter = RateLimiter(tokens_per_minute=600, clock=lambda: now[0])  # 10 tokens per second
    assert limiter.reserve(400) == 0.0
    assert limiter.reserve(400) == pytest.approx(20.0)  # 200 tokens short at 10/s
    limiter.settle(400, 100)  # the second call used only 100: 300 come back
    assert limiter.reserve(100) == 0.0
    assert limiter.reserve(5000) == pytest.approx(60.0)  # larger than the bucket: waits for a full bucket


def test_rate_limit_paces_real_calls():
    now = [0.0]
    limiter = RateLimiter(requests_per_second=1, clock=lambda: now[0])
    with FakeUpstream(Answer("4")) as up:
        _, first = call(up, retry=RetryPolicy(), limiter=limiter)
        _, second = call(up, retry=RetryPolicy(), limiter=limiter)
        assert first == [] and second == [pytest.approx(1.0)]


def test_concurrency_per_target_is_respected(tmp_path):
    from prefill_router.collect.runner import CollectSettings, run_collect

    lock, active, peak = threading.Lock(), [0], [0]

    def slow(body: dict) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return "B"

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": f"q{i}", "answer": "B"}) + "\n"
                                    for i in range(9)))
    with FakeUpstream(Answer(slow)) as up:
        target = TargetConfig(name="t", base_url=up.base_url, max_concurrency=3)
        summary = run_collect(read_prompts(prompts_file), [target], tmp_path / "out.jsonl",
                              CollectSettings(judge="choice", concurrency=1, progress=False))
        assert summary.rows[0]["ok"] == 9 and up.calls() == 9
        assert peak[0] == 3  # the target's max_concurrency wins over the default of 1


# ------------------------------------------------------------------------------------------ journal

def test_journal_appends_and_reloads_last_record_per_pair(tmp_path):
    path = tmp_path / "j.journal"
    with Journal(path) as journal:
        journal.append({"prompt_id": "1", "target": "a", "score": None, "error": "HTTP 500"})
        journal.append({"prompt_id": "1", "target": "b", "score": 1.0, "error": None})
        journal.append({"prompt_id": "1", "target": "a", "score": 0.0, "error": None})
    records = Journal(path).load()
    assert set(records) == {("1", "a"), ("1", "b")}
    assert records[("1", "a")]["score"] == 0.0


def test_journal_cuts_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "j.journal"
    good = json.dumps({"prompt_id": "1", "target": "a", "score": 1.0}) + "\n"
    path.write_text(good + '{"prompt_id": "2", "target": "a", "sco')
    journal = Journal(path)
    assert set(journal.load()) == {("1", "a")}
    assert path.read_text() == good
    journal.append({"prompt_id": "2", "target": "a", "score": 0.0})
    journal.close()
    assert set(Journal(path).load()) == {("1", "a"), ("2", "a")}


def test_group_commit_writes_every_record_even_for_cancelled_writers(tmp_path):
    from prefill_router.collect.journal import GroupCommit

    path = tmp_path / "j.journal"
    journal = Journal(path)

    async def run():
        commit = GroupCommit(journal)
        writers = [asyncio.create_task(commit.append({"prompt_id": str(i), "target": "a", "score": 1.0}))
                   for i in range(50)]
        await asyncio.sleep(0)
        writers[-1].cancel()  # e.g. Ctrl-C while its record is being written
        await asyncio.gather(*writers, return_exceptions=True)
        await commit.drain()

    asyncio.run(run())
    journal.close()
    assert len(path.read_text().splitlines()) == 50
    assert set(Journal(path).load()) == {(str(i), "a") for i in range(50)}


def test_journal_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "j.journal"
    path.write_text('{"prompt_id": "1", "target": "a"}\nnot json\n{"prompt_id": "2", "target": "a"}\n')
    with pytest.raises(DataError, match=r"j.journal, line 2: corrupt"):
        Journal(path).load()


# ------------------------------------------------------------------------------------------ prompts

def test_read_prompts_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"prompt_id": "q1", "prompt": "2+2?", "answer": "4", "category": "math"}) + "\n\n"
        + json.dumps({"id": 7, "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Capital of France?"}],
                      "reference": ["Paris", "paris"]}) + "\n"
        + json.dumps({"prompt": "no id here", "answer": "x"}) + "\n")
    items = read_prompts(jsonl)
    assert [i.prompt_id for i in items[:2]] == ["q1", "7"]
    assert items[0].category == "math" and items[0].messages() == [{"role": "user", "content": "2+2?"}]
    assert items[1].reference == ["Paris", "paris"] and items[1].text() == "Be brief.\nCapital of France?"
    assert items[2].prompt_id.startswith("p") and items[2].prompt_id == read_prompts(jsonl)[2].prompt_id

    packed = tmp_path / "p.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert [i.prompt_id for i in read_prompts(packed)] == [i.prompt_id for i in items]

    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt_id,prompt,answer\nq1,"Pick one:\nA. x\nB. y",B\nq2,Hello,A\n')
    items = read_prompts(csv_file)
    # physical lines: q1's prompt spans lines 2-4
    assert [(i.prompt_id, i.reference, i.line) for i in items] == [("q1", "B", 2), ("q2", "A", 5)]
    assert items[0].prompt == "Pick one:\nA. x\nB. y"


@pytest.mark.parametrize("content,line,field,message", [
    ('{"prompt_id": "1", "prompt": "ok"}\n{"prompt_id": "2", "prompt": ', 2, None, "malformed JSON"),
    ('{"prompt_id": "1", "prompt": "   "}\n', 1, "prompt", "empty prompt"),
    ('{"prompt_id": "1", "answer": "A"}\n', 1, "prompt", "missing"),
    ('{"prompt_id": "1", "messages": [{"role": "robot", "content": "hi"}]}\n', 1, "messages",
     "'robot' is not a chat role"),
    ('{"prompt_id": "1", "messages": []}\n', 1, "messages", "non-empty"),
    ('{"prompt_id": "1", "prompt": "a"}\n{"prompt_id": "1", "prompt": "b"}\n', 2, "prompt_id", "first on line 1"),
    ('["not", "an", "object"]\n', 1, None, "JSON object"),
])
def test_read_prompts_errors_name_file_line_and_field(tmp_path, content, line, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_prompts(path)
    err = info.value
    assert err.file == str(path) and err.line == line and err.field == field and message in str(err)


def test_read_prompts_csv_without_prompt_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nwhat?,A\n")
    with pytest.raises(DataError, match="line 1.*'prompt' or 'messages'"):
        read_prompts(path)


def test_run_applies_default_and_per_target_rate_limits(tmp_path):
    from prefill_router.collect.runner import CollectSettings, collect_async

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": f"q{i}", "answer": "B"}) + "\n"
                                    for i in range(3)))
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)  # no real waiting: the limiter's bookings show in what it asks for

    with FakeUpstream(Answer("B")) as up:
        slow = TargetConfig(name="slow", base_url=up.base_url)  # takes the run's default: one call per 100 s
        fast = TargetConfig(name="fast", base_url=up.base_url, requests_per_second=1000)
        settings = CollectSettings(judge="choice", concurrency=1, requests_per_second=0.01, progress=False,
                                   only=("slow",))
        asyncio.run(collect_async(read_prompts(prompts_file), [slow, fast], tmp_path / "a.jsonl", settings,
                                  sleep=record_sleep))
        assert len(waits) == 2 and 90 < waits[0] < 100 and 190 < waits[1] < 200
        waits.clear()
        settings = CollectSettings(judge="choice", concurrency=1, requests_per_second=0.01, progress=False,
                                   only=("fast",))
        asyncio.run(collect_async(read_prompts(prompts_file), [slow, fast], tmp_path / "b.jsonl", settings,
                                  sleep=record_sleep))
        assert waits == []  # the target's own limit (1000/s, burst 1000) wins over the default
        assert up.calls() == 6
