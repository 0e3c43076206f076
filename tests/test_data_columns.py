"""Outcome files with their own column names: --id-col, --category-col, --cost-col, --split-col (CLI and Python),
notes for columns present but unread, and what `data validate` / `data stats` say about costs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from prefill_router.cli import main
from prefill_router.data import load_dataset, read_routing_data
from prefill_router.errors import ConfigError, DataError

ROWS = [
    {"uid": "q1", "prompt": "What is 2+2?", "model": "big", "correct": 1, "cost_usd": 0.02, "subject": "math",
     "split": "train", "judge_notes": "ok"},
    {"uid": "q1", "prompt": "What is 2+2?", "model": "small", "correct": 1, "cost_usd": 0.001, "subject": "math",
     "split": "train", "judge_notes": "ok"},
    {"uid": "q2", "prompt": "Capital of France?", "model": "big", "correct": 1, "cost_usd": 0.04, "subject": "geo",
     "split": "test", "judge_notes": ""},
    {"uid": "q2", "prompt": "Capital of France?", "model": "small", "correct": 0, "cost_usd": 0.003,
     "subject": "geo", "split": "test", "judge_notes": ""},
    {"uid": "q3", "prompt": "Name a prime.", "model": "big", "correct": 0, "cost_usd": 0.01, "subject": "math",
     "split": "validation", "judge_notes": ""},
]
NAMES = {"target_col": "model", "score_col": "correct"}  # Python-only names; the CLI reads target and score


def _write(tmp_path, rows, name="outcomes.csv", **rename):
    frame = pd.DataFrame(rows).rename(columns=rename)
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_every_column_can_be_named(tmp_path):
    path = _write(tmp_path, ROWS)
    ds = read_routing_data(path, id_col="uid", category_col="subject", cost_col="cost_usd", split_col="split",
                           **NAMES)
    assert ds.prompt_ids == ["q1", "q2", "q3"] and ds.targets == ["big", "small"]
    assert ds.groups == ["math", "geo", "math"]
    np.testing.assert_allclose(ds.C, [[0.02, 0.001], [0.04, 0.003], [0.01, np.nan]])
    assert ds.splits == ["train", "test", "train"]  # validation rows help choose a model: they train
    train, test = ds.split_rows()
    assert train.tolist() == [0, 2] and test.tolist() == [1]
    assert ds.notes[0] == "column 'judge_notes' is present but not read"


def test_columns_present_but_unread_are_named_with_the_option_that_reads_them(tmp_path):
    ds = read_routing_data(_write(tmp_path, ROWS), **NAMES)
    notes = "\n".join(ds.notes)
    for column, option in (("cost_usd", "--cost-col cost_usd"), ("split", "--split-col split"),
                           ("uid", "--id-col uid"), ("subject", "--category-col subject")):
        assert f"column '{column}' is present but not read; pass {option} to use it" in notes
    assert "no costs are known" in notes and "some" not in notes  # every cost is unknown, not some
    assert np.isnan(ds.C).all() and ds.splits is None and ds.groups is None


def test_a_named_column_must_exist(tmp_path):
    path = _write(tmp_path, ROWS)
    with pytest.raises(DataError, match="no 'cost_us' column; found 'cost_usd'"):
        read_routing_data(path, cost_col="cost_us", **NAMES)
    with pytest.raises(DataError, match="no 'fold' column"):
        read_routing_data(path, split_col="fold", **NAMES)


def test_split_values_are_checked_per_prompt(tmp_path):
    bad = [dict(r) for r in ROWS]
    bad[1]["split"] = "test"  # q1 in two splits
    with pytest.raises(DataError, match="prompt 'q1' is in split 'train' on line 2, 'test' here") as info:
        read_routing_data(_write(tmp_path, bad), id_col="uid", split_col="split", **NAMES)
    assert info.value.line == 3
    bad[1]["split"], bad[0]["split"] = "holdout-ish", "holdout-ish"
    with pytest.raises(DataError, match="split 'holdout-ish' is not one of"):
        read_routing_data(_write(tmp_path, bad), id_col="uid", split_col="split", **NAMES)


def test_wide_cost_columns_follow_a_pattern_and_named_columns_are_not_targets(tmp_path):
    rows = [{"sample_id": "a", "prompt": "x", "eval_name": "mmlu", "split": "train", "gpt-4": 1, "mixtral": 0,
             "gpt-4|total_cost": 0.03, "mixtral|total_cost": 0.001},
            {"sample_id": "b", "prompt": "y", "eval_name": "gsm8k", "split": "test", "gpt-4": 1, "mixtral": 1,
             "gpt-4|total_cost": 0.05, "mixtral|total_cost": 0.002}]
    path = tmp_path / "wide.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = read_routing_data(path)
    assert plain.targets == ["gpt-4", "mixtral"]  # no phantom targets from the id, category, split or costs
    notes = "\n".join(plain.notes)
    assert "pass --cost-col '{target}|total_cost' to use it" in notes
    assert "pass --split-col split" in notes and "pass --category-col eval_name" in notes
    ds = read_routing_data(path, cost_col="{target}|total_cost", id_col="sample_id", category_col="eval_name",
                           split_col="split")
    np.testing.assert_allclose(ds.C, [[0.03, 0.001], [0.05, 0.002]])
    assert ds.prompt_ids == ["a", "b"] and ds.groups == ["mmlu", "gsm8k"] and ds.splits == ["train", "test"]
    with pytest.raises(ConfigError, match="pattern"):
        read_routing_data(path, cost_col="total_cost")


def test_some_unknown_costs_are_counted(tmp_path):
    ds = read_routing_data(_write(tmp_path, ROWS, cost_usd="cost"), **NAMES)
    ds_part = read_routing_data(_write(tmp_path, [{**r, "cost_usd": ""} if i == 0 else r
                                                  for i, r in enumerate(ROWS)], name="part.csv"),
                                cost_col="cost_usd", **NAMES)
    assert not any("unknown" in n for n in ds.notes)
    assert any("1 of 5 costs are unknown" in n for n in ds_part.notes)


def test_load_dataset_passes_columns_and_refuses_them_for_builtins(tmp_path):
    path = _write(tmp_path, ROWS, model="target", correct="score")
    ds = load_dataset(str(path), columns={"cost_col": "cost_usd", "split_col": "split"})
    assert ds.splits == ["train", "test", "train"] and np.isfinite(ds.C[0]).all()
    with pytest.raises(ConfigError) as info:
        load_dataset("mmlu-pro", columns={"cost_col": "cost_usd"})
    assert info.value.field == "cost_col"


def test_cli_validate_and_stats_read_named_columns(tmp_path, capsys):
    path = _write(tmp_path, ROWS, model="target", correct="score")
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note: column 'cost_usd' is present but not read; pass --cost-col cost_usd to use it" in out
    assert "no costs are known" in out
    assert main(["data", "stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "most expensive:  - (no costs are known" in out
    assert main(["data", "stats", str(path), "--cost-col", "cost_usd", "--category-col", "subject"]) == 0
    out = capsys.readouterr().out
    assert "most expensive:  big" in out and "groups:          2 categories" in out
    assert main(["data", "validate", str(path), "--cost-col", "price"]) == 2
    assert "no 'price' column" in capsys.readouterr().err
    assert main(["data", "stats", "--builtin", "mmlu-pro", "--split-col", "split"]) == 2
    assert "--split-col" in capsys.readouterr().err


def test_cli_evaluate_uses_the_file_split_as_its_one_fold_and_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        for t, cost in (("big", 0.01), ("small", 0.001)):
            rows.append({"uid": f"q{i}", "prompt": f"question number {i} about {['cats', 'law'][i % 2]}",
                         "target": t, "score": int(rng.random() < (0.8 if t == "big" else 0.5)),
                         "cost_usd": cost, "split": "test" if i % 4 == 0 else "train"})
    path = _write(tmp_path, rows)
    out = tmp_path / "eval"
    assert main(["evaluate", "--dataset", str(path), "--id-col", "uid", "--cost-col", "cost_usd", "--split-col",
                 "split", "--contenders", "prior", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["n_folds"] == 1
    assert any("the file's split (--split-col split): 30 training, 10 test prompts" in n for n in report["notes"])
    assert np.isfinite(report["summary"]["best single"]["cost_per_1k"]["mean"])  # the named cost column is read
    assert "present but not read" not in captured.err
