"""Feature extraction scaled out on Ray Data: an actor pool of encoder workers, sharded and resumable.

    from prefill_router.features.distributed import extract_to_store_ray
    run = extract_to_store_ray(prompts, "smollm2-135m", "runs/feats", actors=4, shard_size=1000)
    X = run.features.get("mean", layers=[18])   # the FeatureSet the single-machine engine writes too

Ray is optional: `pip install 'prefill-router[ray]'`. `ray.init()` starts a local cluster on a laptop; with
RAY_ADDRESS set (or `address=`) the run joins that cluster. Every node needs this package and the encoder
files (a built-in alias, a hub id its nodes can reach, or a path present on every node).

Design: one reader API. The output folder is an ordinary feature store (see store.py), so `probe`, `train`
and `evaluate` read it unchanged. The sharded run adds a `shards/` folder inside it:

    shards/plan.json                 shard size and shard count, written once when the sharded run starts
    shards/rows.npy                  int64: the store rows the plan covers (those not done at plan time)
    shards/shard-000007.safetensors  shard 7 = plan rows [7 S, 8 S): one tensor per pooling
                                     [n, hidden states, hidden] in the store dtype, `tokens` int32 [n],
                                     `rows` int64 [n]; its metadata names the store layout and prompts

How a run goes:
1. The driver opens or creates the store with the identity and prompt checks of `extract_to_store`. It reads
   the encoder's identity and shape from its config and tokenizer only: the driver never loads weights.
2. Each shard without a valid file becomes one dataset row (its rows and prompts) and goes through
   `map_batches` to an actor pool of `ShardEncoder`s (one per GPU, or N on CPU nodes). An actor loads the
   encoder once and computes a shard with the single-machine code (`fill_rows`: the same templating,
   truncation, token-budget batching and pooling), then returns the shard as safetensors bytes. Workers only
   compute, so nodes need no shared filesystem.
3. The driver writes each shard file (atomic rename), then copies its rows into the store (data first, then
   the done mask, as the single-machine engine does).

Resume is per shard: a shard is finished when its file exists and is valid. After a restart only shards
without one are computed; shards whose file was written but whose rows did not reach the store are copied
without computing. Shard files are authoritative for the rows of the plan: delete one and the next run
recomputes exactly that shard. The shards hold a second copy of the features; deleting the whole `shards/`
folder after a finished run is safe (the store is complete, so the next run is a cache hit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from prefill_router.errors import ConfigError, DataError, EncoderError, PrefillRouterError
from prefill_router.features.encoder import Encoder, EncoderSpec, _as_prompt_list, converted_gguf_folder, resolve
from prefill_router.features.extract import fill_rows, open_store
from prefill_router.features.store import FeatureSet, FeatureStore
from prefill_router.features.surprise import pooling_width
from prefill_router.features.template import as_messages
from prefill_router.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

RAY_MISSING = "the Ray engine needs Ray: pip install 'prefill-router[ray]'"
SHARDS_DIR = "shards"
DEFAULT_SHARD_SIZE = 1000
# CPU threads per actor when actors run on CPU and nothing else is said: enough for efficient matmuls, few
# enough that a node holds several actors.
CPU_THREADS_PER_ACTOR = 4


def require_ray() -> ModuleType:
    """Import Ray, or raise a ConfigError that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


# ----------------------------------------------------------------------------------------------------------
# The encoder's shape without its weights


def describe_encoder(spec: EncoderSpec | Encoder | str | Path | dict | None = None, **overrides: Any) -> Encoder:
    """An Encoder whose weights live on the meta device (no memory): identity, hidden size, number of hidden
    states, context length and layer checks are those of the real encoder; it cannot encode. Arguments as
    for `load_encoder`."""
    if isinstance(spec, Encoder):
        return spec
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    spec = EncoderSpec.parse(spec, **overrides)
    resolved = resolve(spec)
    folder = converted_gguf_folder(resolved) if resolved.gguf_file is not None else resolved.folder
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as exc:
        raise EncoderError(f"could not read the config and tokenizer of {spec.model!r} from {folder}: "
                           f"{exc}") from exc
    return Encoder(spec, tokenizer, model, resolved)


