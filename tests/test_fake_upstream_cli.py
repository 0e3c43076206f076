"""`prefill-router fake-upstream --fail-model`: the stand-in upstream a new user tries the gateway with can fail
on purpose, so retries and fallbacks show. Run as a user runs it: a real process on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys

import httpx


def test_a_failing_model_answers_503_and_the_others_answer():
    proc = subprocess.Popen([sys.executable, "-m", "prefill_router", "fake-upstream", "--port", "0",
                             "--fail-model", "broken"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        base_url = line.split(" on ", 1)[1].split(" ", 1)[0]
        body = {"messages": [{"role": "user", "content": "hi"}]}
        failed = httpx.post(f"{base_url}/chat/completions", json={**body, "model": "broken"}, timeout=10)
        answered = httpx.post(f"{base_url}/chat/completions", json={**body, "model": "fine"}, timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)
    assert failed.status_code == 503 and "broken" in failed.text
    assert answered.status_code == 200 and "model fine" in answered.json()["choices"][0]["message"]["content"]
