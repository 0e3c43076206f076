"""prefill_router.utils: the one copy of atomic writes, JSON-safe values, file hashes, Markdown tables and AUC."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat

import numpy as np
import pytest

from prefill_router.errors import ConfigError
from prefill_router.utils import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    json_safe,
    markdown_table,
    roc_auc,
)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    atomic_write_bytes(path, b"\x00\x01", durable=True)
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    # An ordinary write gives 0666 less the umask; a 0600 temporary renamed into place would hide the file from
    # a gateway that runs as another user.
    old = os.umask(umask)
    try:
        written = [atomic_write_text(tmp_path / "a.json", "{}"), atomic_write_bytes(tmp_path / "b.bin", b"x")]
        with atomic_path(tmp_path / "c.npy") as tmp:
            np.save(tmp, np.arange(3))
    finally:
        os.umask(old)
    for path in [*written, tmp_path / "c.npy"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "counts.npy"
    np.save(path, np.arange(3))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            assert tmp.suffix == ".npy" and tmp.parent == tmp_path   # np.save would add .npy to any other name
            np.save(tmp, np.arange(5))
            raise RuntimeError("disk full")
    assert np.load(path).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["counts.npy"]


def test_json_safe_makes_strict_json():
    value = {"nan": float("nan"), 1: np.float32(0.5), "inf": np.float64(-np.inf), "n": np.int64(3),
             "b": np.bool_(True), "arr": np.array([1.0, np.nan]), "t": (1, "x"), "s": "text", "none": None}
    safe = json_safe(value)
    assert safe == {"nan": None, "1": 0.5, "inf": None, "n": 3, "b": True, "arr": [1.0, None], "t": [1, "x"],
                    "s": "text", "none": None}
    assert type(safe["n"]) is int and type(safe["b"]) is bool
    json.dumps(safe, allow_nan=False)  # would raise on a NaN left behind


def test_atomic_write_json_is_strict_and_ends_with_a_newline(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"auc": float("nan"), "x": np.float64(0.25)})
    text = path.read_text()
    assert text.endswith("}\n") and "NaN" not in text
    assert json.loads(text) == {"auc": None, "x": 0.25}


def test_file_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # several chunks at a small chunk size
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path, chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


def test_markdown_table():
    lines = markdown_table(["", "acc", "cost"], [["router", "71.2%", 0.5], ["best single", "70.0%", 1]])
    assert lines == ["| | acc | cost |", "|---|---:|---:|", "| router | 71.2% | 0.5 |", "| best single | 70.0% | 1 |"]
    assert markdown_table(["a", "b"], [], align="ll") == ["| a | b |", "|---|---|"]
    with pytest.raises(ConfigError, match="align"):
        markdown_table(["a", "b"], [], align="l")


def test_roc_auc_by_hand():
    # positives score 0.9 and 0.4, negatives 0.4 and 0.1: pairs won 1 + 1 + 0.5 (tie) + 1 of 4
    assert roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert roc_auc([1, np.nan, 0], [0.2, 0.9, 0.8]) == 0.0   # the unlabelled row is dropped
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))             # one class: undefined
