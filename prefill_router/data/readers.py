"""Read routing data from CSV, JSONL or Parquet, in long or wide layout, into a RoutingDataset.

Long layout, one row per (prompt, target):
    prompt_id, prompt, target, score [, cost, input_tokens, output_tokens, category]
Wide layout, one row per prompt:
    prompt_id, prompt [, category, input_tokens], then one score column per target
    [, cost_<target>, output_tokens_<target>]

prompt_id is optional; without it a prompt's id is a hash of its text, and rows with the same text are one
prompt. In JSONL a prompt may be chat messages, a list of {"role", "content"}. Scores lie in [0, 1] (graded
scores such as a judge's 0.7 are kept as they are); True/False read as 1/0. A (prompt, target) pair with no
row, an empty score (long) or an empty cell (wide) is NaN in Y: not run, never 0. Empty means an empty or
blank CSV cell, JSON null (or a missing key), or a Parquet null.

Other column names are given with `id_col`, `category_col`, `cost_col` and `split_col` (the CLI's --id-col,
...). A column the reader does not read is named in a note, with the option that would read it when its name
suggests one (`split` -> --split-col split). In the wide layout `cost_col` is a pattern such as
`{target}|total_cost`, and a column whose name says it is an id, a split, a category or a cost is not a target.

The category column (`category`, or `task` when the file has no `category` column) groups prompts: folds are
stratified by it and reports break accuracy down by it. The split column, when named, says which prompts are
for training (`train`; `val`, `validation` and `dev` count as training too) and which are held out (`test`).

Costs: a given `cost` is used as it is. Otherwise, with a price table, cost = tokens x price, where the input
tokens come from the file or are counted (see `tokens.count_tokens`) and unknown output tokens take each
target's median (see `prices.CostModel`). Without prices or costs, C is NaN.

Every refusal is a DataError naming the file, the line and the field. Lines are physical lines: in CSV the
header is line 1 and a record is named by the line it starts on (a prompt holding newlines spans several); in
JSONL line i is line i; in Parquet, "line" i is row i counting from 1. Damaged files (invalid UTF-8, a short
CSV row, a repeated column, JSON nested too deeply, a lone surrogate) are refused the same way.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import json
import math
import re
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import COST_NOTE_PREFIX, CostModel, PriceTable
from prefill_router.data.prompt import check_prompt, prompt_hash, prompt_key
from prefill_router.data.tokens import count_tokens, counting_tokenizer
from prefill_router.errors import ConfigError, DataError

LAYOUTS = ("auto", "long", "wide")
# Column names read as the prompt's category when `category_col` is not given, first found wins.
CATEGORY_COLUMNS = ("category", "task")
COST_PREFIX = "cost_"
OUTPUT_TOKENS_PREFIX = "output_tokens_"
TARGET = "{target}"  # stands for a target's name in a wide layout's cost column pattern
# Values of the split column: training rows (validation rows help choose a model, so they train too) and held-out.
SPLIT_VALUES = {"train": "train", "training": "train", "val": "train", "valid": "train", "validation": "train",
                "dev": "train", "test": "test", "testing": "test"}
# Deeper JSON is no routing data (a chat prompt nests 4 levels): refused before it can exhaust the stack.
MAX_JSON_DEPTH = 64
# Notes about columns the reader left out start with this, so that a command can show them when it reads a file.
COLUMN_NOTE_PREFIX = "column"

# Column names that say what an unread column probably is, and the option that reads it.
_HINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("split", re.compile(r"^(split|fold|partition|subset|set)$", re.I)),
    ("id", re.compile(r"^(id|uid|qid|.*_id|.*_uid)$", re.I)),
    ("category", re.compile(r"^(subject|domain|topic|eval_name|dataset|benchmark|source|task_name|"
                            r"task_type|category_name)$", re.I)),
    ("cost", re.compile(r"cost|price|usd|dollar", re.I)),
)


def read_routing_data(path: str | Path, *, layout: str = "auto",
                      prices: PriceTable | str | Path | None = None,
                      prompt_col: str = "prompt", id_col: str | None = None, target_col: str = "target",
                      score_col: str = "score", category_col: str | None = None, cost_col: str | None = None,
                      input_tokens_col: str = "input_tokens", output_tokens_col: str = "output_tokens",
                      split_col: str | None = None, targets: Sequence[str] | None = None) -> RoutingDataset:
    """Read and validate one routing data file (.csv, .jsonl, .parquet; .gz accepted for CSV and JSONL).

    layout: "long", "wide", or "auto" (long when the file has `target_col` and `score_col` columns; a file with
        only one of the two is refused naming the other, so a misspelt `score` is not read as the wide layout).
    prices: a PriceTable or a path to one; every target must then be priced.
    id_col: the prompt id column (default: `prompt_id` when the file has one, else ids hash the prompt).
    category_col: the prompts' category column (default: the first of CATEGORY_COLUMNS the file has).
    cost_col: long layout: the column of each row's cost in USD (default `cost`); wide layout: a pattern naming
        each target's cost column with "{target}" (default `cost_{target}`).
    split_col: a column saying which prompts are training rows and which are held out (default: none read).
    targets: keep only these targets, in this order (default: all, in order of first appearance).
    A column given by name must be in the file.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}'; choose one of {LAYOUTS}", field="layout")
    if isinstance(prices, (str, Path)):
        prices = PriceTable.load(prices)
    frame, lines, notes = read_table(path)
    columns = [str(c) for c in frame.columns]
    file = str(path)
    for given in (id_col, category_col, split_col):
        if given is not None and given not in columns:
            raise _no_column(given, columns, file)
    if prompt_col not in columns:
        raise _no_column(prompt_col, columns, file)
    if layout == "auto":
        has_target, has_score = target_col in columns, score_col in columns
        if has_target != has_score:  # one of the long layout's two columns: the other is missing, not wide
            raise _no_column(score_col if has_target else target_col, columns, file)
        layout = "long" if has_target else "wide"
    if category_col is None:
        category_col = next((c for c in CATEGORY_COLUMNS if c in columns), CATEGORY_COLUMNS[0])
    if cost_col is None:
        cost_col = "cost" if layout == "long" else COST_PREFIX + TARGET
    elif layout == "long" and cost_col not in columns:
        raise _no_column(cost_col, columns, file)
    elif layout == "wide" and TARGET not in cost_col:
        raise ConfigError(f"in the wide layout the cost column is a pattern with {TARGET} standing for each "
                          f"target's name, such as 'cost_{TARGET}' or '{TARGET}|total_cost'; got {cost_col!r}",
                          field="cost_col")
    id_col = id_col or "prompt_id"
    names = _Columns(prompt_col, id_col, target_col, score_col, category_col, cost_col, input_tokens_col,
                     output_tokens_col, split_col)
    builder = _Builder(file, names, prices, id_col in columns, category_col in columns)
    if layout == "long":
        _read_long(frame, lines, builder)
        read = {prompt_col, id_col, target_col, score_col, category_col, cost_col, input_tokens_col,
                output_tokens_col, split_col}
        notes += _unread_notes([c for c in columns if c not in read])
    else:
        notes += _read_wide(frame, lines, builder, targets)
    builder.notes += notes
    return builder.build(targets)