# ----------------------------------------------------------------------------------------------------------
# Shards


class ShardBuffer:
    """An in-memory stand-in for a FeatureStore holding one shard, so `fill_rows` fills it unchanged."""

    def __init__(self, hidden_states: dict[str, list[int]], rows: int, hidden_size: int, dtype: str):
        self.hidden_states = hidden_states
        self.poolings = list(hidden_states)
        self.dtype = dtype
        self.arrays = {p: np.zeros((rows, len(layers), pooling_width(p, hidden_size)), dtype=dtype)
                       for p, layers in hidden_states.items()}
        self.tokens = np.zeros(rows, dtype=np.int32)
        self.filled = np.zeros(rows, dtype=bool)

    def write(self, rows: np.ndarray, features: dict[str, np.ndarray],
              tokens: np.ndarray | None = None) -> None:
        for pooling in self.poolings:
            values = np.asarray(features[pooling]).astype(self.dtype)
            if not np.isfinite(values).all():
                raise DataError(f"non-finite features for pooling {pooling!r} (overflow in {self.dtype}? "
                                f"use dtype float32)")
            self.arrays[pooling][rows] = values
        if tokens is not None:
            self.tokens[rows] = tokens
        self.filled[rows] = True


def _layout(store: FeatureSet) -> str:
    """What a shard must match to belong to a store: encoder identity, hidden states, size and dtype."""
    layout = {"identity": store.identity, "hidden_states": store.hidden_states,
              "hidden_size": store.hidden_size, "dtype": store.dtype, "rows": store.n}
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def _prompts_key(store: FeatureSet, rows: np.ndarray) -> str:
    hashes = store.prompt_hashes or []
    return hashlib.sha256("".join(hashes[i] for i in rows).encode()).hexdigest()


