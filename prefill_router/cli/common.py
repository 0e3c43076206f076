"""Options and loading shared by the commands that read a routing dataset (extract, evaluate, probe, train)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from prefill_router.errors import ConfigError

# data.BUILTIN_DATASETS written out for the options' help, so that `--help` need not import the data stage
# (pandas); test_cli_errors checks that the two agree.
BUILTIN_DATASETS = ("mmlu-pro", "routellm-mmlu", "routellm-gsm8k")
DATA_ROOT_HELP = ("data folder of the built-in datasets (default: $PREFILL_ROUTER_DATA, else the data shipped with "
                  "the package)")
PRICES_HELP = ("price table for a data file without costs: a CSV or YAML file giving each target "
               "its usd_per_m_input and usd_per_m_output (format: docs/data-formats.md)")
# The columns of a routing data file that may carry other names: option -> read_routing_data's parameter.
COLUMN_OPTIONS = {"--id-col": "id_col", "--category-col": "category_col", "--cost-col": "cost_col",
                  "--split-col": "split_col"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The formatter of every subcommand: descriptions and epilogs keep their line breaks, and every option's
    help ends with its default, "(default: X)", unless the help already says "(default ...)" in its own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or action.required:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def add_parser(subparsers, name: str, *, help: str, description: str | None = None, **kwargs):
    """A subcommand parser with HelpFormatter and the description as written (default: the help line)."""
    return subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter,
                                 **kwargs)


def load_dataset(args: argparse.Namespace):
    """`data.load_dataset` with the command's options: --dataset, with --data-root, --prices, --targets, --limit,
    --sample and --sample-seed where the command has them. A bad value is reported under its flag."""
    import sys

    from prefill_router import data
    from prefill_router.data.readers import COLUMN_NOTE_PREFIX

    if getattr(args, "limit", None) is not None and getattr(args, "sample", None) is not None:
        raise ConfigError("--limit and --sample are alternatives; give one")
    with under_flags("dataset", "targets", "limit", *COLUMN_OPTIONS.values()):
        ds = data.load_dataset(
            args.dataset, data_root=getattr(args, "data_root", None), prices=getattr(args, "prices", None),
            targets=split_names(args.targets) if getattr(args, "targets", None) else None,
            limit=getattr(args, "limit", None), sample=getattr(args, "sample", None),
            sample_seed=getattr(args, "sample_seed", 0), columns=column_names(args))
    for note in ds.notes:  # a column the file has but the reader left out: the user may have meant it
        if note.startswith(COLUMN_NOTE_PREFIX):
            print(f"note: {note}", file=sys.stderr)
    return ds


def add_column_arguments(p: argparse.ArgumentParser) -> None:
    """--id-col / --category-col / --cost-col / --split-col: other names for a data file's columns."""
    g = p.add_argument_group("columns of a data file with other names (docs/data-formats.md)")
    g.add_argument("--id-col", metavar="COLUMN", help="prompt id column (default: prompt_id when present)")
    g.add_argument("--category-col", metavar="COLUMN",
                   help="prompt category column, stratifying folds and samples (default: category, else task)")
    g.add_argument("--cost-col", metavar="COLUMN",
                   help="USD cost of each row's call: a column in the long layout (default: cost); in the wide "
                        "layout a pattern with {target}, such as '{target}|total_cost' (default: cost_{target}). "
                        "Without --prices, train's cost model is each target's mean cost")
    g.add_argument("--split-col", metavar="COLUMN",
                   help="column saying which prompts train (train, val, dev) and which are held out (test); train "
                        "and evaluate then use that split (default: none)")


def column_names(args: argparse.Namespace) -> dict[str, str]:
    """The column names given on the command line, as read_routing_data's keyword arguments."""
    names = {param: getattr(args, param, None) for param in COLUMN_OPTIONS.values()}
    return {param: name for param, name in names.items() if name}


@contextlib.contextmanager
def under_flags(*params: str) -> Iterator[None]:
    """Re-raise a library ConfigError about one of the parameters `params` under the command's flag for it
    (parameter `data_root` is flag `--data-root`), so the user reads the name they typed."""
    try:
        yield
    except ConfigError as exc:
        if exc.field not in params:
            raise
        raise ConfigError(exc.reason, field="--" + exc.field.replace("_", "-")) from None


def add_row_selection_arguments(p: argparse.ArgumentParser) -> None:
    """--limit / --sample / --sample-seed, shared by every command that reads a dataset."""
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts (default: all)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="use a sample of N prompts, stratified by category when the data has one (seeded; the same "
                        "N and seed always "
                        "pick the same prompts, in extract, evaluate, probe and train alike) (default: all)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of --sample")


def add_store_dataset_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The options of commands that read a feature store beside its dataset (probe, train)."""
    p.add_argument("--features", required=required, help="feature store folder (from `prefill-router extract`)")
    p.add_argument("--dataset", required=required, help="mmlu-pro | routellm-mmlu | routellm-gsm8k | PATH")
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--prices", default=None, help=PRICES_HELP + " (default: none)")
    p.add_argument("--targets", default=None, help="comma-separated subset of targets (default: all)")
    add_row_selection_arguments(p)
    add_column_arguments(p)


def open_store_and_dataset(args: argparse.Namespace):
    """(FeatureSet, dataset, store row of each dataset row, done mask over the dataset's rows). Rows are
    matched by prompt hash, so the store may hold more prompts than the dataset selects."""
    if not Path(args.features).exists():
        raise ConfigError(f"--features: {args.features} does not exist (create it with `prefill-router extract`)")
    from prefill_router.features import FeatureSet  # after the check: torch loads only for real work

    features = FeatureSet.open(args.features)
    ds = load_dataset(args)
    rows = features.rows_of(ds.prompts)
    return features, ds, rows, np.asarray(features.done[rows], dtype=bool)


def split_names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