def _no_column(name: str, columns: Sequence[str], file: str) -> DataError:
    """'no 'score' column; found 'scroe'' when a column's name is close, else the columns found."""
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    found = f"found '{close[0]}'" if close else f"found {list(columns)}"
    return DataError(f"no '{name}' column; {found}", file=file, line=1, field=name)


def _hint(column: str) -> str | None:
    """The kind of column ("split", "id", "category", "cost") its name suggests, or None."""
    return next((kind for kind, pattern in _HINTS if pattern.search(column)), None)


def _unread_notes(unread: Sequence[str], cost_pattern: str | None = None) -> list[str]:
    """One note per unread column whose name says what it is (with the option that reads it), one for the rest."""
    notes, others = [], []
    for column in unread:
        kind = _hint(column)
        if kind is None:
            others.append(column)
            continue
        value = cost_pattern if kind == "cost" and cost_pattern else column
        notes.append(f"{COLUMN_NOTE_PREFIX} '{column}' is present but not read; pass --{kind}-col "
                     f"{shlex.quote(value)} to use it")
    if others:
        listed = ", ".join(f"'{c}'" for c in others)
        notes.append(f"{COLUMN_NOTE_PREFIX}s not read: {listed}" if len(others) > 1
                     else f"{COLUMN_NOTE_PREFIX} {listed} is present but not read")
    return notes


