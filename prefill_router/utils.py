"""Small helpers every stage uses: atomic file writes, JSON-safe values, file hashes, Markdown tables, ROC AUC.

A leaf module (it imports only the error classes), so `data`, `features`, `router`, `evaluate` and the CLI
can all share one copy of each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefill_router.errors import ConfigError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_sha256",
           "json_safe", "markdown_table", "roc_auc"]


# ----------------------------------------------------------------------------------------------------------------
# files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` only when the block ends without an error,
    so a reader (or a run that resumes after a crash) never sees a half-written file. `durable` also flushes the
    bytes to disk before the rename (what a resumable store needs to survive a power cut, not just a crash).

    The temporary name keeps the suffix (np.save adds ".npy" to a path without it) and is unique per call, so
    two writers of the same file never share one; the last to finish wins. The parent folder must exist.
    """
    path = Path(path)
    tmp = _new_file_beside(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file_beside(path: Path) -> Path:
    """A new, empty file with a unique name in `path`'s folder, created with the mode an ordinary write would give
    (0666 less the umask). tempfile.mkstemp would make it 0600, and the rename would carry that mode to `path`:
    a gateway running as another user could then not read the checkpoint it is given."""
    for _ in range(100):
        tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    """`text` as UTF-8, written atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike[str], value: Any, *, indent: int | None = 1,
                      durable: bool = False) -> Path:
    """`json_safe(value)` as strict JSON (no NaN tokens) with a final newline, written atomically."""
    text = json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n"
    return atomic_write_text(path, text, durable=durable)


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (model files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# JSON


def json_safe(value: Any) -> Any:
    """`value` with NaN and inf as None (JSON has no such numbers), numpy scalars and arrays as plain Python
    numbers and lists, tuples as lists and mapping keys as strings; anything else is returned as it is."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]], *,
                   align: str | None = None) -> list[str]:
    """The lines of a Markdown table. `align` has one letter per column, "l" or "r"; by default the first
    column is left-aligned (names) and the others right-aligned (numbers). Cells are written with str(); an
    empty one as a single space."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ConfigError(f"align {align!r} has {len(align)} letters for {len(header)} columns")

    def line(cells: Sequence[object]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [line(header), "|" + "".join("---:|" if a == "r" else "---|" for a in align)] + [line(r) for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# metrics shared by training (router) and evaluation

# The binarisation rule: a score s in [0, 1] counts as a correct answer (a positive) when s >= 0.5. Only what
# needs two classes uses it (ROC AUC, the probes' class statistics, "correct" counts); accuracy, Brier, ECE
# and the training losses take the score as it is. On 0/1 labels both readings agree.
POSITIVE_THRESHOLD = 0.5


def binarise(scores: Any) -> np.ndarray:
    """The binarisation rule as a bool array: score >= POSITIVE_THRESHOLD. NaN (not run) reads as False, so
    drop missing labels before calling this."""
    return np.asarray(scores, dtype=np.float64) >= POSITIVE_THRESHOLD


def roc_auc(labels: Any, scores: Any) -> float:
    """ROC AUC of `scores` for binary `labels` (positive by `binarise`: label >= 0.5): Mann-Whitney U /
    (n_pos * n_neg), tied scores count 1/2.

    NaN in either input drops that row. Returns NaN when only one class is present.
    """
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = ~(np.isnan(y) | np.isnan(s))
    positive, s = binarise(y[keep]), s[keep]
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks: ties count one half
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
