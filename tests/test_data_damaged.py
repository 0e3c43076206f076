"""Damaged or misshapen routing data and prompt files: each is a DataError naming the file, the physical line and
the field, and the CLI answers with one line, never a traceback."""

from __future__ import annotations

import json
import pickle

import pandas as pd
import pytest

from prefill_router.cli import main
from prefill_router.collect.prompts import read_prompts
from prefill_router.data import read_routing_data
from prefill_router.errors import DataError

DEEP = "[" * 50_000 + "]" * 50_000


def _physical_line(path, prefix: str) -> int:
    """The 1-based line of the file that starts with `prefix` (a record's first line)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if line.startswith(prefix))


def _long_rows(n: int, multiline: bool = True) -> list[dict]:
    text = "Question {i}:\nline two\nline three" if multiline else "Question {i}"
    return [{"prompt_id": f"q{i}", "prompt": text.format(i=i), "target": t, "score": 1}
            for i in range(n) for t in ("a", "b")]


def test_error_lines_are_physical_lines_when_prompts_hold_newlines(tmp_path):
    rows = _long_rows(6)
    rows[9]["score"] = "maybe"  # q4, target b
    path = tmp_path / "d.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        read_routing_data(path)
    expected = [i for i, line in enumerate(path.read_text().splitlines(), start=1) if line.startswith("q4,")][1]
    assert info.value.line == expected and info.value.field == "score"
    assert expected > 11  # the record number (11) would be wrong: each prompt spans three lines


def test_a_short_long_row_is_an_error_naming_its_physical_line(tmp_path):
    path = tmp_path / "short.csv"
    pd.DataFrame(_long_rows(3)).to_csv(path, index=False)
    with open(path, "a") as f:
        f.write("q9,just text,a\n")  # no score cell: not "not run", a damaged row
    with pytest.raises(DataError, match="3 cells, fewer than the header's 4") as info:
        read_routing_data(path)
    assert info.value.line == _physical_line(path, "q9,") and info.value.file == str(path)


def test_a_long_row_with_extra_cells_is_an_error_too(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("prompt,target,score\nhi,a,1\nho,a,1,7\n")
    with pytest.raises(DataError, match="4 cells, more than") as info:
        read_routing_data(path)
    assert info.value.line == 3


@pytest.mark.parametrize("header,missing,found", [
    ("prompt,target,scroe", "score", "scroe"),
    ("prompt,traget,score", "target", "traget"),
    ("promt,target,score", "prompt", "promt"),
])
def test_a_misspelt_required_column_is_named_as_missing(tmp_path, header, missing, found):
    path = tmp_path / "typo.csv"
    path.write_text(header + "\nWhat is 2+2?,big-model,1\n")
    with pytest.raises(DataError, match=f"no '{missing}' column; found '{found}'") as info:
        read_routing_data(path)
    assert info.value.line == 1 and info.value.field == missing


def test_a_wide_file_with_misspelt_long_columns_says_so(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text("prompt,traget,scroe\nWhat is 2+2?,big-model,1\n")  # both misspelt: read as wide
    with pytest.raises(DataError, match="misspelt 'target'") as info:
        read_routing_data(path)
    assert info.value.field == "traget" and info.value.line == 2


def test_a_repeated_wide_target_column_is_refused_not_a_phantom_target(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("prompt,a,b,a\nhello,1,0,1\n")
    with pytest.raises(DataError, match="column 'a' appears twice") as info:
        read_routing_data(path)
    assert info.value.line == 1 and info.value.field == "a"


def test_an_unnamed_index_column_is_left_out_with_a_note(tmp_path):
    path = tmp_path / "indexed.csv"
    pd.DataFrame({"prompt": ["x", "y"], "a": [1, 0], "b": [0, 1]}).to_csv(path)  # index=True: unnamed column
    ds = read_routing_data(path)
    assert ds.targets == ["a", "b"]
    assert any("without a name" in n for n in ds.notes)


def _jsonl(path, *lines: str | bytes):
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


GOOD = json.dumps({"prompt": "fine", "target": "a", "score": 1})


@pytest.mark.parametrize("bad,reason", [
    ('{"prompt": "x", "target": "a", "score": 1, "extra": ' + DEEP + "}", "nested too deeply"),
    ('{"prompt": "x", "target": "a", "score": 1, "extra": ' + "[" * 200 + "]" * 200 + "}", "nested too deeply"),
    ('{"prompt": "lone \\ud800 surrogate", "target": "a", "score": 1}', "lone surrogate"),
    (b'{"prompt": "caf\xe9", "target": "a", "score": 1}', "invalid UTF-8"),
    ('{"prompt": "x", "target": "a", "score": 1, "score": 0}', "'score' appears twice"),
])
def test_damaged_jsonl_lines_are_named_errors(tmp_path, capsys, bad, reason):
    path = _jsonl(tmp_path / "d.jsonl", GOOD, bad)
    with pytest.raises(DataError, match=reason) as info:
        read_routing_data(path)
    assert info.value.line == 2 and info.value.file == str(path)
    assert main(["data", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and reason in err


def test_a_surrogate_pair_is_valid_text(tmp_path):
    path = _jsonl(tmp_path / "emoji.jsonl", '{"prompt": "smile \\ud83d\\ude00", "target": "a", "score": 1}')
    assert read_routing_data(path).prompts == ["smile \U0001f600"]


def test_invalid_utf8_in_a_csv_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,target,score\nok,a,1\n" + "café,a,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="invalid UTF-8") as info:
        read_routing_data(path)
    assert info.value.line == 3


def test_a_pickle_is_never_loaded(tmp_path):
    path = tmp_path / "routerbench.pkl"
    path.write_bytes(pickle.dumps({"prompt": ["x"]}))
    with pytest.raises(DataError, match="pickle files are not read"):
        read_routing_data(path)


@pytest.mark.parametrize("suffix,content,reason,line", [
    (".jsonl", b'{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n', "invalid UTF-8", 2),
    (".jsonl", ('{"prompt": "ok", "answer": "1"}\n{"prompt": "x", "answer": ' + DEEP + "}\n").encode(),
     "nested too deeply", 2),
    (".csv", b"prompt,answer\nok,1\ncaf\xe9,2\n", "invalid UTF-8", 3),
    (".csv", b'prompt,answer\n"two\nlines",1\nshort\n', "1 cells, fewer", 4),
])
def test_damaged_prompt_files_for_collect_are_named_errors(tmp_path, suffix, content, reason, line):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=reason) as info:
        read_prompts(path)
    assert info.value.line == line
