"""The feedback journal: routed requests' features kept on disk for a bounded time and size, and the feedback
posted on them, joined with those features, in a durable file that `prefill-router train --feedback` reads.

Folder layout (`feedback.dir` in the gateway config):

    routed-<ns>.jsonl   one line per routed request: its id (and the upstream's OpenAI id), the targets, the
                        chosen and answering target, P and estimated cost per target, the policy, the encoder
                        identity digest, the hidden states read, and the pooled features (base64 float32).
                        Segments are closed past `segment_bytes`, and deleted once older than `retention_s` or
                        while all of them take more than `max_bytes`. A streamed reply's OpenAI id is known only
                        when the stream ends: it is added then, as a line {"alias_of": <id>, "aliases": [...]}.
    feedback.jsonl      one line per feedback: the routed line it refers to plus `score`, `target` (the target
                        whose answer was scored) and the time. Appended and fsynced; never pruned.

One writer thread does every file operation, in order, from a bounded queue: recording a routed request is a
`put_nowait` (dropped and counted when the queue is full, never waited for), and a feedback waits only for its
own line to be written. A restart reads the segments and the feedback file back (ids already scored stay
scored) and writes to a new segment.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from prefill_router.errors import DataError, PrefillRouterError

log = logging.getLogger("prefill_router.serve")

FEEDBACK_FILE = "feedback.jsonl"
SEGMENT_GLOB = "routed-*.jsonl"
PRUNE_EVERY_S = 30.0


class FeedbackRefused(PrefillRouterError):
    """A feedback the journal cannot take; `status` and `code` are what the gateway answers."""

    status, code = 400, "invalid_feedback"


class UnknownRequestId(FeedbackRefused):
    status, code = 404, "unknown_request_id"


class DuplicateFeedback(FeedbackRefused):
    status, code = 409, "duplicate_feedback"


class UnknownTarget(FeedbackRefused):
    status, code = 400, "unknown_target"


class JournalBusy(FeedbackRefused):
    status, code = 503, "journal_busy"


def unknown_id_message(request_id: str) -> str:
    return (f"id {request_id!r}: no routed request with this id is stored (unknown, expired after "
            "feedback.retention_s, another key's, or not routed by the router's scores: a pinned target or a missed "
            "routing deadline)")


def identity_digest(identity: object) -> str:
    """A short, stable digest of an encoder identity (what must match between the journal and a checkpoint)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_features(x: np.ndarray) -> dict:
    x = np.ascontiguousarray(x, dtype="<f4")
    return {"shape": list(x.shape), "x": base64.b64encode(x.tobytes()).decode("ascii")}


def decode_features(record: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(record["x"]), dtype="<f4").reshape(record["shape"])


