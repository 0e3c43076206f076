"""Outcome files in other routing projects' published layouts, converted to the documented long layout.

    frame, notes = import_outcomes("routerbench", ["routerbench_0shot.csv"])

- `routerbench` (withmartian/routerbench, exported from its pickle as CSV, JSONL or Parquet): one row per prompt,
  `sample_id`, `prompt` (the repr of a Python list of prompt parts), `eval_name`, then per model `<model>` (score
  in [0, 1]), `<model>|total_cost` (USD), `<model>|model_response`, and `oracle_model_to_route_to`.
- `llmrouter` (ulab-uiuc/LLMRouter's routing data, `default_routing_{train,test}_data.jsonl`): one row per
  (query, model), `task_name`, `query`, `model_name`, `performance` (score in [0, 1]), `input_tokens`,
  `output_tokens`, `embedding_id` (the same for every row of one query), ... Costs come from its LLM data file
  (`default_llm.json`: `input_price` and `output_price` in USD per million tokens) when one is given.
- `routellm` (lm-sys/RouteLLM `routellm/evals`: `mmlu/responses/mmlu_<subject>.csv`, `gsm8k/gsm8k_responses.csv`):
  one row per prompt, `prompt`, then one True/False column per model; the subject is in the file name.

The result has the documented columns (docs/data-formats.md): prompt_id, prompt, target, score, and where the
source has them, cost, category, input_tokens, output_tokens and split. Rows whose score is empty (the model was
not run) are left out. Pickle files are never loaded: unpickling can run code.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prefill_router.data.readers import read_table
from prefill_router.errors import DataError

FORMATS = ("routerbench", "llmrouter", "routellm")
LONG_COLUMNS = ("prompt_id", "prompt", "target", "score", "cost", "category", "input_tokens", "output_tokens",
                "split")
ROUTERBENCH_META = ("sample_id", "prompt", "eval_name", "oracle_model_to_route_to")
ROUTERBENCH_COST, ROUTERBENCH_RESPONSE = "|total_cost", "|model_response"


def import_outcomes(kind: str, paths: Sequence[str | Path], *,
                    llm_data: str | Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The rows of `paths` (one or more files of the `kind` layout) in the documented long layout, and notes
    saying what was mapped to what and what was left out. `llm_data` (llmrouter only) prices the rows."""
    if kind not in FORMATS:
        raise DataError(f"unknown layout {kind!r}; choose one of {', '.join(FORMATS)}", field="from")
    if not paths:
        raise DataError("no file to import", field="from")
    if llm_data is not None and kind != "llmrouter":
        raise DataError(f"an LLM data file prices LLMRouter's token counts; the {kind} layout has none",
                        field="llm_data")
    parts, notes = [], []
    for path in map(Path, paths):
        frame = _read(path)
        if kind == "routerbench":
            part, part_notes = _routerbench(frame, str(path))
        elif kind == "llmrouter":
            part, part_notes = _llmrouter(frame, str(path), llm_data)
        else:
            part, part_notes = _routellm(frame, path)
        split = _split_of(path) if len(paths) > 1 else None
        if split is not None:
            part["split"] = split
            part_notes.append(f"split: '{split}' for every row of {path.name} (its file name)")
        parts.append(part)
        notes += [n for n in part_notes if n not in notes]
    out = pd.concat(parts, ignore_index=True)
    out = out[[c for c in LONG_COLUMNS if c in out.columns]]
    missing = out["score"].isna()
    if missing.any():
        notes.append(f"left out {int(missing.sum())} (prompt, model) pair(s) with no score (not run)")
        out = out[~missing].reset_index(drop=True)
    if out.empty:
        raise DataError(f"no scored rows in {', '.join(map(str, paths))}")
    return out, notes


