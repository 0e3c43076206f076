"""End to end on 127.0.0.1: three fake OpenAI-compatible targets answer a multiple-choice set with known
patterns of right and wrong answers, transient 429s and permanent errors; `prefill-router collect` must
produce exactly the expected labels and costs, never repeat a paid call on rerun or after being killed,
and its output must train a router."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from prefill_router.cli import main
from prefill_router.collect.journal import journal_path
from prefill_router.data.readers import read_routing_data
from prefill_router.serve.fake_upstream import Answer, Fail, FakeUpstream

REPO = Path(__file__).resolve().parents[1]
LETTERS = "ABCD"
PRICES = {"strong": (10.0, 30.0), "mid": (1.0, 2.0), "cheap": (0.1, 0.1)}  # USD per M input, output tokens


def question(i: int) -> dict:
    qid = f"q{i:02d}"
    options = "\n".join(f"{letter}. option {letter.lower()} of question {i}" for letter in LETTERS)
    return {"prompt_id": qid, "prompt": f"[{qid}] Which option is right for question {i}?\n{options}",
            "answer": LETTERS[i % 4], "category": "even" if i % 2 == 0 else "odd"}


def qid_of(body: dict) -> str:
    return re.search(r"\[(q\d+)\]", body["messages"][-1]["content"]).group(1)


def reference(qid: str) -> str:
    return LETTERS[int(qid[1:]) % 4]


def wrong(letter: str) -> str:
    return LETTERS[(LETTERS.index(letter) + 1) % 4]


# Each target's behaviour, as a function of the question: the labels the test expects follow from these.
def strong_reply(body: dict) -> str:
    qid = qid_of(body)
    if qid == "q07":
        return "I am not sure about this one."  # no letter: judged wrong (0), not a failure
    letter = wrong(reference(qid)) if qid == "q03" else reference(qid)
    return f"Let me think step by step. The answer is ({letter})."


def mid_reply(body: dict) -> str:
    qid = qid_of(body)
    return f"{reference(qid) if int(qid[1:]) % 2 == 0 else wrong(reference(qid))}."


def cheap_reply(body: dict) -> str:
    return "**A**"


REPLIES = {"strong": strong_reply, "mid": mid_reply, "cheap": cheap_reply}


def expected_score(target: str, qid: str) -> float:
    """The label a human grader gives each target's reply pattern above."""
    i = int(qid[1:])
    if target == "strong":
        return 0.0 if qid in ("q03", "q07") else 1.0
    if target == "mid":
        return 1.0 if i % 2 == 0 else 0.0
    return 1.0 if reference(qid) == "A" else 0.0


def expected_cost(target: str, q: dict) -> float:
    # The fake upstream reports prompt_tokens = characters // 4 and completion_tokens = words of the reply.
    body = {"messages": [{"role": "user", "content": q["prompt"]}]}
    prompt_tokens = len(q["prompt"]) // 4
    completion_tokens = len(REPLIES[target](body).split())
    pin, pout = PRICES[target]
    return (prompt_tokens * pin + completion_tokens * pout) / 1e6


def write_inputs(folder: Path, ups: dict[str, FakeUpstream], n: int, *, concurrency: dict | None = None) -> tuple:
    questions = [question(i) for i in range(n)]
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in questions))
    lines = ["targets:"]
    for name, up in ups.items():
        pin, pout = PRICES[name]
        lines += [f"  - name: {name}", f"    base_url: {up.base_url}", f"    model: upstream-{name}",
                  f"    usd_per_m_input: {pin}", f"    usd_per_m_output: {pout}", "    timeout_s: 10"]
        if concurrency and name in concurrency:
            lines.append(f"    max_concurrency: {concurrency[name]}")
    targets = folder / "targets.yaml"
    targets.write_text("\n".join(lines) + "\n")
    return questions, prompts, targets


def calls_per_question(up: FakeUpstream) -> Counter:
    # A request cut off by the kill before its body arrived (body None) was never processed, so never paid.
    return Counter(qid_of(r.body) for r in up.requests
                   if r.path.endswith("/chat/completions") and isinstance(r.body, dict))