# ---------------------------------------------------------------- files

def read_table(path: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """The file as a DataFrame, the physical line of each row, and notes (columns left out)."""
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        header, records, starts = read_csv_records(path)
        # Everything as text, nothing turned into NaN: validation below decides what a cell means.
        frame = pd.DataFrame(records, columns=header, dtype=object)
        unnamed = [i for i, c in enumerate(header) if not c.strip()]
        notes = []
        if unnamed:  # a saved index (pandas' to_csv) or a trailing comma: nothing to read in it
            frame = frame.drop(columns=[header[i] for i in unnamed])
            notes.append(f"{COLUMN_NOTE_PREFIX}s without a name in the header (column "
                         f"{', '.join(str(i + 1) for i in unnamed)}) are not read")
        return frame, np.asarray(starts, dtype=np.int64), notes
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        frame, lines = _read_jsonl(path)
        return frame, lines, []
    if name.endswith((".parquet", ".pq")):
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"not readable as Parquet: {exc}", file=str(path)) from None
        _check_header([str(c) for c in frame.columns], str(path))
        return frame, np.arange(len(frame)) + 1, []
    if name.endswith(".pkl") or name.endswith(".pickle"):
        raise DataError("pickle files are not read (loading one can run code); export it as CSV, JSONL or "
                        "Parquet first", file=str(path))
    raise DataError("unsupported file type (use .csv, .jsonl or .parquet; .gz for CSV and JSONL)",
                    file=str(path))


def _check_header(columns: Sequence[str], file: str) -> None:
    """Refuse a column name given twice: one of the two would be dropped (or renamed `a.1`, a phantom target)."""
    first: dict[str, int] = {}
    for i, column in enumerate(columns, start=1):
        if column.strip() and column in first:
            raise DataError(f"column '{column}' appears twice (columns {first[column]} and {i}); rename or "
                            "remove one", file=file, line=1, field=column)
        first.setdefault(column, i)


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _text_lines(raw: BinaryIO, file: str) -> Iterator[str]:
    """The file's physical lines decoded as UTF-8 (a BOM dropped); invalid UTF-8 is a DataError naming the line."""
    for line_no, data in enumerate(raw, start=1):
        try:
            yield data.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"invalid UTF-8 (byte {data[exc.start]:#04x} at column {exc.start + 1}); save the file "
                            "as UTF-8", file=file, line=line_no) from None
        except (OSError, EOFError) as exc:  # a damaged .gz
            raise DataError(f"cannot read the file: {exc}", file=file, line=line_no) from None


