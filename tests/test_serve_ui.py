"""The dashboard at /ui in a real headless browser (Debian's chromium driven by selenium through chromedriver),
against a gateway on 127.0.0.1 with a tiny router trained here and fake upstreams.

Skipped, with the reason, only where chromium, chromedriver or selenium cannot be found (`.ci/run` installs
them). Set PREFILL_ROUTER_SCREENSHOT=<path> to also save the screenshot there (how the README's was made).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from gateway_helpers import TARGETS, running_upstreams, train_tiny_router, upstream_targets

from prefill_router.router import Router
from prefill_router.serve.app import create_app
from prefill_router.serve.config import parse_gateway_config
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.fake_upstream import Answer
from prefill_router.serve.server import BackgroundServer
from prefill_router.serve.ui import STATIC

PROMPT = "question 7: what is 7 + 21? fox fox"
ANSWER = "Seven plus twenty-one is twenty-eight, so the answer is 28."


def test_dashboard_loads_nothing_from_outside_the_gateway():
    files = list(STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "style.css"}
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), f.name
        assert not re.search(r"""(url\(|fetch\(|import\s).{0,3}(https?:)?//""", text), f.name


def browser(tmp_path: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: selenium's own driver manager would try to download one.
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


@pytest.mark.slow
def test_dashboard_routes_streams_and_takes_feedback_in_a_real_browser(tiny_encoder_dir, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from prefill_router.features import load_encoder

    driver = browser(tmp_path)
    encoder = load_encoder(str(tiny_encoder_dir))
    router = Router.load(train_tiny_router(encoder, tmp_path / "router"), encoder=encoder)
    expected = router.route([{"role": "user", "content": PROMPT}])
    try:
        with running_upstreams(TARGETS) as ups:
            for up in ups.values():
                up.default = Answer(ANSWER, chunk_delay_s=0.02)
            config = parse_gateway_config({"router": {"checkpoint": None, "quantize": None},
                                           "targets": upstream_targets(ups),
                                           "auth": {"keys": ["client-key"]}, "admin": {"keys": ["ui-key"]},
                                           "feedback": {"dir": str(tmp_path / "fb")}})
            with BackgroundServer(create_app(config, RouterScorer(router))) as server, \
                    httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Bearer ui-key"}) as api:
                # the operator's view (an admin key): every key's traffic
                for i in range(3):  # some traffic for the live figures, one of it pinned to a target
                    model = "small" if i == 2 else "router"
                    api.post("/v1/chat/completions", json={"model": model, "messages": [
                        {"role": "user", "content": f"warm-up question {i}"}]}).raise_for_status()
                # the tables are redrawn every 2 s when their figures change: look an element up again then
                wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
                driver.get(f"{server.url}/ui")
                page = httpx.get(f"{server.url}/ui/")
                assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
                assert page.headers["x-frame-options"] == "DENY"
                driver.find_element(By.ID, "key").send_keys("ui-key")
                driver.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
                driver.find_element(By.ID, "prompt").send_keys(PROMPT)
                driver.find_element(By.ID, "send").click()
                wait.until(lambda d: d.find_element(By.ID, "answer-state").text in ("done", "failed"))
                assert driver.find_element(By.ID, "error").text == ""
                assert driver.find_element(By.ID, "answer-state").text == "done"

                # the decision for this prompt, as the router makes it
                assert driver.find_element(By.ID, "chosen").text == expected.target
                rows = driver.find_elements(By.CSS_SELECTOR, "#probabilities tbody tr")
                assert [r.get_attribute("data-target") for r in rows] == TARGETS
                for row in rows:
                    target = row.get_attribute("data-target")
                    shown = float(row.find_element(By.CSS_SELECTOR, ".p").text)
                    assert shown == pytest.approx(expected.probabilities[target], abs=5e-4)
                    assert row.find_element(By.CSS_SELECTOR, ".cost").text.startswith("$")
                assert driver.find_element(By.CSS_SELECTOR, "#probabilities tr.chosen").get_attribute(
                    "data-target") == expected.target
                # the answer arrived as a stream, chunk by chunk
                answer = driver.find_element(By.ID, "answer")
                assert answer.text == ANSWER and int(answer.get_attribute("data-chunks")) == len(ANSWER.split())
                assert driver.find_element(By.ID, "answered-by").text == expected.target

                # feedback from the playground reaches the journal and the recent decisions
                driver.find_element(By.ID, "good").click()
                wait.until(lambda d: d.find_element(By.ID, "feedback-state").text.startswith("recorded"))
                latest = api.get("/v1/decisions").json()["data"][0]
                assert latest["feedback"] == {"score": 1.0, "target": expected.target}
                wait.until(lambda d: d.find_element(
                    By.CSS_SELECTOR, f"#decisions tr[data-id='{latest['id']}'] .feedback-cell").text == "score 1")
                # ... and from a button of the recent decisions
                older = api.get("/v1/decisions").json()["data"][-1]
                button = f"#decisions tr[data-id='{older['id']}'] button.score-0"
                wait.until(lambda d: d.find_element(By.CSS_SELECTOR, button).click() or True)
                wait.until(lambda d: d.find_element(
                    By.CSS_SELECTOR, f"#decisions tr[data-id='{older['id']}'] .feedback-cell").text == "score 0")

                # the live figures are the gateway's
                stats = api.get("/v1/stats").json()
                wait.until(lambda d: d.find_element(By.ID, "status").text == f"live: {stats['requests']} requests "
                                                                              "answered")
                for target, t in stats["targets"].items():
                    bar = driver.find_element(By.CSS_SELECTOR, f"#share .bar[data-target='{target}'] .pct")
                    assert bar.text == f"{100 * t['share']:.0f}%"
                    usd = driver.find_element(By.CSS_SELECTOR, f"#spend tr[data-target='{target}'] .usd").text
                    assert float(usd.lstrip("$")) == pytest.approx(t["usd"], abs=1e-6)
                assert f"always {stats['best_target']}" in driver.find_element(By.ID, "savings").text

                shot = tmp_path / "dashboard.png"
                assert driver.save_screenshot(str(shot))
                data = shot.read_bytes()
                assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
                if os.environ.get("PREFILL_ROUTER_SCREENSHOT"):
                    shutil.copy(shot, os.environ["PREFILL_ROUTER_SCREENSHOT"])
                # no script error, and no failed request but the 401s of the calls made before the key was typed
                errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                          and not (e["source"] == "network" and "401" in e["message"])]
                assert not errors, errors
    finally:
        driver.quit()