class FeedbackJournal:
    def __init__(self, folder: str | Path, *, retention_s: float = 7 * 24 * 3600.0, max_bytes: int = 10**9,
                 segment_bytes: int = 64 * 10**6, queue_size: int = 10_000):
        self.folder = Path(folder)
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max_bytes)
        self.dropped = 0
        self.routed_stored = 0
        self.feedback_recorded = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._where: dict[str, tuple[str, int]] = {}  # request id or alias -> (segment file name, byte offset)
        self._segment_ids: dict[str, list[str]] = {}  # segment file name -> ids and aliases in it
        self._given: set[str] = set()  # request ids that have feedback
        self._segment: BinaryIO | None = None
        self._segment_name = ""
        self._segment_opened = 0.0
        self._last_prune = 0.0
        self._thread: threading.Thread | None = None

    # --- the request side (event loop): never blocks -------------------------------------------------------
    def start(self) -> FeedbackJournal:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="prefill-router-journal", daemon=True)
        self._thread.start()
        return self

    def record_routed(self, record: dict) -> bool:
        """Queue a routed request's line (see the module docstring); False when it was dropped."""
        try:
            self._queue.put_nowait(("routed", record, None))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def add_alias(self, request_id: str, alias: str) -> None:
        """Let feedback name a routed request by `alias` too: a streamed reply's OpenAI id, known only once the
        stream has been relayed, after the request's line was queued. Dropped, like a routed line, when busy."""
        try:
            self._queue.put_nowait(("alias", (request_id, alias), None))
        except queue.Full:
            self.dropped += 1

    def lookup(self, request_id: str) -> concurrent.futures.Future:
        """A future of the routed request's line (a dict), or of UnknownRequestId."""
        return self._ask("lookup", request_id)

    def feedback(self, request_id: str, score: float, target: str | None,
                 record: dict | None = None) -> concurrent.futures.Future:
        """A future of the feedback line written (a dict), or of the FeedbackRefused that says why not. `record`:
        the routed request's line when it was found elsewhere (another replica's, through shared state)."""
        return self._ask("feedback", (request_id, float(score), target, record))

    def _ask(self, kind: str, payload: object) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait((kind, payload, future))
        except queue.Full:
            future.set_exception(JournalBusy("the feedback journal is busy (its queue is full); try again"))
        return future

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued before this call is on disk."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(("flush", None, future), timeout=timeout)
        future.result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
        self._thread = None

    # --- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._resume()
        except Exception:  # a damaged folder must not stop the gateway; it is logged
            log.exception("feedback journal: cannot read %s back", self.folder)
        while True:
            try:
                op = self._queue.get(timeout=PRUNE_EVERY_S)
            except queue.Empty:
                self._maybe_prune()
                continue
            if op is None:
                break
            kind, payload, future = op
            try:
                handlers: dict[str, Callable[[Any], object]] = {
                    "routed": self._write_routed, "alias": self._write_alias, "feedback": self._write_feedback,
                    "lookup": self._read_routed, "flush": self._flush}
                result = handlers[kind](payload)
                if future is not None:
                    future.set_result(result)
            except Exception as exc:  # handed to whoever waits, or logged
                if future is not None:
                    future.set_exception(exc)
                else:
                    log.exception("feedback journal: cannot write a routed request")
        if self._segment is not None:
            self._segment.close()

    def _resume(self) -> None:
        """Read the folder back. A line that is not one of ours (cut short by a crash, or foreign) is skipped,
        and so is anything that is not a regular file; the rest resumes."""
        for path in sorted(p for p in self.folder.glob(SEGMENT_GLOB) if p.is_file()):
            ids: list[str] = []
            try:
                with open(path, "rb") as f:
                    offset = 0
                    for line in f:
                        for name, alias_of in _names_in(line):
                            if alias_of is not None:  # an alias line points at its request's line
                                self._point_alias(alias_of, name)
                                continue
                            self._where[name] = (path.name, offset)
                            ids.append(name)
                        offset += len(line)
            except OSError as exc:
                log.error("feedback journal: skipping %s: %s", path, exc)
            self._segment_ids[path.name] = ids
        feedback = self.folder / FEEDBACK_FILE
        if feedback.is_file():
            with open(feedback, "rb") as f:
                for line in f:
                    for name, alias_of in _names_in(line):
                        if alias_of is None:
                            self._given.add(name)
                            break
        self._prune()

    def _open_segment(self) -> BinaryIO:
        if self._segment is not None:
            self._segment.close()
        self._segment_name = f"routed-{time.time_ns():020d}.jsonl"
        self._segment = open(self.folder / self._segment_name, "ab")  # noqa: SIM115 - open until the next segment
        self._segment_ids[self._segment_name] = []
        self._segment_opened = time.time()
        return self._segment

    def _write_routed(self, record: dict) -> None:
        segment = self._segment
        if segment is None or segment.tell() >= self.segment_bytes or \
                time.time() - self._segment_opened > self.retention_s / 4:
            segment = self._open_segment()
            self._prune()
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        offset = segment.tell()
        segment.write(line)
        segment.flush()
        for name in [record["id"], *record.get("aliases", [])]:
            self._where[name] = (self._segment_name, offset)
            self._segment_ids[self._segment_name].append(name)
        self.routed_stored += 1
        self._maybe_prune()

    def _point_alias(self, request_id: str, alias: str) -> bool:
        where = self._where.get(request_id)
        if where is None:
            return False
        self._where[alias] = where
        self._segment_ids.setdefault(where[0], []).append(alias)  # pruned with its request's segment
        return True

    def _write_alias(self, payload: tuple[str, str]) -> None:
        request_id, alias = payload
        if alias in self._where or not self._point_alias(request_id, alias):
            return
        segment = self._segment or self._open_segment()
        segment.write(json.dumps({"alias_of": request_id, "aliases": [alias]}, separators=(",", ":")).encode()
                      + b"\n")
        segment.flush()

    def _read_routed(self, request_id: str) -> dict:
        where = self._where.get(request_id)
        if where is None:
            raise UnknownRequestId(unknown_id_message(request_id))
        name, offset = where
        try:
            with open(self.folder / name, "rb") as f:
                f.seek(offset)
                record = json.loads(f.readline())
        except (OSError, ValueError):  # the segment was pruned or damaged since
            raise UnknownRequestId(unknown_id_message(request_id)) from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise UnknownRequestId(unknown_id_message(request_id))
        return record

    def _write_feedback(self, payload: tuple[str, float, str | None, dict | None]) -> dict:
        request_id, score, target, record = payload
        record = record or self._read_routed(request_id)
        if record["id"] in self._given:
            raise DuplicateFeedback(f"id {request_id!r}: feedback for this request was already recorded")
        named = target
        target = target or record.get("answered_by") or record["chosen"]
        if named is None and target not in record["targets"]:
            raise UnknownTarget(f"id {request_id!r} was answered by {target!r}, a fallback target the router does "
                                f"not score, so this feedback cannot train it; to score another answer, name its "
                                f"target with 'target' (one of {', '.join(record['targets'])})")
        if target not in record["targets"]:
            raise UnknownTarget(f"target {target!r}: not one of the targets the router scored for this request "
                                f"({', '.join(record['targets'])})")
        line = {**record, "score": score, "target": target, "feedback_unix": time.time()}
        path = self.folder / FEEDBACK_FILE
        with open(path, "ab") as f:
            if f.tell() and not _ends_with_newline(path):
                f.write(b"\n")  # the previous run died mid-line: keep that line separate
            f.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._given.add(record["id"])
        self.feedback_recorded += 1
        return {"id": record["id"], "target": target, "score": score, "chosen": record["chosen"]}

    def _flush(self, _payload: object) -> None:
        if self._segment is not None:
            self._segment.flush()

    def _maybe_prune(self) -> None:
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
            self._prune()

    def _prune(self) -> None:
        """Delete closed segments older than retention_s, then the oldest while all take more than max_bytes."""
        self._last_prune = time.monotonic()
        closed = sorted(p for p in self.folder.glob(SEGMENT_GLOB) if p.name != self._segment_name)
        sizes = {p.name: p.stat().st_size for p in closed}
        total = sum(sizes.values()) + (self._segment.tell() if self._segment is not None else 0)
        now = time.time()
        for path in closed:
            expired = now - path.stat().st_mtime > self.retention_s
            if not expired and total <= self.max_bytes:
                continue
            total -= sizes[path.name]
            path.unlink(missing_ok=True)
            for name in self._segment_ids.pop(path.name, []):
                if self._where.get(name, ("",))[0] == path.name:
                    del self._where[name]


