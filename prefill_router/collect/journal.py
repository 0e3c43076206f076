"""The durable record of a collection run, and the routing dataset written from it.

Every finished (prompt, target) pair is appended to the journal (`<out>.journal`, JSON lines), flushed and
fsynced before it is counted done, so a killed run loses at most the calls in flight. Records finishing
while an fsync runs share the next one (`GroupCommit`), which keeps fsync off the event loop's critical path. A rerun
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

import asyncio
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from prefill_router.errors import DataError
from prefill_router.utils import atomic_path, json_safe

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


def json_line(record: dict) -> str:
    """One JSON line, readable UTF-8 where possible. Text that UTF-8 cannot hold (a lone surrogate, e.g. a bad
    prompt recorded as a failure) is written \\u-escaped instead, so the record is still written and reads back."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


class Journal:
    """Append-only JSON-lines file of finished pairs. Use as a context manager, or call close()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[Key, dict] = {}
        self._fh = None
        self._lock = threading.Lock()

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
                    raise DataError("not a record")
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
        self.append_many([record])

    def append_many(self, records: list[dict]) -> None:
        """Write records and make them durable (one fsync for all) before returning. Thread-safe."""
        data = b"".join(json_line({k: json_safe(v) for k, v in r.items()}).encode() for r in records)
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("ab")
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            for r in records:
                self.records[(str(r["prompt_id"]), str(r["target"]))] = r

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GroupCommit:
    """Durable appends from asyncio code without blocking the event loop on fsync.

    `await commit.append(record)` returns once the record is on disk. Records that arrive while an fsync
    is running are written together by the next one, so many concurrent workers share each fsync.
    """

    def __init__(self, journal: Journal):
        self.journal = journal
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def append(self, record: dict) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # shield: a worker cancelled while waiting does not stop the write of its record
        await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self.journal.append_many, [record for record, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                raise
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def drain(self) -> None:
        """Wait until every record handed over so far is written (errors were already raised to writers)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])


def write_dataset(records: Iterable[dict], path: str | Path) -> int:
    """Write the long-format dataset atomically (temp file + rename); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with atomic_path(path, durable=True) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json_line({k: json_safe(record.get(k)) for k in DATASET_FIELDS}))
            rows += 1
    return rows