def read_csv_records(path: str | Path) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, records, physical line each record starts on) of a CSV file (.gz accepted), every cell as text.

    Blank lines are skipped. A record with more or fewer cells than the header, invalid UTF-8 and a repeated
    column name are DataErrors naming the physical line, which differs from the record number when cells hold
    newlines. Shared by the routing-data and prompt readers."""
    path = Path(path)
    file = str(path)
    # Prompts can be long; the csv module's default limit (128 KiB a cell) would refuse a long document.
    csv.field_size_limit(1 << 30)
    with _open_binary(path) as raw:
        reader = csv.reader(_text_lines(raw, file))
        records: list[list[str]] = []
        starts: list[int] = []
        header: list[str] | None = None
        end = 0
        try:
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # a blank line
                if header is None:
                    header = record
                    _check_header(header, file)
                    continue
                if len(record) != len(header):
                    fewer = "fewer" if len(record) < len(header) else "more"
                    raise DataError(f"row has {len(record)} cells, {fewer} than the header's {len(header)} "
                                    "(an unquoted comma or newline?)", file=file, line=start)
                records.append(record)
                starts.append(start)
        except csv.Error as exc:
            raise DataError(f"not readable as CSV: {exc}", file=file, line=end + 1) from None
    if header is None:
        raise DataError("file is empty", file=file)
    return header, records, starts


def _depth_over(value: Any, limit: int) -> bool:
    """Whether `value` nests lists and objects deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def _lone_surrogate(value: Any) -> str | None:
    """The first string in `value` that holds a lone surrogate (JSON "\\ud800" escapes to one), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object hook: an object whose key repeats is refused (JSON would keep the last value)."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise DataError(f"key '{key}' appears twice in one object")
        record[key] = value
    return record


def iter_jsonl_objects(path: str | Path, *, allow_surrogates: bool = True) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (.gz accepted). A line that is not a JSON
    object, invalid UTF-8, a key given twice and nesting deeper than MAX_JSON_DEPTH are DataErrors naming the
    file and line; so is a lone surrogate ("\\ud800", not valid Unicode) unless `allow_surrogates` (`collect`
    records such a prompt as failed rather than refusing the file). Shared by the routing-data and prompt readers."""
    path = Path(path)
    file = str(path)
    with _open_binary(path) as raw:
        for line_no, line in enumerate(_text_lines(raw, file), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", file=file,
                                line=line_no) from None
            except RecursionError:
                raise DataError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)", file=file,
                                line=line_no) from None
            except DataError as exc:
                raise DataError(exc.reason, file=file, line=line_no) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", file=file, line=line_no)
            # Counting brackets first keeps the walk off ordinary lines.
            if line.count("[") + line.count("{") > MAX_JSON_DEPTH and _depth_over(record, MAX_JSON_DEPTH):
                raise DataError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)", file=file,
                                line=line_no)
            if not allow_surrogates and _SURROGATE_ESCAPE.search(line):
                bad = _lone_surrogate(record)
                if bad is not None:
                    raise DataError(f"text {bad[:40]!r} holds a lone surrogate escape, which is not valid "
                                    "Unicode", file=file, line=line_no)
            yield line_no, record


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    records, lines = [], []
    for line_no, record in iter_jsonl_objects(path, allow_surrogates=False):
        records.append(record)
        lines.append(line_no)
    if not records:
        raise DataError("file has no records", file=str(path))
    # object dtype keeps chat-message lists and raw values as they are
    frame = pd.DataFrame.from_records(records).astype(object)
    return frame, np.asarray(lines)


# ---------------------------------------------------------------- cells

def _missing(value) -> bool:
    """An empty cell: None, NaN of any float type, pandas' NA (nullable Parquet columns), or blank text."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict, np.ndarray)):  # chat messages are a value, not a missing one
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _number(value, what: str) -> float:
    """A finite float from a cell; True/False read as 1/0. Raises ValueError with the reason."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return 1.0 if text.lower() == "true" else 0.0
        value = text
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{what} {value!r} is not a finite number")
    return number


def _prompt(value):
    """The prompt as text or chat messages (`prompt.check_prompt`). Raises DataError with the reason."""
    if isinstance(value, np.ndarray):  # Parquet returns list columns as arrays
        value = value.tolist()
    if _missing(value):
        raise DataError("empty prompt")
    return check_prompt(value)


class _Columns:
    def __init__(self, prompt, id, target, score, category, cost, input_tokens, output_tokens, split):
        self.prompt, self.id, self.target, self.score, self.category = prompt, id, target, score, category
        self.cost, self.input_tokens, self.output_tokens, self.split = cost, input_tokens, output_tokens, split