def _names_in(line: bytes) -> list[tuple[str, str | None]]:
    """(name, None) for a routed line's id and aliases, (alias, request id) for an alias line; [] for a line that
    is neither (torn by a crash, or not ours)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return []
    if not isinstance(record, dict):
        return []
    aliases = record.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        return []
    if "alias_of" in record:
        return [(aliases[0], record["alias_of"])] if isinstance(record["alias_of"], str) and aliases else []
    return [(name, None) for name in [record.get("id"), *aliases]] if isinstance(record.get("id"), str) else []


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


@dataclass
class FeedbackRows:
    """What `train --feedback` reads from a journal: one row per feedback."""

    ids: list[str]
    X: np.ndarray             # [N, hidden states, hidden] pooled features the router read
    target: list[str]         # the target each score is about
    score: np.ndarray         # [N] in [0, 1]
    encoder: list[str]        # identity digest of the encoder that made each row's features
    hidden_states: list[list[int] | None]
    chosen: list[str]         # what the router that served the request chose
    targets: list[list[str]]  # the targets the serving router scored, the order of `cost`
    cost: list[list[float | None]]  # its estimated USD per target


def read_feedback(path: str | Path) -> FeedbackRows:
    """The feedback lines of a journal (its folder, or its feedback.jsonl); DataError names a bad line."""
    path = Path(path)
    if path.is_dir():
        path = path / FEEDBACK_FILE
    if not path.is_file():
        raise DataError("no feedback journal here (expected the gateway's feedback.dir or its feedback.jsonl)",
                        file=str(path))
    lines = path.read_bytes().split(b"\n")
    rows: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            x = decode_features(record)
            rows.append({**record, "X": x})
        except (ValueError, KeyError, TypeError) as exc:
            if number >= len(lines) - 1:  # the last line, cut short by a crash while it was written
                continue
            raise DataError(f"not a feedback record ({type(exc).__name__}: {exc})", file=str(path),
                            line=number) from None
    if not rows:
        raise DataError("the feedback journal holds no feedback yet", file=str(path))
    shapes = {r["X"].shape for r in rows}
    if len(shapes) > 1:
        raise DataError(f"feedback rows have features of different shapes {sorted(shapes)}: they come from "
                        "different routers; train on one router's feedback at a time", file=str(path))
    return FeedbackRows(ids=[r["id"] for r in rows], X=np.stack([r["X"] for r in rows]),
                        target=[r["target"] for r in rows], score=np.array([float(r["score"]) for r in rows]),
                        encoder=[r.get("encoder", "") for r in rows],
                        hidden_states=[r.get("hidden_states") for r in rows], chosen=[r["chosen"] for r in rows],
                        targets=[r["targets"] for r in rows], cost=[r.get("estimated_cost") or [] for r in rows])
