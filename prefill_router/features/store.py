"""The on-disk feature store: pooled hidden states per prompt, written so that a killed run can resume.

A store is a folder:

    manifest.json   format, encoder identity, poolings and the hidden states each holds, rows, hidden size,
                    dtype, one hash per prompt
    <pooling>.npy   [rows, hidden states, hidden] float16 or float32, memory-mapped
    done.npy        bool [rows]: rows whose features are written
    tokens.npy      int32 [rows]: templated prompt length before truncation (0 where unknown)

Crash safety: a batch's rows are written into the memory-mapped arrays and flushed to disk first; only then
is `done` updated, by writing a new done.npy and renaming it over the old one (an atomic step). A run killed at
any point leaves `done` true only for rows whose data is on disk, so resuming never recomputes a finished row
and never trusts a half-written one. The manifest is written last when a store is created, so a folder without
one holds no finished rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from prefill_router.errors import ConfigError, DataError, read_json_object
from prefill_router.features.surprise import pooling_width
from prefill_router.utils import atomic_path, atomic_write_json

STORE_FORMAT = "prefill-router-features"
STORE_VERSION = 1
STORE_DTYPES = ("float16", "float32")
MANIFEST = "manifest.json"
# How to recover a store whose done or tokens array is damaged: which rows hold features is then unknown.
REPAIR = "run `prefill-router extract` again with --overwrite to recompute every row"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, durable=True) as tmp:
        np.save(tmp, array, allow_pickle=False)


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class FeatureSet:
    """Read access to a feature store. `get(pooling, layers)` returns float32 [rows, layers, hidden].

    Rows where `done` is False hold zeros; select `fs.done` rows (or check `fs.complete`) before using them.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.identity: dict = manifest["identity"]
        self.hidden_states: dict[str, list[int]] = {k: list(v) for k, v in manifest["hidden_states"].items()}
        self.poolings: list[str] = list(self.hidden_states)
        self.n: int = int(manifest["rows"])
        self.hidden_size: int = int(manifest["hidden_size"])
        self.dtype: str = manifest["dtype"]
        self.prompt_hashes: list[str] | None = manifest.get("prompt_hashes")

    @classmethod
    def open(cls, path: str | Path) -> Self:
        path = Path(path)
        manifest_path = path / MANIFEST
        manifest = read_json_object(manifest_path, missing="not a feature store (no manifest.json)",
                                    invalid="corrupt manifest")
        if manifest.get("format") != STORE_FORMAT:
            raise DataError(f"not a feature store manifest (format {manifest.get('format')!r})",
                            file=str(manifest_path), field="format")
        for key in ("identity", "hidden_states", "rows", "hidden_size", "dtype"):
            if key not in manifest:
                raise DataError("missing field", file=str(manifest_path), field=key)
        fs = cls(path, manifest)
        for pooling in fs.poolings:
            array = fs._array(pooling)
            expected = (fs.n, len(fs.hidden_states[pooling]), pooling_width(pooling, fs.hidden_size))
            if array.shape != expected:
                raise DataError(f"array shape {array.shape} does not match the manifest {expected}",
                                file=str(path / f"{pooling}.npy"))
        return fs

    def _array(self, pooling: str, mode: Literal["r", "r+"] = "r") -> np.memmap:
        file = self.path / f"{pooling}.npy"
        try:
            array: np.memmap = np.load(file, mmap_mode=mode, allow_pickle=False)
            return array
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read feature array: {exc}", file=str(file)) from None

    @property
    def done(self) -> np.ndarray:
        """bool [rows], read from disk each time (a writer may be filling the store)."""
        return self._vector("done.npy", np.bool_, "which rows are finished is unknown")

    @property
    def tokens(self) -> np.ndarray:
        if not (self.path / "tokens.npy").is_file():
            return np.zeros(self.n, dtype=np.int32)
        return self._vector("tokens.npy", np.integer, "prompt lengths are unknown")

    def _vector(self, name: str, kind: type, loss: str) -> np.ndarray:
        """One of the store's [rows] arrays; a damaged one (truncated, pickled, the wrong shape or type) is a
        DataError that says how to recover. Never unpickled: loading a store must not run code."""
        file = self.path / name
        try:
            array: np.ndarray = np.load(file, allow_pickle=False)
            problem = None
            if array.shape != (self.n,) or not np.issubdtype(array.dtype, kind):
                problem = f"holds {array.dtype} {array.shape}, expected {np.dtype(kind).name} ({self.n},)"
        except FileNotFoundError:
            problem = "is missing"
        except (OSError, ValueError, EOFError) as exc:  # truncated, pickled, or not a .npy file at all
            problem = f"cannot be read ({exc})"
        if problem is None:
            return array
        raise DataError(f"{name} {problem}, so {loss}; {REPAIR}", file=str(file))

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def rows_of(self, prompts: Sequence, *, missing_ok: bool = False) -> np.ndarray:
        """The store row of each prompt, matched by prompt hash, so a dataset subset (--limit, --sample, a
        target subset) reads the right rows of a store extracted for the whole dataset or for that subset.
        The k-th copy of a repeated prompt maps to the k-th stored copy when there is one. A prompt the store
        lacks is a ConfigError, or row -1 with `missing_ok` (comparing stores that hold different prompts)."""
        from prefill_router.data.prompt import prompt_hashes

        wanted = prompt_hashes(prompts)
        if self.prompt_hashes is None:  # an imported store without hashes: rows are positional
            if len(wanted) > self.n and not missing_ok:
                raise ConfigError(f"the feature store {self.path} holds {self.n} rows but {len(wanted)} prompts "
                                  f"were asked for")
            return np.where(np.arange(len(wanted)) < self.n, np.arange(len(wanted)), -1)
        where: dict[str, list[int]] = {}
        for row, h in enumerate(self.prompt_hashes):
            where.setdefault(h, []).append(row)
        seen: dict[str, int] = {}
        rows = np.empty(len(wanted), dtype=np.int64)
        for i, h in enumerate(wanted):
            stored = where.get(h)
            if stored is None and missing_ok:
                rows[i] = -1
                continue
            if stored is None:
                missing = sum(1 for x in wanted if x not in where)
                raise ConfigError(f"the feature store {self.path} lacks {missing} of the {len(wanted)} prompts "
                                  f"(first: row {i}); extract the same dataset with the same --limit/--sample")
            k = seen.get(h, 0)
            rows[i] = stored[min(k, len(stored) - 1)]
            seen[h] = k + 1
        return rows

    def layers_index(self, pooling: str, layers: Sequence[int] | None = None) -> list[int]:
        """Positions in the stored array of the requested hidden-state indices."""
        if pooling not in self.hidden_states:
            raise ConfigError(f"pooling {pooling!r} not in this feature set (has {', '.join(self.poolings)})")
        held = self.hidden_states[pooling]
        if layers is None:
            return list(range(len(held)))
        missing = [layer for layer in layers if layer not in held]
        if missing:
            raise ConfigError(f"hidden state(s) {missing} not stored for pooling {pooling!r} (holds {held})")
        return [held.index(layer) for layer in layers]

    def get(self, pooling: str, layers: Sequence[int] | None = None,
            rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 [rows, len(layers), hidden]; layers are hidden-state indices (0 = embeddings)."""
        idx = self.layers_index(pooling, layers)
        array: np.ndarray = self._array(pooling)
        if rows is not None:
            rows = np.asarray(rows)
            array = array[np.flatnonzero(rows) if rows.dtype == bool else rows]
        return np.asarray(array[:, idx] if idx != list(range(array.shape[1])) else array, dtype=np.float32)

    def __repr__(self) -> str:
        done = self.done
        return (f"FeatureSet({str(self.path)!r}, rows={self.n}, done={int(done.sum())}, "
                f"hidden_states={self.hidden_states}, dtype={self.dtype}, encoder={self.identity.get('model')!r})")


class FeatureStore(FeatureSet):
    """A feature set opened for writing rows."""

    @classmethod
    def create(cls, path: str | Path, *, identity: dict, hidden_states: dict[str, list[int]], rows: int,
               hidden_size: int, dtype: str = "float16", prompt_hashes: list[str] | None = None,
               extra: dict | None = None) -> FeatureStore:
        """A new empty store (nothing done). Refuses to write into an existing store or a non-empty folder
        that is not one (so it never deletes a user's files)."""
        path = Path(path)
        if dtype not in STORE_DTYPES:
            raise ConfigError(f"dtype: {dtype!r} is not a store dtype ({', '.join(STORE_DTYPES)})")
        if prompt_hashes is not None and len(prompt_hashes) != rows:
            raise DataError(f"{len(prompt_hashes)} prompt hashes for {rows} rows")
        if path.exists() and any(path.iterdir()) and not is_store(path) and not _only_store_files(path):
            raise ConfigError(f"output folder {path} exists and is not a feature store; choose an empty folder")
        if is_store(path):
            raise ConfigError(f"{path} already holds a feature store")
        path.mkdir(parents=True, exist_ok=True)
        for pooling, layers in hidden_states.items():
            array = np.lib.format.open_memmap(path / f"{pooling}.npy", mode="w+", dtype=dtype,
                                              shape=(rows, len(layers), pooling_width(pooling, hidden_size)))
            array.flush()
            del array
        _save_npy_atomic(path / "tokens.npy", np.zeros(rows, dtype=np.int32))
        _save_npy_atomic(path / "done.npy", np.zeros(rows, dtype=bool))
        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "identity": identity,
                    "hidden_states": {k: list(map(int, v)) for k, v in hidden_states.items()},
                    "rows": int(rows), "hidden_size": int(hidden_size), "dtype": dtype,
                    **(extra or {}), "prompt_hashes": prompt_hashes}
        atomic_write_json(path / MANIFEST, manifest, durable=True)  # last: its presence means the store is whole
        return cls.open(path)

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, manifest)
        self._done = self.done
        self._tokens = self.tokens
        self._arrays: dict[str, np.memmap] = {p: self._array(p, mode="r+") for p in self.poolings}

    def write(self, rows: np.ndarray, features: dict[str, np.ndarray], tokens: np.ndarray | None = None) -> None:
        """Write finished rows: data first (flushed), then the done mask. `features[pooling]` is
        [len(rows), stored layers, hidden]."""
        rows = np.asarray(rows, dtype=np.int64)
        for pooling in self.poolings:
            values = np.asarray(features[pooling]).astype(self.dtype)
            if not np.isfinite(values).all():
                raise DataError(f"non-finite features for pooling {pooling!r} (overflow in {self.dtype}? "
                                f"use dtype float32)", file=str(self.path))
            self._arrays[pooling][rows] = values
            self._arrays[pooling].flush()
        if tokens is not None:
            self._tokens[rows] = tokens
            _save_npy_atomic(self.path / "tokens.npy", self._tokens)
        self._done[rows] = True
        _save_npy_atomic(self.path / "done.npy", self._done)

    def set_manifest_fields(self, **fields: Any) -> None:
        self.manifest.update(fields)
        atomic_write_json(self.path / MANIFEST, self.manifest, durable=True)

    def close(self) -> None:
        for array in self._arrays.values():
            array.flush()
        self._arrays = {}


def _only_store_files(path: Path) -> bool:
    """True for a folder left by a store creation that died before its manifest: only arrays, no data done."""
    return all(p.suffix == ".npy" or p.name.endswith(".tmp") for p in path.iterdir())


def remove_store(path: str | Path) -> None:
    """Delete a feature store folder (only if it is one)."""
    path = Path(path)
    if path.exists():
        if not is_store(path) and not _only_store_files(path):
            raise ConfigError(f"refusing to delete {path}: not a feature store")
        shutil.rmtree(path)


def identity_diff(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two identities (for error messages)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