class _Builder:
    """Collects prompts and (prompt, target) cells, refusing conflicts, then makes the RoutingDataset."""

    def __init__(self, file: str, names: _Columns, prices: PriceTable | None, has_ids: bool,
                 has_groups: bool):
        self.file, self.names, self.prices = file, names, prices
        self.has_ids, self.has_groups = has_ids, has_groups
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.prompts: list = []
        self.first_line: list[int] = []
        self.groups: list[str] = []
        self.splits: list[str] = []
        self.input_tokens: list[float] = []
        self.notes: list[str] = []
        self.target_index: dict[str, int] = {}
        # (prompt, target) -> (score, cost, output tokens, line)
        self.cells: dict[tuple[int, int], tuple[float, float, float, int]] = {}

    def error(self, message: str, line: int | None, field: str | None) -> DataError:
        return DataError(message, file=self.file, line=line, field=field)

    def number(self, value, line: int, field: str, *, low: float = 0.0, high: float = math.inf,
               what: str = "value") -> float:
        """A cell as float (NaN when empty), checked to lie in [low, high]."""
        if _missing(value):
            return math.nan
        try:
            number = _number(value, what)
        except ValueError as exc:
            raise self.error(str(exc), line, field) from None
        if not low <= number <= high:
            bounds = f"[{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
            raise self.error(f"{what} {number:g} is outside {bounds}", line, field)
        return number

    def add_prompt(self, row: dict, line: int) -> int:
        n = self.names
        try:
            prompt = _prompt(row.get(n.prompt))
        except ValueError as exc:
            raise self.error(str(exc), line, n.prompt) from None
        if self.has_ids:
            raw_id = row.get(n.id)
            if _missing(raw_id):
                raise self.error("empty prompt id", line, n.id)
            pid = str(raw_id).strip()
            if isinstance(raw_id, float) and raw_id.is_integer():  # JSON/Parquet numbers: 7.0 -> "7"
                pid = str(int(raw_id))
            key = pid
        else:
            key = prompt_key(prompt)
            pid = prompt_hash(prompt, "dataset_id")
        group = None
        if self.has_groups:
            raw = row.get(n.category)
            group = "(none)" if _missing(raw) else str(raw).strip()
        split = self.split(row, line)
        tokens = self.number(row.get(n.input_tokens), line, n.input_tokens, what="input token count")
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.ids)
            self.ids.append(pid)
            self.prompts.append(prompt)
            self.first_line.append(line)
            self.groups.append(group)
            self.splits.append(split)
            self.input_tokens.append(tokens)
            return i
        first = self.first_line[i]
        if prompt_key(self.prompts[i]) != prompt_key(prompt):
            raise self.error(f"prompt id '{pid}' has a different prompt on line {first}", line, n.prompt)
        if self.has_groups and group != self.groups[i]:
            raise self.error(f"prompt '{pid}' has category '{self.groups[i]}' on line {first}, "
                             f"'{group}' here", line, n.category)
        if split != self.splits[i]:
            raise self.error(f"prompt '{pid}' is in split '{self.splits[i]}' on line {first}, '{split}' here", line,
                             n.split)
        if math.isnan(self.input_tokens[i]):
            self.input_tokens[i] = tokens
        return i

    def split(self, row: dict, line: int) -> str:
        """The row's split, "train" or "test" (see SPLIT_VALUES); "train" when no split column is read."""
        if self.names.split is None:
            return "train"
        raw = row.get(self.names.split)
        value = SPLIT_VALUES.get("" if _missing(raw) else str(raw).strip().lower())
        if value is None:
            shown = "empty" if _missing(raw) else repr(raw)
            raise self.error(f"split {shown} is not one of {sorted(SPLIT_VALUES)}", line, self.names.split)
        return value

    def add_cell(self, i: int, target: str, score, cost, output_tokens, line: int, *, score_field: str,
                 cost_field: str, output_field: str) -> None:
        if self.prices is not None and target not in self.prices:
            raise self.error(f"unknown target '{target}' in the price table ({self.prices.source}); "
                             f"priced: {self.prices.targets}", line, self.names.target)
        value = self.number(score, line, score_field, high=1.0, what="score")
        cost = self.number(cost, line, cost_field, what="cost")
        output_tokens = self.number(output_tokens, line, output_field, what="output token count")
        # the target keeps its column even when every one of its scores is empty
        k = self.target_index.setdefault(target, len(self.target_index))
        if math.isnan(value):
            return  # an empty score: the target was not run on this prompt, so Y stays NaN (missing, not 0)
        old = self.cells.get((i, k))
        if old is None:
            self.cells[(i, k)] = (value, cost, output_tokens, line)
        elif old[0] != value:
            raise self.error(f"prompt '{self.ids[i]}' and target '{target}' already have score {old[0]:g} "
                             f"(line {old[3]}); this row says {value:g}", line, score_field)

    def build(self, keep: Sequence[str] | None) -> RoutingDataset:
        if not self.ids:
            raise self.error("no rows", None, None)
        names = list(self.target_index)
        if keep is not None:
            unknown = [t for t in keep if t not in self.target_index]
            if unknown:
                raise self.error(f"unknown target(s) {unknown}; the file has {names}", None, "targets")
            names = list(keep)
        if not names:
            raise self.error("no targets", None, self.names.target)
        column = {t: j for j, t in enumerate(names)}
        n, k = len(self.ids), len(names)
        Y, C, out = np.full((n, k), np.nan), np.full((n, k), np.nan), np.full((n, k), np.nan)
        by_index = {index: t for t, index in self.target_index.items()}
        for (i, tk), (score, cost, tokens, _) in self.cells.items():
            j = column.get(by_index[tk])
            if j is not None:
                Y[i, j], C[i, j], out[i, j] = score, cost, tokens
        notes = []
        input_tokens = np.asarray(self.input_tokens, dtype=np.float64)
        if self.prices is not None:
            unknown_in = np.isnan(input_tokens)
            if unknown_in.any():
                input_tokens[unknown_in] = count_tokens([self.prompts[i] for i in np.flatnonzero(unknown_in)])
                notes.append(f"input tokens of {int(unknown_in.sum())} prompt(s) counted with the "
                             f"{counting_tokenizer().name} tokenizer")
        has_tokens = not np.isnan(input_tokens).any()
        if self.names.split is not None:
            held = self.splits.count("test")
            notes.append(f"split: {n - held} training and {held} held-out prompts from column "
                         f"'{self.names.split}'")
        ds = RoutingDataset(self.ids, self.prompts, names, Y, C, self.groups if self.has_groups else None,
                            self.notes + notes,
                            input_tokens=input_tokens if has_tokens else None, output_tokens=out,
                            prices=self.prices, splits=self.splits if self.names.split is not None else None)
        if self.prices is not None:
            priced = ds.with_costs(CostModel.fit(ds))
            # Costs given in the file win over estimates.
            priced.C = np.where(np.isnan(C), priced.C, C)
            return priced
        unknown = np.isnan(C[~np.isnan(Y)])
        if unknown.all():
            ds.notes.append(f"{COST_NOTE_PREFIX}no costs are known; pass a price table to estimate them, or name "
                            "the file's cost column (--cost-col)")
        elif unknown.any():
            ds.notes.append(f"{COST_NOTE_PREFIX}{int(unknown.sum())} of {unknown.size} costs are unknown (NaN); pass "
                            "a price table to estimate them")
        return ds


