"""`prefill-router data import`: small samples written in RouterBench's, LLMRouter's and RouteLLM's published
layouts round-trip into the documented layout (same prompts, labels and costs)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from prefill_router.cli import main
from prefill_router.data import read_routing_data
from prefill_router.data.importers import import_outcomes
from prefill_router.errors import DataError

PROMPTS = ["Please answer with the letter.\nWhich is a prime?\nA) 4\nB) 7", "What is 12 * 3? Answer:",
           'Say "hi", then stop.']
MODELS = ["gpt-4-1106-preview", "mistralai/mixtral-8x7b-chat"]
SCORES = np.array([[1.0, 0.0], [1.0, 1.0], [0.5, np.nan]])  # a graded score, and a model not run
COSTS = np.array([[7.4e-4, 6.1e-5], [3.1e-4, 2.2e-5], [2.9e-4, np.nan]])
GROUPS = ["mmlu-math", "gsm8k", "mtbench"]


def routerbench_frame() -> pd.DataFrame:
    rows = []
    for i, prompt in enumerate(PROMPTS):
        row = {"sample_id": f"s.{i}", "prompt": repr([prompt]), "eval_name": GROUPS[i]}
        for k, model in enumerate(MODELS):
            row[model] = SCORES[i, k]
            row[f"{model}|model_response"] = repr(["B"])
            row[f"{model}|total_cost"] = COSTS[i, k]
        row["oracle_model_to_route_to"] = MODELS[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _by_prompt(ds, prompts):
    """Rows of `ds` in the order of `prompts`, and its columns in the order of MODELS."""
    rows = [ds.prompts.index(p) for p in prompts]
    cols = [ds.targets.index(m) for m in MODELS]
    return rows, cols


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_routerbench_round_trips(tmp_path, capsys, suffix):
    source = tmp_path / f"routerbench{suffix}"
    frame = routerbench_frame()
    if suffix == ".csv":
        frame.to_csv(source, index=False)
    elif suffix == ".jsonl":
        frame.to_json(source, orient="records", lines=True)
    else:
        frame.to_parquet(source, index=False)
    out = tmp_path / "imported.csv"
    assert main(["data", "import", "--from", "routerbench", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imported 3 prompts x 2 targets" in printed
    assert "sample_id -> prompt_id" in printed and "|total_cost -> cost" in printed
    assert "not carried: <model>|model_response, oracle_model_to_route_to" in printed

    ds = read_routing_data(out)
    rows, cols = _by_prompt(ds, PROMPTS)  # the list-of-parts repr is back to the prompt text
    np.testing.assert_array_equal(ds.Y[np.ix_(rows, cols)], SCORES)
    np.testing.assert_allclose(ds.C[np.ix_(rows, cols)], COSTS)
    assert [ds.prompt_ids[r] for r in rows] == ["s.0", "s.1", "s.2"]
    assert [ds.groups[r] for r in rows] == GROUPS


def test_llmrouter_round_trips_with_prices_and_its_split(tmp_path, capsys):
    llm = {"gpt-4-1106-preview": {"size": "?", "feature": "big", "input_price": 10.0, "output_price": 30.0,
                                  "model": "openai/gpt-4", "service": "OpenAI"},
           "mistralai/mixtral-8x7b-chat": {"size": "47B", "feature": "moe", "input_price": 0.6,
                                           "output_price": 0.6, "model": "mixtral", "service": "NVIDIA"}}
    (tmp_path / "default_llm.json").write_text(json.dumps(llm))
    tokens = {}
    files = {"train": tmp_path / "default_routing_train_data.jsonl",
             "test": tmp_path / "default_routing_test_data.jsonl"}
    lines = {"train": [], "test": []}
    for i, prompt in enumerate(PROMPTS):
        split = "test" if i == 2 else "train"
        for k, model in enumerate(MODELS):
            if np.isnan(SCORES[i, k]):
                continue
            tokens[i, k] = (40 + 10 * i, 5 + k)
            lines[split].append({"task_name": GROUPS[i], "query": prompt, "ground_truth": "B", "metric": "em_mc",
                                 "choices": None, "task_id": None, "model_name": model, "response": "B",
                                 "token_num": sum(tokens[i, k]), "input_tokens": tokens[i, k][0],
                                 "output_tokens": tokens[i, k][1], "response_time": 1.5, "api_key_used": "",
                                 "performance": SCORES[i, k], "embedding_id": i, "user_id": None, "fig_id": None})
    for split, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in lines[split]))
    out = tmp_path / "imported.jsonl"
    assert main(["data", "import", "--from", "llmrouter", str(files["train"]), str(files["test"]), "--llm-data",
                 str(tmp_path / "default_llm.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "query -> prompt" in printed and "performance -> score" in printed and "--split-col split" in printed

    ds = read_routing_data(out, split_col="split")
    rows, cols = _by_prompt(ds, PROMPTS)
    np.testing.assert_array_equal(ds.Y[np.ix_(rows, cols)], SCORES)
    prices = {m: (llm[m]["input_price"], llm[m]["output_price"]) for m in MODELS}
    for (i, k), (t_in, t_out) in tokens.items():
        expected = (t_in * prices[MODELS[k]][0] + t_out * prices[MODELS[k]][1]) / 1e6
        assert ds.C[rows[i], cols[k]] == pytest.approx(expected)
    assert [ds.splits[r] for r in rows] == ["train", "train", "test"]
    assert [ds.groups[r] for r in rows] == GROUPS


def test_routellm_round_trips_with_the_subject_from_the_file_name(tmp_path, capsys):
    paths = []
    for subject, chunk in (("anatomy", slice(0, 2)), ("virology", slice(2, 3))):
        frame = pd.DataFrame({"prompt": PROMPTS[chunk]})
        for k, model in enumerate(MODELS):
            frame[model] = [None if np.isnan(s) else bool(s >= 0.5) for s in SCORES[chunk, k]]
        path = tmp_path / f"mmlu_{subject}.csv"
        frame.to_csv(path, index=False)
        paths.append(str(path))
    out = tmp_path / "imported.parquet"
    assert main(["data", "import", "--from", "routellm", *paths, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no costs" in printed and "left out 1 (prompt, model) pair(s) with no score" in printed

    ds = read_routing_data(out)
    rows, cols = _by_prompt(ds, PROMPTS)
    np.testing.assert_array_equal(ds.Y[np.ix_(rows, cols)], [[1, 0], [1, 1], [1, np.nan]])  # True/False: 1/0
    assert [ds.groups[r] for r in rows] == ["anatomy", "anatomy", "virology"]
    assert np.isnan(ds.C).all()


def test_bad_sources_are_named_errors(tmp_path, capsys):
    pickled = tmp_path / "routerbench_0shot.pkl"
    pickled.write_bytes(pickle.dumps(routerbench_frame()))
    assert main(["data", "import", "--from", "routerbench", str(pickled), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "pickle files are not read" in err and "Traceback" not in err
    assert not (tmp_path / "o.csv").exists()

    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"prompt": ["x"], "answer": ["y"]}).to_csv(wrong, index=False)
    with pytest.raises(DataError, match="no model columns"):
        import_outcomes("routerbench", [wrong])
    with pytest.raises(DataError, match="no 'query', 'model_name', 'performance' column"):
        import_outcomes("llmrouter", [wrong])
    bad = routerbench_frame()
    bad[MODELS[0]] = bad[MODELS[0]].astype(object)
    bad.loc[1, MODELS[0]] = "n/a"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="'n/a' is not a number") as info:
        import_outcomes("routerbench", [tmp_path / "bad.csv"])
    assert info.value.field == MODELS[0]