@pytest.fixture
def upstreams():
    ups = {name: FakeUpstream(Answer(fn), name=name).start() for name, fn in REPLIES.items()}
    yield ups
    for up in ups.values():
        up.stop()


FAILED = {("q05", "cheap"), ("q09", "cheap")}


@dataclass
class FirstRun:
    """A collect run over 12 questions with scripted failures, as the tests below find it."""

    args: list[str]
    out: Path
    questions: list[dict]
    upstreams: dict[str, FakeUpstream]
    stderr: str


@pytest.fixture
def first_run(tmp_path, upstreams, capsys) -> FirstRun:
    """mid's first two requests are rate limited (retried; labels unaffected); cheap runs one request at a
    time, in prompt order, and fails q05 on every try and refuses q09 outright."""
    questions, prompts, targets = write_inputs(tmp_path, upstreams, 12, concurrency={"mid": 2, "cheap": 1})
    out = tmp_path / "run" / "labels.jsonl"
    upstreams["mid"].script(Fail(429, retry_after=0), Fail(429, retry_after=0))
    cheap = Answer(cheap_reply)
    upstreams["cheap"].script(*[cheap] * 5, Fail(500), Fail(500), Fail(500), *[cheap] * 3,
                              Fail(400, message="unsupported parameter"))
    args = ["collect", "--prompts", str(prompts), "--targets", str(targets), "--judge", "choice", "--out", str(out),
            "--letters", "ABCD", "--max-attempts", "3", "--backoff", "0.001", "--max-tokens", "64", "--no-progress"]
    assert main(args) == 0
    return FirstRun(args, out, questions, upstreams, capsys.readouterr().err)


def test_collect_retries_and_reports_the_failed_pairs(first_run):
    assert "2 pair(s) failed" in first_run.stderr and "--retry-failed" in first_run.stderr
    # Server side: one call per pair, plus the retries of two 429s and two extra tries of q05.
    ups = first_run.upstreams
    assert ups["strong"].calls() == 12
    assert ups["mid"].calls() == 14
    assert ups["cheap"].calls() == 14 and calls_per_question(ups["cheap"])["q05"] == 3
    assert all(r.body["max_tokens"] == 64 and r.body["temperature"] == 0 for r in ups["mid"].requests)


def test_collect_dataset_has_exact_labels_and_nan_where_a_call_failed(first_run):
    # The dataset is what `train` reads: exact labels, NaN (missing, not 0) where the call failed.
    ds = read_routing_data(first_run.out)
    questions = first_run.questions
    assert ds.targets == ["strong", "mid", "cheap"]
    assert ds.prompt_ids == [q["prompt_id"] for q in questions]
    assert ds.prompts == [q["prompt"] for q in questions]
    for i, q in enumerate(questions):
        for k, target in enumerate(ds.targets):
            if (q["prompt_id"], target) in FAILED:
                assert math.isnan(ds.Y[i, k]) and math.isnan(ds.C[i, k])
            else:
                assert ds.Y[i, k] == expected_score(target, q["prompt_id"]), (q["prompt_id"], target)
                assert ds.C[i, k] == pytest.approx(expected_cost(target, q), rel=1e-9)
    assert ds.Y[:, 0].tolist().count(1.0) == 10  # strong: all but q03 (wrong letter) and q07 (no letter)
    assert np.nansum(ds.Y[:, 1]) == 6  # mid: the even questions
    assert np.nansum(ds.Y[:, 2]) == 3  # cheap: q00, q04, q08 (answer A); q05/q09 failed, not wrong

    rows = [json.loads(line) for line in first_run.out.read_text().splitlines()]
    assert len(rows) == 34
    assert {"answer", "latency_s", "error", "input_tokens", "output_tokens", "cost"} <= set(rows[0])
    assert rows[0]["answer"] == "Let me think step by step. The answer is (A)." and rows[0]["latency_s"] > 0