@dataclass
class Plan:
    """The shards of a sharded run: shard k covers store rows `rows[k * size:(k + 1) * size]`."""

    folder: Path
    size: int
    rows: np.ndarray

    @property
    def count(self) -> int:
        return -(-len(self.rows) // self.size)

    def shard_rows(self, k: int) -> np.ndarray:
        return self.rows[k * self.size:(k + 1) * self.size]

    def file(self, k: int) -> Path:
        return self.folder / f"shard-{k:06d}.safetensors"


def _open_plan(store: FeatureSet, shard_size: int | None) -> Plan:
    """The store's shard plan; made (over the rows not done yet) when the store has none."""
    folder = store.path / SHARDS_DIR
    plan_file = folder / "plan.json"
    if plan_file.is_file():
        try:
            plan = json.loads(plan_file.read_text())
            rows = np.load(folder / "rows.npy", allow_pickle=False)
            size = int(plan["shard_size"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"unreadable shard plan ({exc}); delete {folder} to start the sharded run afresh",
                            file=str(plan_file)) from None
        if plan.get("layout") != _layout(store) or rows.ndim != 1 or (len(rows) and rows.max() >= store.n):
            raise DataError(f"the shard plan does not belong to this store; delete {folder}",
                            file=str(plan_file))
        if shard_size is not None and shard_size != size:
            raise ConfigError(f"shard_size: {shard_size} differs from the {size} of the unfinished sharded "
                              f"run in {folder}; omit it (--shard-size) or delete {folder}")
        return Plan(folder, size, rows)
    size = shard_size or DEFAULT_SHARD_SIZE
    rows = np.flatnonzero(~store.done).astype(np.int64)
    folder.mkdir(exist_ok=True)
    np.save(folder / "rows.npy", rows, allow_pickle=False)
    plan = {"shard_size": size, "shards": -(-len(rows) // size), "layout": _layout(store)}
    atomic_write_json(plan_file, plan)  # last: the plan exists only once rows.npy is whole
    return Plan(folder, size, rows)


def _shard_metadata(layout: str, prompts_key: str, shard: int) -> dict[str, str]:
    return {"format": "prefill-router-feature-shard", "layout": layout, "prompts": prompts_key,
            "shard": str(shard)}


def _valid_shard(path: Path, expected: dict[str, str], store: FeatureSet, rows: int) -> bool:
    """True when the file holds this shard of this store (header only: cheap for many large shards)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="numpy") as f:
            if f.metadata() != expected:
                return False
            for pooling, layers in store.hidden_states.items():
                width = pooling_width(pooling, store.hidden_size)
                if tuple(f.get_slice(pooling).get_shape()) != (rows, len(layers), width):
                    return False
            return tuple(f.get_slice("rows").get_shape()) == (rows,)
    except Exception as exc:  # a damaged file is recomputed, not trusted
        log.warning("ignoring damaged shard %s: %s: %s", path.name, type(exc).__name__, exc)
        return False


def _assemble(store: FeatureStore, path: Path, rows: np.ndarray) -> None:
    """Copy one shard file into the store."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    if not np.array_equal(tensors["rows"], rows):
        raise DataError("shard rows differ from the shard plan; delete this file to recompute it",
                        file=str(path))
    store.write(rows, {p: tensors[p] for p in store.poolings}, tokens=tensors["tokens"])


# ----------------------------------------------------------------------------------------------------------
# The actor


class ShardEncoder:
    """Ray Data callable class: loads the encoder once per actor, then turns shard rows into shard bytes.

    Input batch columns: `shard` (int), `rows` and `prompts` (JSON text), `metadata` (JSON text).
    Output columns: `shard`, `data` (a safetensors file as bytes), `seconds`.
    """

    def __init__(self, spec: dict, identity: dict, hidden_states: dict[str, list[int]], hidden_size: int,
                 dtype: str, batch_tokens: int | None, threads: int | None):
        import torch

        from prefill_router.features.encoder import load_encoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = load_encoder(EncoderSpec(**spec))
        if self.encoder.identity() != identity:
            import socket

            raise EncoderError(f"the encoder on worker {socket.gethostname()} differs from the driver's "
                               f"(its files or template differ): {self.encoder.identity()} != {identity}")
        self.hidden_states, self.hidden_size, self.dtype = hidden_states, hidden_size, dtype
        self.batch_tokens = batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from safetensors.numpy import save

        blobs, seconds = [], []
        for rows_json, prompts_json, metadata_json in zip(batch["rows"], batch["prompts"], batch["metadata"],
                                                          strict=True):
            started = time.perf_counter()
            rows = np.asarray(json.loads(rows_json), dtype=np.int64)
            prompts = json.loads(prompts_json)
            buffer = ShardBuffer(self.hidden_states, len(rows), self.hidden_size, self.dtype)
            fill_rows(buffer, self.encoder, prompts, np.arange(len(rows)), batch_tokens=self.batch_tokens,
                      progress=False)
            if not buffer.filled.all():
                raise EncoderError(f"shard {json.loads(metadata_json)['shard']}: rows left unfilled")
            tensors = {**buffer.arrays, "tokens": buffer.tokens, "rows": rows}
            blobs.append(save(tensors, metadata=json.loads(metadata_json)))
            seconds.append(time.perf_counter() - started)
        return {"shard": np.asarray(batch["shard"]), "data": np.array(blobs, dtype=object),
                "seconds": np.asarray(seconds)}


# ----------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class ShardedRun:
    """What a sharded run did. `features` is the finished (or, after a failure, partial) store."""

    features: FeatureSet
    shards: int = 0                                     # shards in the plan
    computed: list[int] = field(default_factory=list)   # shard ids computed by this run
    assembled: int = 0                                  # shards copied into the store by this run
    actors: int = 0
    seconds: float = 0.0                                # wall time of the call
    compute_seconds: float = 0.0                        # summed time actors spent computing shards


def _connect(address: str | None, num_cpus: int | None) -> tuple[ModuleType, bool]:
    """Ray, initialised: the caller's session if one is open, else `address`/RAY_ADDRESS, else a local
    cluster. Returns (ray, started_here)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)  # a local cluster, just for this run
    ray.init(address=address, **kwargs)
    return ray, True


def _actor_resources(ray: ModuleType, spec: EncoderSpec, actors: int | None, cpus_per_actor: float | None,
                     gpus_per_actor: float | None) -> tuple[int, float, float, int | None]:
    """(actors, CPUs per actor, GPUs per actor, torch threads): one actor per GPU when the cluster has GPUs
    and the encoder may use them, else actors sharing the cluster's CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    # An actor lives on one node: asking for more than the largest node has would wait forever.
    node_cpus = max([float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 and not spec.device.startswith(("cpu", "mps")) else 0.0
    if gpus_per_actor > gpus:
        raise ConfigError(f"gpus_per_actor: {gpus_per_actor} GPU(s) per actor, but the Ray cluster has "
                          f"{gpus:g}")
    if gpus_per_actor > 0:
        actors = actors or max(1, int(gpus // gpus_per_actor))
        threads = None
    else:
        if actors is None:
            actors = max(1, int(cpus // min(cpus_per_actor or CPU_THREADS_PER_ACTOR, node_cpus)))
        cpus_per_actor = cpus_per_actor or min(node_cpus, max(1.0, float(int(cpus // actors))))
        threads = max(1, int(cpus_per_actor))
    cpus_per_actor = cpus_per_actor or 1.0
    if cpus_per_actor > node_cpus:
        raise ConfigError(f"cpus_per_actor: {cpus_per_actor:g} CPUs per actor, but the largest Ray node has "
                          f"{node_cpus:g}")
    return actors, cpus_per_actor, gpus_per_actor, threads


def extract_to_store_ray(prompts: Sequence[Any], encoder: EncoderSpec | Encoder | str | Path | dict,
                         path: str | Path, *, actors: int | None = None, shard_size: int | None = None,
                         poolings: Sequence[str] | None = None, layers: Sequence[int] | str | None = None,
                         dtype: str = "float16", batch_tokens: int | None = None, progress: bool = True,
                         overwrite: bool = False, address: str | None = None, num_cpus: int | None = None,
                         cpus_per_actor: float | None = None,
                         gpus_per_actor: float | None = None) -> ShardedRun:
    """`extract_to_store` on a Ray cluster (see the module docstring for shards and resume).

    encoder: an EncoderSpec, a name or folder, or a loaded Encoder (only its spec travels to the workers).
    actors: encoder workers (default: one per GPU; on CPU clusters one per 4 CPUs).
    shard_size: prompts per shard (default 1000; fixed once a sharded run has started in `path`).
    address: a Ray cluster to join (default: the open Ray session, RAY_ADDRESS, else a local cluster with
    `num_cpus` CPUs, shut down at the end).
    """
    require_ray()  # before any work: say how to install it
    started = time.perf_counter()
    path = Path(path)
    prompts = _as_prompt_list(prompts)
    if not prompts:
        raise ConfigError("prompts: nothing to extract (empty prompt list)")
    if shard_size is not None and shard_size <= 0:
        raise ConfigError(f"shard_size: must be a positive number of prompts, got {shard_size}")
    if actors is not None and actors <= 0:
        raise ConfigError(f"actors: must be a positive number of workers, got {actors}")
    shape = describe_encoder(encoder)  # a loaded Encoder serves as is
    # Bad prompts are named here, before any worker starts (workers would fail on them one shard at a time).
    for row, prompt in enumerate(prompts):
        as_messages(prompt, row)
    shape.tokenize(prompts[:1])  # e.g. a chat template the tokenizer lacks
    store = open_store(prompts, shape, path, poolings=poolings, layers=layers, dtype=dtype, overwrite=overwrite)
    try:
        if store.complete and not (path / SHARDS_DIR / "plan.json").is_file():
            return ShardedRun(FeatureSet.open(path), seconds=time.perf_counter() - started)  # cache hit
        run = _run_plan(store, prompts, shape, actors=actors, shard_size=shard_size,
                        batch_tokens=batch_tokens, progress=progress, address=address, num_cpus=num_cpus,
                        cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
        store.set_manifest_fields(truncated_rows=int((store.tokens > shape.max_tokens).sum()))
    finally:
        store.close()
    run.features = FeatureSet.open(path)
    run.seconds = time.perf_counter() - started
    return run


def _run_plan(store: FeatureStore, prompts: list, shape: Encoder, *, actors: int | None, shard_size: int | None,
              batch_tokens: int | None, progress: bool, address: str | None, num_cpus: int | None,
              cpus_per_actor: float | None, gpus_per_actor: float | None) -> ShardedRun:
    plan = _open_plan(store, shard_size)
    layout = _layout(store)
    done = store.done
    run = ShardedRun(store, shards=plan.count)
    todo: list[tuple[int, np.ndarray, dict[str, str]]] = []
    for k in range(plan.count):
        rows = plan.shard_rows(k)
        metadata = _shard_metadata(layout, _prompts_key(store, rows), k)
        if _valid_shard(plan.file(k), metadata, store, len(rows)):
            if not done[rows].all():  # written by an earlier run that stopped before copying it
                _assemble(store, plan.file(k), rows)
                run.assembled += 1
        else:
            todo.append((k, rows, metadata))
    if not todo:
        return run
    if len(todo) < plan.count:
        log.info("resuming %s: %d of %d shards already done", store.path, plan.count - len(todo), plan.count)
    ray, started_here = _connect(address, num_cpus)
    try:
        n_actors, cpus, gpus, threads = _actor_resources(ray, shape.spec, actors, cpus_per_actor,
                                                         gpus_per_actor)
        n_actors = min(n_actors, len(todo))
        run.actors = n_actors
        items = [{"shard": k, "rows": json.dumps(rows.tolist()), "metadata": json.dumps(metadata),
                  "prompts": json.dumps([prompts[i] for i in rows], ensure_ascii=False)}
                 for k, rows, metadata in todo]
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our own bar counts prompts
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEncoder, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs={"spec": shape.spec.model_dump(), "identity": shape.identity(),
                                   "hidden_states": store.hidden_states, "hidden_size": store.hidden_size,
                                   "dtype": store.dtype, "batch_tokens": batch_tokens, "threads": threads})
        rows_of = {k: rows for k, rows, _ in todo}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(r) for r in rows_of.values()), unit="prompt",
                       desc=f"prefill on {n_actors} Ray actor{'s' * (n_actors > 1)}", dynamic_ncols=True)
        try:
            for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
                for k, data, seconds in zip(batch["shard"], batch["data"], batch["seconds"], strict=True):
                    k = int(k)
                    run.compute_seconds += float(seconds)
                    atomic_write_bytes(plan.file(k), bytes(data), durable=True)
                    _assemble(store, plan.file(k), rows_of[k])
                    run.computed.append(k)
                    run.assembled += 1
                    if bar is not None:
                        bar.update(len(rows_of[k]))
        except PrefillRouterError:
            raise
        except Exception as exc:
            # Ray wraps a worker's exception (several times); name our own error when it is one.
            cause = _our_cause(exc)
            reason = str(cause) if cause is not None else f"{type(exc).__name__}: {exc}"
            raise EncoderError(f"the Ray extraction failed after {len(run.computed)} of {len(todo)} shards "
                               f"(finished shards are kept; rerun to resume): {reason}") from exc
        finally:
            if bar is not None:
                bar.close()
    finally:
        if started_here:
            ray.shutdown()
    return run


def _our_cause(exc: BaseException) -> PrefillRouterError | None:
    """The first PrefillRouterError in the chain of causes Ray builds around a worker's exception."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, PrefillRouterError):
            return link
        seen.add(id(link))
        link = getattr(link, "cause", None) or link.__cause__ or link.__context__
    return None