# ---------------------------------------------------------------- layouts

def _records(frame: pd.DataFrame):
    columns = list(frame.columns)
    for values in frame.itertuples(index=False, name=None):
        yield dict(zip(columns, values))


def _read_long(frame: pd.DataFrame, lines: np.ndarray, builder: _Builder) -> None:
    n = builder.names
    columns = [str(c) for c in frame.columns]
    for needed in (n.target, n.score):
        if needed not in columns:
            raise _no_column(needed, columns, builder.file)
    for row, line in zip(_records(frame), lines.tolist()):
        target = row.get(n.target)
        if _missing(target):
            raise builder.error("empty target name", line, n.target)
        i = builder.add_prompt(row, line)
        builder.add_cell(i, str(target).strip(), row.get(n.score), row.get(n.cost), row.get(n.output_tokens),
                         line, score_field=n.score, cost_field=n.cost, output_field=n.output_tokens)


def _cost_pattern_of(columns: Sequence[str], targets: Sequence[str]) -> str | None:
    """The wide cost pattern ("{target}|total_cost") that cost-like `columns` follow for the given targets."""
    for column in columns:
        for t in sorted(targets, key=len, reverse=True):
            at = column.find(t)
            if at >= 0:
                return column[:at] + TARGET + column[at + len(t):]
    return None


