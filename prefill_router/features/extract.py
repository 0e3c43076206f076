"""Extract features for a prompt list into a store: resumable, and a cache hit when nothing is left to do.

`extract_to_store(prompts, encoder, path)`:
- no store at `path`: create one, then compute every row;
- a store whose encoder identity and prompts match, holding the requested poolings and hidden states:
  compute only the rows not yet done (none at all for a finished store: a cache hit);
- a store made by a different encoder identity (model files, template, truncation limit), for different
  prompts, or lacking a requested pooling or hidden state: a ConfigError naming the difference, unless
  `overwrite=True`, which deletes it and starts a fresh store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from prefill_router.data.prompt import prompt_hashes
from prefill_router.errors import ConfigError, DataError
from prefill_router.features.encoder import Encoder, EncoderSpec, _as_prompt_list, _check_poolings
from prefill_router.features.store import REPAIR, FeatureSet, FeatureStore, identity_diff, is_store, remove_store
from prefill_router.features.surprise import SURPRISE

log = logging.getLogger(__name__)


def loadable_spec(spec: EncoderSpec) -> dict:
    """The encoder spec as JSON, with a local model path made absolute, so that a router trained from this
    store can load the same encoder later from another working directory."""
    data = spec.model_dump(mode="json")
    if Path(data["model"]).exists():
        data["model"] = str(Path(data["model"]).resolve())
    return data


def _mismatch(store: FeatureSet, identity: dict, hashes: list[str], wanted: dict[str, list[int]]) -> str | None:
    """Why an existing store cannot serve this request, or None when it can."""
    if store.identity != identity:
        differs = ", ".join(identity_diff(store.identity, identity))
        return f"it was made with a different encoder identity (differs in: {differs})"
    if store.prompt_hashes is None:
        return "it does not record which prompts its rows hold (import it with prompts=...)"
    if len(store.prompt_hashes) != len(hashes):
        return f"it holds {len(store.prompt_hashes)} prompts, not {len(hashes)}"
    if store.prompt_hashes != hashes:
        first = next(i for i, (a, b) in enumerate(zip(store.prompt_hashes, hashes)) if a != b)
        return f"its prompts differ from these (first difference at row {first})"
    for pooling, layers in wanted.items():
        if pooling not in store.hidden_states:
            return f"it has no {pooling!r} pooling (has {', '.join(store.poolings)})"
        missing = [layer for layer in layers if layer not in store.hidden_states[pooling]]
        if missing:
            return f"its {pooling!r} pooling lacks hidden state(s) {missing}"
    try:
        store.done, store.tokens  # noqa: B018 (read to check them)
    except DataError as exc:  # damaged: --overwrite recomputes it
        return exc.reason.removesuffix(f"; {REPAIR}")
    return None


def open_store(prompts: list, encoder: Encoder, path: Path, *, poolings: Sequence[str] | None = None,
               layers: Sequence[int] | str | None = None, dtype: str = "float16",
               overwrite: bool = False) -> FeatureStore:
    """The store at `path` for these prompts and this encoder, opened for writing: an existing store when it
    matches (identity, prompts, held layers), else a new one (replacing a mismatched one only with
    `overwrite`). Shared by the single-machine and the Ray engines."""
    identity = encoder.identity()
    hashes = prompt_hashes(prompts)
    existing = FeatureSet.open(path) if is_store(path) else None
    if existing is not None and poolings is None and layers is None:
        wanted = existing.hidden_states
    else:
        layer_ids = encoder.resolve_layers(layers)
        # The surprise pooling is held at the final state, the one its statistics read.
        wanted = {p: [encoder.num_hidden_states - 1] if p == SURPRISE else layer_ids
                  for p in _check_poolings(poolings or ("mean", "last"))}
    if existing is not None:
        reason = _mismatch(existing, identity, hashes, wanted)
        if reason is not None:
            if not overwrite:
                raise ConfigError(f"feature store {path} cannot be reused: {reason}. Pass overwrite=True "
                                  f"(--overwrite) to replace it, or choose another output folder")
            log.info("replacing feature store %s: %s", path, reason)
            remove_store(path)
            existing = None
    if existing is None:
        return FeatureStore.create(path, identity=identity, hidden_states=wanted, rows=len(prompts),
                                    hidden_size=encoder.hidden_size, dtype=dtype, prompt_hashes=hashes,
                                    extra={"template": encoder.spec.template, "max_tokens": encoder.max_tokens,
                                           "encoder_spec": loadable_spec(encoder.spec)})
    return FeatureStore.open(path)


def extract_to_store(prompts: Sequence[Any], encoder: Encoder, path: str | Path, *,
                     poolings: Sequence[str] | None = None, layers: Sequence[int] | str | None = None,
                     dtype: str = "float16", batch_tokens: int | None = None, progress: bool = True,
                     overwrite: bool = False) -> FeatureSet:
    """Features of `prompts` in the store at `path` (see the module docstring for resume and cache rules).

    poolings / layers: what to hold; None means what an existing store holds, else mean+last at every hidden
    state. The result rows follow the prompt order.
    """
    path = Path(path)
    prompts = _as_prompt_list(prompts)
    if not prompts:
        raise ConfigError("prompts: nothing to extract (empty prompt list)")
    store = open_store(prompts, encoder, path, poolings=poolings, layers=layers, dtype=dtype, overwrite=overwrite)
    todo = np.flatnonzero(~store.done)
    if len(todo) == 0:
        store.close()
        return FeatureSet.open(path)
    if len(todo) < len(prompts):
        log.info("resuming %s: %d of %d rows already done", path, len(prompts) - len(todo), len(prompts))
    fill_rows(store, encoder, [prompts[i] for i in todo], todo, batch_tokens=batch_tokens, progress=progress)
    tokens = store.tokens
    store.set_manifest_fields(truncated_rows=int((tokens > encoder.max_tokens).sum()))
    store.close()
    return FeatureSet.open(path)


class RowSink(Protocol):
    """Where `fill_rows` writes: a FeatureStore, or one shard's in-memory buffer (features/distributed.py)."""

    hidden_states: dict[str, list[int]]
    poolings: list[str]

    def write(self, rows: np.ndarray, features: dict[str, np.ndarray],
              tokens: np.ndarray | None = None) -> None: ...


def fill_rows(store: RowSink, encoder: Encoder, prompts: list, rows: np.ndarray, *,
              batch_tokens: int | None = None, progress: bool = True) -> None:
    """Compute `prompts` and write them to store rows `rows`, batch by batch (each batch is durable)."""
    union = sorted({layer for p, layers in store.hidden_states.items() if p != SURPRISE for layer in layers})
    union = union or [0]  # surprise alone: its statistics come with any forward that asks for them
    positions = {p: [0] if p == SURPRISE else [union.index(layer) for layer in store.hidden_states[p]]
                 for p in store.poolings}
    token_ids = encoder.tokenize(prompts)
    lengths = np.array([len(x) for x in token_ids], dtype=np.int32)
    for local, pooled in encoder.iter_batches(prompts, poolings=store.poolings, layers=union,
                                              batch_tokens=batch_tokens, progress=progress, token_ids=token_ids):
        store.write(rows[local], {p: pooled[p][:, positions[p]] for p in store.poolings}, tokens=lengths[local])