def test_collect_keeps_failures_with_their_reason_outside_the_dataset(first_run):
    failures = first_run.out.parent / "labels.failures.jsonl"
    reasons = {(f["prompt_id"], f["target"]): f["error"]
               for f in (json.loads(line) for line in failures.read_text().splitlines())}
    assert set(reasons) == FAILED
    assert "HTTP 500" in reasons[("q05", "cheap")] and "3 attempts" in reasons[("q05", "cheap")]
    assert reasons[("q09", "cheap")].startswith("HTTP 400") and "unsupported parameter" in reasons[("q09", "cheap")]


def test_plain_rerun_repeats_nothing(first_run):
    # finished pairs and kept failures alike
    before = {name: up.calls() for name, up in first_run.upstreams.items()}
    dataset_before = first_run.out.read_text()
    assert main(first_run.args) == 0
    assert {name: up.calls() for name, up in first_run.upstreams.items()} == before
    assert first_run.out.read_text() == dataset_before


def test_dry_run_with_retry_failed_counts_exactly_the_failed_pairs(first_run, capsys):
    before = {name: up.calls() for name, up in first_run.upstreams.items()}
    assert main(first_run.args + ["--retry-failed", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^cheap\s+2\s", table, re.MULTILINE) and re.search(r"^strong\s+0\s", table, re.MULTILINE)
    assert "mean prompt length" in table
    assert {name: up.calls() for name, up in first_run.upstreams.items()} == before


def test_retry_failed_resends_only_the_failures(first_run):
    ups = first_run.upstreams
    before = {name: up.calls() for name, up in ups.items()}
    assert main(first_run.args + ["--retry-failed"]) == 0  # the cheap server's script is spent: it now answers
    assert ups["cheap"].calls() == before["cheap"] + 2
    assert ups["strong"].calls() == before["strong"] and ups["mid"].calls() == before["mid"]
    ds = read_routing_data(first_run.out)
    assert not np.isnan(ds.Y).any() and ds.Y[5, 2] == 0.0 and ds.Y[9, 2] == 0.0  # q05, q09: ref B, answer A
    assert not (first_run.out.parent / "labels.failures.jsonl").exists()


def test_changing_the_judge_rescores_stored_answers_without_calling_again(tmp_path, upstreams):
    _, prompts, targets = write_inputs(tmp_path, {"mid": upstreams["mid"]}, 4)
    out = tmp_path / "labels.jsonl"
    base = ["collect", "--prompts", str(prompts), "--targets", str(targets), "--out", str(out), "--no-progress"]
    assert main(base + ["--judge", "choice"]) == 0
    assert upstreams["mid"].calls() == 4
    # "contains" against the letter reference reads the same stored replies ("A.", "C.", ...).
    assert main(base + ["--judge", "contains"]) == 0
    assert upstreams["mid"].calls() == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["judge"] for r in rows} == {"contains"}
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0]


