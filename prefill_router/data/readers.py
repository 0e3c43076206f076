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

The category column (`category`, or `task` when the file has no `category` column) groups prompts: folds are
stratified by it and reports break accuracy down by it.

Costs: a given `cost` is used as it is. Otherwise, with a price table, cost = tokens x price, where the input
tokens come from the file or are counted (see `tokens.count_tokens`) and unknown output tokens take each
target's median (see `prices.CostModel`). Without prices or costs, C is NaN.

Every refusal is a DataError naming the file, the line and the field. Lines: in CSV the header is line 1 and
the first record is line 2 (a record with a quoted newline still counts as one); in JSONL line i is line i;
in Parquet, "line" i is row i counting from 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, PriceTable
from prefill_router.data.prompt import check_prompt, prompt_hash, prompt_key
from prefill_router.data.tokens import count_tokens, counting_tokenizer
from prefill_router.errors import DataError

LAYOUTS = ("auto", "long", "wide")
# Column names read as the prompt's category when `category_col` is not given, first found wins.
CATEGORY_COLUMNS = ("category", "task")
COST_PREFIX = "cost_"
OUTPUT_TOKENS_PREFIX = "output_tokens_"


def read_routing_data(path: str | Path, *, layout: str = "auto",
                      prices: PriceTable | str | Path | None = None,
                      prompt_col: str = "prompt", id_col: str = "prompt_id", target_col: str = "target",
                      score_col: str = "score", category_col: str | None = None, cost_col: str = "cost",
                      input_tokens_col: str = "input_tokens", output_tokens_col: str = "output_tokens",
                      targets: Sequence[str] | None = None) -> RoutingDataset:
    """Read and validate one routing data file (.csv, .jsonl, .parquet; .gz accepted for CSV and JSONL).

    layout: "long", "wide", or "auto" (long when the file has `target_col` and `score_col` columns).
    prices: a PriceTable or a path to one; every target must then be priced.
    category_col: the prompts' category column (default: the first of CATEGORY_COLUMNS the file has).
    targets: keep only these targets, in this order (default: all, in order of first appearance).
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}'; choose one of {LAYOUTS}", field="layout")
    if isinstance(prices, (str, Path)):
        prices = PriceTable.load(prices)
    frame, lines = _read_table(path)
    columns = list(frame.columns)
    if layout == "auto":
        layout = "long" if target_col in columns and score_col in columns else "wide"
    if category_col is None:
        category_col = next((c for c in CATEGORY_COLUMNS if c in columns), CATEGORY_COLUMNS[0])
    names = _Columns(prompt_col, id_col, target_col, score_col, category_col, cost_col, input_tokens_col,
                     output_tokens_col)
    builder = _Builder(str(path), names, prices, id_col in columns, category_col in columns)
    if prompt_col not in columns:
        raise DataError(f"missing column (found {columns})", file=str(path), line=1, field=prompt_col)
    if layout == "long":
        _read_long(frame, lines, builder)
    else:
        _read_wide(frame, lines, builder, targets)
    return builder.build(targets)


# ---------------------------------------------------------------- files

def _read_table(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The file as a DataFrame, plus the line number of each row."""
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        try:
            # Everything as text, nothing turned into NaN: validation below decides what a cell means.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        except pd.errors.EmptyDataError:
            raise DataError("file is empty", file=str(path)) from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"not readable as CSV: {exc}", file=str(path)) from None
        return frame, np.arange(len(frame)) + 2
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _read_jsonl(path)
    if name.endswith((".parquet", ".pq")):
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DataError(f"not readable as Parquet: {exc}", file=str(path)) from None
        return frame, np.arange(len(frame)) + 1
    raise DataError("unsupported file type (use .csv, .jsonl or .parquet; .gz for CSV and JSONL)",
                    file=str(path))


