"""The durable record of a collection run, and the routing dataset written from it.

Every finished (prompt, target) pair is appended to the journal (`<out>.journal`, JSON lines) and flushed
and fsynced before the next one is counted done, so a killed run loses at most the calls in flight. A rerun
reads the journal and skips every pair already recorded: paid calls are not repeated. A pair recorded twice
(after `--retry-failed` or a re-judge) keeps its last record.

The dataset (`<out>`) is rewritten atomically from the journal at the end of each run. It is the long
format `train` reads, one JSON object per (prompt, target):

    prompt_id, prompt, target, score, cost, input_tokens, output_tokens,
    category, answer, latency_s, attempts, error, judge, judge_error, finish_reason

A failed pair (the call failed, or the judge could not score the answer) is not a row of the dataset, so
`train` reads it as missing (NaN), never as wrong. It is listed with its reason in `<out stem>.failures.jsonl`
(same fields, `score` null) and stays in the journal; `--retry-failed` runs it again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from prefill_router.errors import DataError

DATASET_FIELDS = ("prompt_id", "prompt", "target", "score", "cost", "input_tokens", "output_tokens",
                  "category", "answer", "latency_s", "attempts", "error", "judge", "judge_error",
                  "finish_reason")

Key = tuple[str, str]  # (prompt_id, target)


def journal_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".journal")


def failures_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".failures.jsonl")


def is_labelled(record: dict) -> bool:
    """The pair has a usable score: the call succeeded and the judge scored the answer."""
    return not record.get("error") and not record.get("judge_error") and record.get("score") is not None


def _clean(value):
    # JSON has no NaN: a missing number is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Journal:
    """Append-only JSON-lines file of finished pairs. Use as a context manager, or call close()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[Key, dict] = {}
        self._fh = None

    def load(self) -> dict[Key, dict]:
        """Read existing records. A torn last line (the process died mid-write) is cut off; any other bad
        line is an error naming the line, because silently skipping it could mean paying for it twice."""
        self.records = {}
        if not self.path.exists():
            return self.records
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good_bytes = 0
        for number, raw in enumerate(lines, start=1):
            is_last = number == len(lines)
            if not raw.strip():
                good_bytes += len(raw) + (0 if is_last else 1)
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or "prompt_id" not in record or "target" not in record:
                    raise ValueError("not a record")
            except ValueError as exc:
                if is_last:  # unterminated final line: the write that was in progress when the run died
                    break
                raise DataError(f"corrupt journal record ({exc}); fix or delete that line to continue",
                                file=str(self.path), line=number) from exc
            if is_last:
                break  # complete JSON but no newline: also torn (the newline is written with the record)
            self.records[(str(record["prompt_id"]), str(record["target"]))] = record
            good_bytes += len(raw) + 1
        if good_bytes < len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(good_bytes)
                fh.flush()
                os.fsync(fh.fileno())
        return self.records

    def append(self, record: dict) -> None:
        """Write one record and make it durable before returning."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab")
        line = json.dumps({k: _clean(v) for k, v in record.items()}, ensure_ascii=False) + "\n"
        self._fh.write(line.encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records[(str(record["prompt_id"]), str(record["target"]))] = record

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_dataset(records: Iterable[dict], path: str | Path) -> int:
    """Write the long-format dataset atomically (temp file + rename); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                row = {k: _clean(record.get(k)) for k in DATASET_FIELDS}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rows