def test_prompt_text_changed_under_the_same_id_is_refused(tmp_path, upstreams, capsys):
    questions, prompts, targets = write_inputs(tmp_path, {"mid": upstreams["mid"]}, 2)
    out = tmp_path / "labels.jsonl"
    args = ["collect", "--prompts", str(prompts), "--targets", str(targets), "--judge", "choice", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    edited = [dict(q, prompt=q["prompt"] + " (edited)") if q["prompt_id"] == "q01" else q for q in questions]
    prompts.write_text("".join(json.dumps(q) + "\n" for q in edited))
    assert main(args) == 2
    assert "'q01' was labelled for a different prompt text" in capsys.readouterr().err


def test_bad_arguments_name_the_problem(tmp_path, upstreams, capsys):
    _, prompts, targets = write_inputs(tmp_path, {"mid": upstreams["mid"]}, 2)
    base = ["collect", "--prompts", str(prompts), "--targets", str(targets), "--out", str(tmp_path / "o.jsonl")]
    assert main(base + ["--judge", "choice", "--only", "nope"]) == 2
    assert "--only: unknown target(s) ['nope']" in capsys.readouterr().err
    assert main(base + ["--judge", "llm"]) == 2
    assert "--judge-config" in capsys.readouterr().err
    no_ref = tmp_path / "noref.jsonl"
    no_ref.write_text(json.dumps({"prompt_id": "1", "prompt": "hi"}) + "\n")
    assert main(["collect", "--prompts", str(no_ref), "--targets", str(targets), "--judge", "numeric",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "noref.jsonl, line 1, field 'answer'" in err and "needs a reference" in err
    assert upstreams["mid"].calls() == 0  # nothing was paid for


def _stop_after(cmd: list[str], env: dict, journal: Path, lines: int, sig: int) -> subprocess.CompletedProcess:
    """Run the CLI and send `sig` once the journal holds `lines` records."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before it could be stopped: {proc.communicate()}"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _journaled(journal: Path) -> set[tuple[str, str]]:
    return {(r["prompt_id"], r["target"]) for r in map(json.loads, journal.read_text().splitlines())}


def test_interrupted_and_killed_runs_resume_without_repeating_calls(tmp_path):
    """Ctrl-C, then SIGKILL, the CLI mid-run; no rerun may call a pair the journal recorded again."""
    ups = {name: FakeUpstream(Answer(fn, delay_s=0.08), name=name).start() for name, fn in REPLIES.items()}
    try:
        questions, prompts, targets = write_inputs(tmp_path, ups, 16, concurrency={n: 1 for n in ups})
        out = tmp_path / "labels.jsonl"
        cmd = [sys.executable, "-m", "prefill_router", "collect", "--prompts", str(prompts), "--targets",
               str(targets), "--judge", "choice", "--out", str(out), "--no-progress"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        journal = journal_path(out)

        # Ctrl-C: a clean stop that says how to resume; the dataset holds exactly what finished.
        stopped = _stop_after(cmd, env, journal, 6, signal.SIGINT)
        assert stopped.returncode == 130 and "run the same command again to resume" in stopped.stderr
        after_interrupt = _journaled(journal)
        assert 6 <= len(after_interrupt) < 48
        assert {(r["prompt_id"], r["target"]) for r in map(json.loads, out.read_text().splitlines())} \
            == after_interrupt

        # SIGKILL: no chance to clean up; the journal alone must be enough.
        killed = _stop_after(cmd, env, journal, len(after_interrupt) + 6, signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL
        after_kill = _journaled(journal)
        assert after_interrupt < after_kill and len(after_kill) < 48
        calls_at_kill = {name: calls_per_question(up) for name, up in ups.items()}

        done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

        after = {name: calls_per_question(up) for name, up in ups.items()}
        for qid, target in after_kill:  # journaled pairs are never sent again
            assert after[target][qid] == calls_at_kill[target][qid], (qid, target)
        for qid, target in after_interrupt:
            assert after[target][qid] == 1, (qid, target)
        # Every pair is called; only calls in flight at a stop (at most one per target per stop, as each
        # target runs one request at a time) may have been sent twice.
        assert all(after[t][q["prompt_id"]] >= 1 for t in ups for q in questions)
        repeated = sum(count - 1 for counts in after.values() for count in counts.values())
        assert repeated <= 2 * len(ups)

        ds = read_routing_data(out)
        assert ds.Y.shape == (16, 3) and not np.isnan(ds.Y).any()
        for i, q in enumerate(questions):
            assert [ds.Y[i, k] for k in range(3)] == [expected_score(t, q["prompt_id"]) for t in ds.targets]
    finally:
        for up in ups.values():
            up.stop()


def test_llm_judge_failures_are_missing_and_rejudged_without_new_target_calls(tmp_path, upstreams, capsys):
    def grade(body: dict) -> str:
        user = body["messages"][-1]["content"]
        ref = user.split("Reference answer:\n")[1].split("\n\n")[0]
        candidate = user.split("Candidate answer:\n")[1]
        if "[q02]" in user:
            return "Looks plausible to me."  # no score: recorded as a judge failure, never guessed
        return "SCORE: 1" if candidate.strip(" .") == ref else "SCORE: 0"

    with FakeUpstream(Answer(grade), name="judge") as judge:
        questions, prompts, targets = write_inputs(tmp_path, {"mid": upstreams["mid"]}, 4)
        judge_file = tmp_path / "judge.yaml"
        judge_file.write_text(f"judge:\n  name: grader\n  base_url: {judge.base_url}\n  model: judge-model\n"
                              f"rubric: Grade strictly.\nmax_tokens: 16\n")
        out = tmp_path / "labels.jsonl"
        args = ["collect", "--prompts", str(prompts), "--targets", str(targets), "--judge", "llm",
                "--judge-config", str(judge_file), "--out", str(out), "--no-progress"]
        assert main(args) == 0
        assert "1 pair(s) failed" in capsys.readouterr().err
        assert upstreams["mid"].calls() == 4 and judge.calls() == 4
        assert judge.requests[0].body["messages"][0] == {"role": "system", "content": "Grade strictly."}
        ds = read_routing_data(out)
        assert ds.prompt_ids == ["q00", "q01", "q03"]  # q02 has no label from any target: absent
        assert ds.Y[:, 0].tolist() == [1.0, 0.0, 0.0]
        failure = json.loads((tmp_path / "labels.failures.jsonl").read_text())
        assert failure["prompt_id"] == "q02" and failure["error"] is None and failure["answer"] == "C."
        assert "judge reply unreadable" in failure["judge_error"]

        judge.default = Answer("SCORE: 1")
        assert main(args + ["--retry-failed"]) == 0
        assert upstreams["mid"].calls() == 4 and judge.calls() == 5  # only the judge was asked again
        ds = read_routing_data(out)
        assert ds.prompt_ids == [q["prompt_id"] for q in questions] and ds.Y[2, 0] == 1.0


def test_dry_run_counts_pending_calls_and_prices_them(tmp_path, upstreams):
    from prefill_router.collect import CollectSettings, dry_run, read_prompts
    from prefill_router.data.tokens import count_tokens
    from prefill_router.targets import load_targets

    questions, prompts, targets_file = write_inputs(tmp_path, upstreams, 5)
    items, targets = read_prompts(prompts), load_targets(targets_file)
    out = tmp_path / "labels.jsonl"
    settings = CollectSettings(judge="choice", max_tokens=100)
    tokens = count_tokens([q["prompt"] for q in questions])
    estimate = dry_run(items, targets, out, settings)
    assert estimate.total_calls == 15 and estimate.assumed_output_tokens == 100
    assert estimate.mean_prompt_tokens == pytest.approx(tokens.mean())
    for row in estimate.rows:
        pin, pout = PRICES[row["target"]]
        assert row["est_cost_usd"] == pytest.approx((tokens.sum() * pin + 5 * 100 * pout) / 1e6)
    assert all(up.calls() == 0 for up in upstreams.values())

    # Pairs already in the journal are not counted again.
    assert main(["collect", "--prompts", str(prompts), "--targets", str(targets_file), "--judge", "choice",
                 "--out", str(out), "--only", "cheap", "--no-progress"]) == 0
    estimate = dry_run(items, targets, out, settings, assumed_output_tokens=10)
    assert [r["calls"] for r in estimate.rows] == [5, 5, 0] and estimate.rows[2]["est_cost_usd"] == 0.0


def test_collected_dataset_trains_a_router(tmp_path, upstreams, tiny_encoder_dir, monkeypatch):
    """collect -> `prefill-router extract` -> `prefill-router train` -> Router.load -> route."""
    from prefill_router.features.encoder import load_encoder
    from prefill_router.router import Router

    questions, prompts, targets = write_inputs(tmp_path, upstreams, 24)
    out = tmp_path / "labels.jsonl"
    assert main(["collect", "--prompts", str(prompts), "--targets", str(targets), "--judge", "choice",
                 "--out", str(out), "--no-progress"]) == 0
    ds = read_routing_data(out)
    assert ds.Y.shape == (24, 3) and not np.isnan(ds.C).any()

    store, checkpoint = tmp_path / "features", tmp_path / "router"
    assert main(["extract", "--data", str(out), "--encoder", str(tiny_encoder_dir), "--poolings", "mean",
                 "--threads", "1", "--no-progress", "--out", str(store)]) == 0
    assert main(["train", "--dataset", str(out), "--features", str(store), "--pca", "4", "--seeds", "2",
                 "--keep", "1", "--policy", "argmax", "--calibration-folds", "0", "--threads", "1",
                 "--out", str(checkpoint)]) == 0

    router = Router.load(checkpoint, encoder=load_encoder(str(tiny_encoder_dir)))
    decision = router.route(questions[0]["prompt"])
    assert router.targets == ["strong", "mid", "cheap"] and decision.target in router.targets
    assert set(decision.probabilities) == set(router.targets)

    # Without an encoder passed in, the checkpoint loads the one the store was extracted with, from any
    # working directory (the store recorded the local encoder folder as an absolute path).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = Router.load(checkpoint).route(questions[0]["prompt"])
    assert again.probabilities == pytest.approx(decision.probabilities)


def test_only_calls_some_targets_but_the_dataset_keeps_all_labels(tmp_path, upstreams):
    _, prompts, targets = write_inputs(tmp_path, upstreams, 3)
    out = tmp_path / "labels.jsonl"
    base = ["collect", "--prompts", str(prompts), "--targets", str(targets), "--judge", "choice", "--out", str(out),
            "--no-progress", "--only"]
    assert main(base + ["cheap"]) == 0
    assert read_routing_data(out).targets == ["cheap"]
    assert main(base + ["strong"]) == 0
    ds = read_routing_data(out)
    assert ds.targets == ["strong", "cheap"] and ds.Y.shape == (3, 2)  # targets-file order
    assert [up.calls() for up in upstreams.values()] == [3, 0, 3]


def test_gateway_config_doubles_as_targets_file_and_bad_fields_are_named(tmp_path, upstreams, capsys):
    _, prompts, _ = write_inputs(tmp_path, {"mid": upstreams["mid"]}, 2)
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(f"""router:
  checkpoint: runs/router
targets:
  - name: mid
    base_url: {upstreams["mid"].base_url}
    usd_per_m_input: 1
    usd_per_m_output: 2
    fallbacks: [other]
    max_concurrency: 1
  - name: other
    base_url: {upstreams["cheap"].base_url}
batching: {{max_batch_size: 8, max_wait_ms: 2}}
""")
    out = tmp_path / "labels.jsonl"
    assert main(["collect", "--prompts", str(prompts), "--targets", str(gateway), "--judge", "choice",
                 "--out", str(out), "--no-progress"]) == 0
    assert read_routing_data(out).targets == ["mid", "other"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"targets:\n  - name: mid\n    base_url: {upstreams['mid'].base_url}\n    max_concurrency: 0\n")
    assert main(["collect", "--prompts", str(prompts), "--targets", str(bad), "--judge", "choice",
                 "--out", str(out)]) == 2
    assert "targets.0.max_concurrency" in capsys.readouterr().err


def test_a_set_stop_flag_ends_the_run_after_the_calls_in_flight(tmp_path):
    """The flag behind Ctrl-C: once set, no worker takes a new pair, so a stop holds even if the task's
    cancellation were swallowed on its way up; what finished is journaled and in the dataset."""
    import asyncio

    from prefill_router.collect.prompts import read_prompts
    from prefill_router.collect.runner import CollectSettings, collect_async
    from prefill_router.targets import load_targets

    ups = {name: FakeUpstream(Answer(fn, delay_s=0.05), name=name).start() for name, fn in REPLIES.items()}
    try:
        _, prompts, targets = write_inputs(tmp_path, ups, 12, concurrency={n: 1 for n in ups})
        out = tmp_path / "labels.jsonl"

        async def run() -> None:
            stop = asyncio.Event()
            seen = []

            def on_record(record):
                seen.append(record)
                if len(seen) == 4:
                    stop.set()

            await collect_async(read_prompts(prompts), load_targets(targets), out,
                                CollectSettings(judge="choice", progress=False), on_record=on_record, stop=stop)

        asyncio.run(run())
        journaled = _journaled(journal_path(out))
        # The 4th record sets the flag; each target (one call at a time) may finish the call it had in flight.
        assert 4 <= len(journaled) <= 4 + len(ups) < 36
        assert sum(len(calls_per_question(up)) for up in ups.values()) == len(journaled)
        assert {(r["prompt_id"], r["target"]) for r in map(json.loads, out.read_text().splitlines())} == journaled
    finally:
        for up in ups.values():
            up.stop()
