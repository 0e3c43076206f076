"""`prefill-router data`: validate a routing data file, print its statistics, or import another project's layout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from prefill_router.cli.common import (
    COLUMN_OPTIONS,
    DATA_ROOT_HELP,
    PRICES_HELP,
    HelpFormatter,
    add_column_arguments,
    column_names,
    under_flags,
)
from prefill_router.errors import ConfigError

BUILTINS = ("mmlu-pro", "routellm-mmlu", "routellm-gsm8k")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="validate routing data and show its statistics",
                                   description=__doc__.splitlines()[0] + "\nFile formats: docs/data-formats.md.",
                                   formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    validate = sub.add_parser("validate", help="check a routing data file; prints OK and its shape",
                              description="Check a routing data file (CSV, JSONL or Parquet; long or wide layout, "
                                          "see docs/data-formats.md); print OK and its shape, or the line and "
                                          "field of the first problem.", formatter_class=HelpFormatter)
    validate.add_argument("path", help="CSV, JSONL or Parquet file, long or wide layout")
    _reader_options(validate)
    validate.set_defaults(func=_validate)

    stats = sub.add_parser("stats", help="per-target accuracy and cost, oracle, best single target",
                           description="Per-target accuracy and cost, the oracle and the best single target of a "
                                       "routing data file or a built-in dataset.", formatter_class=HelpFormatter)
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument("path", nargs="?", help="CSV, JSONL or Parquet file")
    source.add_argument("--builtin", choices=BUILTINS, help="a known dataset from the data folder")
    stats.add_argument("--data-root", help=DATA_ROOT_HELP)
    stats.add_argument("--json", dest="json_out", metavar="OUT",
                       help="also write the statistics as JSON here")
    _reader_options(stats)
    stats.set_defaults(func=_stats)

    formats = ("routerbench", "llmrouter", "routellm")  # data.importers.FORMATS, without importing pandas here
    imports = sub.add_parser(
        "import", help="convert RouterBench, LLMRouter or RouteLLM outcome files to the documented layout",
        description="Convert outcome files published in another routing project's layout to the documented long\n"
                    "layout (docs/data-formats.md), print what was mapped to what, and check the result.\n\n"
                    "  routerbench  sample_id, prompt, eval_name, <model>, <model>|total_cost, ... (its pickle\n"
                    "               exported as CSV, JSONL or Parquet: pickles are never loaded)\n"
                    "  llmrouter    query, model_name, performance, task_name, input_tokens, output_tokens,\n"
                    "               embedding_id, ... (JSONL)\n"
                    "  routellm     prompt, then a True/False column per model (routellm/evals CSVs)\n\n"
                    "Several files (LLMRouter's train and test files, RouteLLM's per-subject files) make one output;\n"
                    "file names that say train or test fill a split column (--split-col split).",
        formatter_class=HelpFormatter)
    imports.add_argument("files", nargs="+", metavar="FILE", help="files in that layout")
    imports.add_argument("--from", dest="layout_from", required=True, choices=formats, help="the files' layout")
    imports.add_argument("--out", required=True, help="output file: .csv, .jsonl or .parquet (.gz for CSV, JSONL)")
    imports.add_argument("--llm-data", help="llmrouter: its LLM data file (default_llm.json), whose input_price and "
                                            "output_price (USD per million tokens) give each row's cost")
    imports.set_defaults(func=_import)


def _reader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prices", help=PRICES_HELP + " (default: none)")
    parser.add_argument("--layout", choices=("auto", "long", "wide"), default="auto",
                        help="long: one row per (prompt, target); wide: one row per prompt; auto: long when the file "
                             "has 'target' and 'score' columns (default: auto)")
    add_column_arguments(parser)


def _load(args):
    columns = column_names(args)
    if getattr(args, "builtin", None):
        from prefill_router.data.builtin import load_mmlu_pro, load_routellm

        if columns:
            flag = next(f for f, param in COLUMN_OPTIONS.items() if param in columns)
            raise ConfigError(f"{flag} names a column of a data file; the built-in datasets have their own")
        if args.builtin == "mmlu-pro":
            return load_mmlu_pro(args.data_root)
        return load_routellm(args.data_root, benchmark=args.builtin.split("-", 1)[1])
    from prefill_router.data.readers import read_routing_data

    with under_flags(*COLUMN_OPTIONS.values()):
        return read_routing_data(args.path, layout=args.layout, prices=args.prices, **columns)


def _validate(args) -> int:
    ds = _load(args)
    missing = int(np.isnan(ds.Y).sum())
    print(f"OK: {args.path}: {ds.n} prompts x {ds.k} targets, {missing} missing (prompt, target) pairs")
    for note in ds.notes:
        print(f"note: {note}")
    return 0


def _stats(args) -> int:
    from prefill_router.data.stats import dataset_stats, format_stats

    stats = dataset_stats(_load(args))
    print(format_stats(stats))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stats, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _import(args) -> int:
    from prefill_router.data.importers import import_outcomes, write_long
    from prefill_router.data.readers import read_routing_data

    frame, notes = import_outcomes(args.layout_from, args.files, llm_data=args.llm_data)
    out = write_long(frame, args.out)
    split = "split" in frame.columns
    ds = read_routing_data(out, split_col="split" if split else None)  # what every command will read
    print(f"imported {ds.n} prompts x {ds.k} targets ({len(frame)} rows) from the {args.layout_from} layout "
          f"into {out}")
    for note in notes:
        print(f"note: {note}")
    if split:
        print("the file has a split column: pass --split-col split to train and evaluate on it")
    return 0