def iter_jsonl_objects(path: str | Path):
    """(line number, object) for each non-blank line of a JSONL file (.gz accepted); a line that is not a JSON
    object is a DataError naming the file and line. Shared by the routing-data and prompt readers."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", file=str(path),
                                line=line_no) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", file=str(path),
                                line=line_no)
            yield line_no, record


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    records, lines = [], []
    for line_no, record in iter_jsonl_objects(path):
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
    def __init__(self, prompt, id, target, score, category, cost, input_tokens, output_tokens):
        self.prompt, self.id, self.target, self.score, self.category = prompt, id, target, score, category
        self.cost, self.input_tokens, self.output_tokens = cost, input_tokens, output_tokens


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
        self.input_tokens: list[float] = []
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
        tokens = self.number(row.get(n.input_tokens), line, n.input_tokens, what="input token count")
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.ids)
            self.ids.append(pid)
            self.prompts.append(prompt)
            self.first_line.append(line)
            self.groups.append(group)
            self.input_tokens.append(tokens)
            return i
        first = self.first_line[i]
        if prompt_key(self.prompts[i]) != prompt_key(prompt):
            raise self.error(f"prompt id '{pid}' has a different prompt on line {first}", line, n.prompt)
        if self.has_groups and group != self.groups[i]:
            raise self.error(f"prompt '{pid}' has category '{self.groups[i]}' on line {first}, "
                             f"'{group}' here", line, n.category)
        if math.isnan(self.input_tokens[i]):
            self.input_tokens[i] = tokens
        return i

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
        ds = RoutingDataset(self.ids, self.prompts, names, Y, C, self.groups if self.has_groups else None,
                            notes,
                            input_tokens=input_tokens if has_tokens else None, output_tokens=out,
                            prices=self.prices)
        if self.prices is not None:
            priced = ds.with_costs(CostModel.fit(ds))
            # Costs given in the file win over estimates.
            priced.C = np.where(np.isnan(C), priced.C, C)
            return priced
        if np.isnan(C[~np.isnan(Y)]).any():
            ds.notes.append("cost: some costs are unknown (NaN); pass a price table to estimate them")
        return ds


# ---------------------------------------------------------------- layouts

def _records(frame: pd.DataFrame):
    columns = list(frame.columns)
    for values in frame.itertuples(index=False, name=None):
        yield dict(zip(columns, values))


def _read_long(frame: pd.DataFrame, lines: np.ndarray, builder: _Builder) -> None:
    n = builder.names
    for needed in (n.target, n.score):
        if needed not in frame.columns:
            raise builder.error(f"missing column (found {list(frame.columns)})", 1, needed)
    for row, line in zip(_records(frame), lines.tolist()):
        target = row.get(n.target)
        if _missing(target):
            raise builder.error("empty target name", line, n.target)
        i = builder.add_prompt(row, line)
        builder.add_cell(i, str(target).strip(), row.get(n.score), row.get(n.cost), row.get(n.output_tokens),
                         line, score_field=n.score, cost_field=n.cost, output_field=n.output_tokens)


def _read_wide(frame: pd.DataFrame, lines: np.ndarray, builder: _Builder, keep: Sequence[str] | None) -> None:
    n = builder.names
    columns = [str(c) for c in frame.columns]
    reserved = {n.prompt, n.id, n.category, n.input_tokens, *CATEGORY_COLUMNS}
    if keep is not None:
        missing = [t for t in keep if t not in columns]
        if missing:
            raise builder.error(f"missing target column(s) {missing}", 1, missing[0])
        targets = list(keep)
    else:
        targets = [c for c in columns if c not in reserved
                   and not c.startswith((COST_PREFIX, OUTPUT_TOKENS_PREFIX))]
    if not targets:
        raise builder.error("no target score columns (wide layout needs one column per target)", 1, None)
    for c in columns:
        for prefix in (COST_PREFIX, OUTPUT_TOKENS_PREFIX):
            if c.startswith(prefix) and c[len(prefix):] not in columns:
                raise builder.error(f"column '{c}' names no target column", 1, c)
    if builder.prices is not None:
        for t in targets:
            if t not in builder.prices:
                raise builder.error(f"unknown target '{t}' in the price table ({builder.prices.source}); "
                                    f"priced: {builder.prices.targets}", 1, t)
    for t in targets:  # registered up front so a column with no scores still keeps its place
        builder.target_index.setdefault(t, len(builder.target_index))
    for row, line in zip(_records(frame), lines.tolist()):
        i = builder.add_prompt(row, line)
        for t in targets:
            cost_field, output_field = COST_PREFIX + t, OUTPUT_TOKENS_PREFIX + t
            builder.add_cell(i, t, row.get(t), row.get(cost_field), row.get(output_field), line,
                             score_field=t, cost_field=cost_field, output_field=output_field)