def _read_wide(frame: pd.DataFrame, lines: np.ndarray, builder: _Builder, keep: Sequence[str] | None) -> list[str]:
    """Read the wide layout into `builder`; returns notes on the columns left out."""
    n = builder.names
    columns = [str(c) for c in frame.columns]
    before, _, after = n.cost.partition(TARGET)

    def is_cost(c: str) -> bool:
        return c.startswith(before) and c.endswith(after) and len(c) > len(before) + len(after)

    reserved = {n.prompt, n.id, n.category, n.input_tokens, n.split, *CATEGORY_COLUMNS}
    others = [c for c in columns if c not in reserved and not is_cost(c) and not c.startswith(OUTPUT_TOKENS_PREFIX)]
    unread: list[str] = []
    if keep is not None:
        missing = [t for t in keep if t not in columns]
        if missing:
            raise builder.error(f"missing target column(s) {missing}", 1, missing[0])
        targets = list(keep)
    else:
        # A column named like an id, a split, a category or a cost is not a target's scores.
        unread = [c for c in others if _hint(c)]
        targets = [c for c in others if c not in unread]
    if not targets:
        raise builder.error("no target score columns (wide layout needs one column per target)", 1, None)
    for c in columns:
        if c.startswith(OUTPUT_TOKENS_PREFIX) and c[len(OUTPUT_TOKENS_PREFIX):] not in columns:
            raise builder.error(f"column '{c}' names no target column", 1, c)
        if is_cost(c) and c[len(before):len(c) - len(after)] not in columns:
            raise builder.error(f"column '{c}' names no target column (cost columns are '{n.cost}')", 1, c)
    if n.cost != COST_PREFIX + TARGET and not any(n.cost.replace(TARGET, t) in columns for t in targets):
        raise builder.error(f"no column follows the cost pattern '{n.cost}' for targets {targets}", 1, "cost_col")
    if builder.prices is not None:
        for t in targets:
            if t not in builder.prices:
                raise builder.error(f"unknown target '{t}' in the price table ({builder.prices.source}); "
                                    f"priced: {builder.prices.targets}", 1, t)
    # What a misspelt reserved column would otherwise fail with: "score 'q1' is not a number" under its name.
    known = [n.prompt, n.id, n.category, n.input_tokens, n.target, n.score]
    misspelt = {t: difflib.get_close_matches(t, known, n=1, cutoff=0.75) for t in targets}
    for t in targets:  # registered up front so a column with no scores still keeps its place
        builder.target_index.setdefault(t, len(builder.target_index))
    for row, line in zip(_records(frame), lines.tolist()):
        i = builder.add_prompt(row, line)
        for t in targets:
            cost_field, output_field = n.cost.replace(TARGET, t), OUTPUT_TOKENS_PREFIX + t
            try:
                builder.add_cell(i, t, row.get(t), row.get(cost_field), row.get(output_field), line,
                                 score_field=t, cost_field=cost_field, output_field=output_field)
            except DataError as exc:
                if not misspelt[t] or exc.field != t:
                    raise
                raise builder.error(f"{exc.reason} (is '{t}' a misspelt '{misspelt[t][0]}'? the file is read in the "
                                    "wide layout, one score column per target)", line, t) from None
    pattern = _cost_pattern_of([c for c in unread if _hint(c) == "cost"], targets)
    return _unread_notes(unread, cost_pattern=pattern)