def write_long(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write the long layout as CSV, JSONL or Parquet (by the name's suffix; .gz for CSV and JSONL)."""
    from prefill_router.utils import atomic_path

    out = Path(out)
    name = out.name.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if name.endswith((".csv", ".csv.gz")):
            frame.to_csv(tmp, index=False, compression="gzip" if name.endswith(".gz") else None)
        elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False,
                          compression="gzip" if name.endswith(".gz") else None)
        elif name.endswith((".parquet", ".pq")):
            frame.to_parquet(tmp, index=False)
        else:
            raise DataError("unsupported output type (use .csv, .jsonl or .parquet; .gz for CSV and JSONL)",
                            file=str(out))
    return out


# ---------------------------------------------------------------- reading

def _read(path: Path) -> pd.DataFrame:
    """A source file as a DataFrame: CSV, JSONL or Parquet like any data file, or a JSON array of objects."""
    if path.name.lower().endswith(".json"):
        if not path.is_file():
            raise DataError("file not found", file=str(path))
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DataError(f"not readable as JSON: {type(exc).__name__}", file=str(path)) from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DataError("expected a JSON array of objects (or JSONL, one object a line)", file=str(path))
        return pd.DataFrame.from_records(records).astype(object)
    if path.name.lower().endswith((".pkl", ".pickle")):
        raise DataError("pickle files are not read (loading one can run code); export it first, for example "
                        "pandas.read_pickle(FILE).to_parquet('routerbench.parquet') in a trusted session",
                        file=str(path))
    frame, _, _ = read_table(path)
    return frame


def _require(frame: pd.DataFrame, columns: Sequence[str], file: str, layout: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"no {', '.join(repr(c) for c in missing)} column; a {layout} file has "
                        f"{', '.join(columns)} (found {list(frame.columns)[:12]})", file=file, line=1,
                        field=missing[0])


def _numbers(series: pd.Series, file: str, field: str) -> pd.Series:
    """A column as floats (empty cells NaN); True/False read as 1/0; anything else is a named error."""
    text = series.astype(object).map(lambda v: v.strip() if isinstance(v, str) else v)
    text = text.map(lambda v: {"true": 1.0, "false": 0.0}.get(v.lower(), v) if isinstance(v, str) else v)
    text = text.replace("", np.nan)
    values = pd.to_numeric(text, errors="coerce")
    bad = values.isna() & text.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{series.iloc[row]!r} is not a number", file=file, field=field)
    return values.astype(np.float64)


def _split_of(path: Path) -> str | None:
    """"train" or "test" when the file's name says which (LLMRouter's default_routing_test_data.jsonl)."""
    words = set(re.split(r"[^a-z]+", path.name.lower()))
    if "test" in words:
        return "test"
    if "train" in words:
        return "train"
    return None


# ---------------------------------------------------------------- layouts

def _routerbench_prompt(value) -> str:
    """RouterBench stores a prompt as the repr of a list of parts ("['Answer ...']"); their text, joined by
    newlines. ast.literal_eval reads literals only, so it runs no code."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
        if isinstance(parts, list) and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    return value


def _routerbench(frame: pd.DataFrame, file: str) -> tuple[pd.DataFrame, list[str]]:
    _require(frame, ["prompt"], file, "RouterBench")
    columns = [str(c) for c in frame.columns]
    models = [c for c in columns if c not in ROUTERBENCH_META and "|" not in c
              and (c + ROUTERBENCH_COST in columns or c + ROUTERBENCH_RESPONSE in columns)]
    if not models:
        raise DataError(f"no model columns: a RouterBench file has '<model>' and '<model>{ROUTERBENCH_COST}' "
                        f"columns (found {columns[:12]})", file=file, line=1)
    prompts = frame["prompt"].map(_routerbench_prompt)
    ids = frame["sample_id"].astype(str) if "sample_id" in columns else None
    parts = []
    for model in models:
        part = pd.DataFrame({"prompt": prompts, "target": model, "score": _numbers(frame[model], file, model)})
        if ids is not None:
            part.insert(0, "prompt_id", ids)
        if model + ROUTERBENCH_COST in columns:
            part["cost"] = _numbers(frame[model + ROUTERBENCH_COST], file, model + ROUTERBENCH_COST)
        if "eval_name" in columns:
            part["category"] = frame["eval_name"]
        parts.append(part)
    mapped = [("sample_id", "prompt_id"), ("eval_name", "category")]
    notes = [f"mapped: {', '.join(f'{a} -> {b}' for a, b in mapped if a in columns)}, prompt (a list of parts, "
             f"joined by newlines) -> prompt, <model> -> score and <model>{ROUTERBENCH_COST} -> cost for "
             f"{len(models)} models"]
    left = [c for c in columns if c.endswith(ROUTERBENCH_RESPONSE)]
    left += [c for c in columns if c not in models and c not in ("sample_id", "prompt", "eval_name") and "|" not in c]
    if left:
        shown = [c for c in left if not c.endswith(ROUTERBENCH_RESPONSE)]
        if len(shown) < len(left):
            shown.insert(0, f"<model>{ROUTERBENCH_RESPONSE}")
        notes.append(f"not carried: {', '.join(shown)}")
    return pd.concat(parts, ignore_index=True), notes


def _llm_prices(path: str | Path) -> dict[str, tuple[float, float]]:
    """{model: (USD per million input tokens, per million output)} from LLMRouter's LLM data file."""
    path = Path(path)
    if not path.is_file():
        raise DataError("LLM data file not found", file=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"not readable as JSON: {type(exc).__name__}", file=str(path)) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object of model name -> {input_price, output_price, ...}", file=str(path))
    prices = {}
    for name, entry in data.items():
        try:
            prices[str(name)] = (float(entry["input_price"]), float(entry["output_price"]))
        except (TypeError, KeyError, ValueError):
            raise DataError("needs numbers input_price and output_price (USD per million tokens)", file=str(path),
                            field=str(name)) from None
    return prices


def _llmrouter(frame: pd.DataFrame, file: str, llm_data: str | Path | None) -> tuple[pd.DataFrame, list[str]]:
    _require(frame, ["query", "model_name", "performance"], file, "LLMRouter routing data")
    columns = [str(c) for c in frame.columns]
    out = pd.DataFrame({"prompt": frame["query"], "target": frame["model_name"].astype(str),
                        "score": _numbers(frame["performance"], file, "performance")})
    mapped = ["query -> prompt", "model_name -> target", "performance -> score"]
    if "embedding_id" in columns:  # one id per unique query, shared by its rows for every model
        out.insert(0, "prompt_id", frame["embedding_id"].map(lambda v: str(int(v)) if isinstance(v, float) else str(v)))
        mapped.insert(0, "embedding_id -> prompt_id")
    if "task_name" in columns:
        out["category"] = frame["task_name"]
        mapped.append("task_name -> category")
    for column in ("input_tokens", "output_tokens"):
        if column in columns:
            out[column] = _numbers(frame[column], file, column)
            mapped.append(f"{column} -> {column}")
    notes = [f"mapped: {', '.join(mapped)}"]
    if llm_data is not None:
        prices = _llm_prices(llm_data)
        unpriced = sorted(set(out["target"]) - set(prices))
        if unpriced:
            raise DataError(f"no price for model(s) {unpriced}", file=str(llm_data))
        if "input_tokens" not in out or "output_tokens" not in out:
            raise DataError("pricing needs input_tokens and output_tokens columns", file=file)
        p_in = out["target"].map(lambda t: prices[t][0])
        p_out = out["target"].map(lambda t: prices[t][1])
        out["cost"] = (out["input_tokens"] * p_in + out["output_tokens"] * p_out) / 1e6
        notes.append(f"cost = input_tokens x input_price + output_tokens x output_price (per million tokens, from "
                     f"{Path(llm_data).name})")
    else:
        notes.append("no costs: LLMRouter's rows hold token counts; give its LLM data file (input_price, "
                     "output_price) to price them, or pass --prices when you train")
    left = [c for c in columns if c not in ("query", "model_name", "performance", "embedding_id", "task_name",
                                             "input_tokens", "output_tokens")]
    if left:
        notes.append(f"not carried: {', '.join(left)}")
    return out, notes


def _routellm(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, list[str]]:
    file = str(path)
    _require(frame, ["prompt"], file, "RouteLLM evaluation")
    columns = [str(c) for c in frame.columns]
    models = [c for c in columns if c not in ("prompt", "subject")]
    if not models:
        raise DataError("no model columns: a RouteLLM evaluation file has a True/False column per model",
                        file=file, line=1)
    stem = path.name.split(".")[0]
    ids = pd.Series([f"{stem}-{i}" for i in range(len(frame))])
    subject = frame["subject"] if "subject" in columns else None
    mapped = ["prompt -> prompt", f"row i -> prompt_id '{stem}-i'", "<model> (True/False) -> score"]
    if subject is not None:
        mapped.append("subject -> category")
    elif stem.startswith("mmlu_"):  # mmlu/responses/mmlu_<subject>.csv
        subject = pd.Series([stem[len("mmlu_"):]] * len(frame))
        mapped.append(f"the file name -> category '{stem[len('mmlu_'):]}'")
    parts = []
    for model in models:
        part = pd.DataFrame({"prompt_id": ids, "prompt": frame["prompt"], "target": model,
                             "score": _numbers(frame[model], file, model)})
        if subject is not None:
            part["category"] = subject.to_numpy()
        parts.append(part)
    notes = [f"mapped: {', '.join(mapped)} for {len(models)} models",
             "no costs: RouteLLM's files hold neither costs nor token counts; pass --prices when you train (its "
             "paper assumes gpt-4-1106-preview at $10/$30 and Mixtral-8x7B at $0.24/$0.24 per million tokens)"]
    return pd.concat(parts, ignore_index=True), notes
