"""The `prefill-router` command. Each stage registers its subcommand from its own module in this package.

A module here exposes `register(subparsers)`, which adds one subcommand whose handler is stored as
`func(args) -> int`. Handlers compose library calls and define no math.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from prefill_router import __version__
from prefill_router.cli.common import HelpFormatter
from prefill_router.errors import PrefillRouterError

# Order is the order shown in --help, which follows the pipeline.
SUBCOMMAND_MODULES = ["data", "extract", "probe", "train", "evaluate", "pipeline", "serve", "fake-upstream", "collect"]


DESCRIPTION = ("Route each LLM request to the target model most likely to answer it well, for the least money, "
               "from the prefill hidden states of a small encoder LLM. One command per stage.")
EXAMPLES = """\
examples:
  prefill-router pipeline --out runs/mmlu-pro          # the whole method on the shipped MMLU-Pro (what `make run` runs)
  prefill-router data stats --builtin mmlu-pro         # per-target accuracy and cost, oracle, best single target
  prefill-router data validate my_outcomes.csv --prices prices.yaml   # check your own routing data
  prefill-router extract --data my_outcomes.csv --out runs/feats      # prefill features of its prompts
  prefill-router train --dataset my_outcomes.csv --prices prices.yaml --features runs/feats --out runs/router
  prefill-router serve --config gateway.yaml --check   # validate the gateway config and keys, then `serve` it

`prefill-router COMMAND --help` shows a command's options and their defaults. File formats (routing data,
price tables): docs/data-formats.md; the gateway: docs/serving.md.
"""


class ArgumentParser(argparse.ArgumentParser):
    """A usage error is one line naming the command and the problem (subcommand parsers inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="prefill-router", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"prefill-router {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"prefill_router.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prefill_router.cli.{name.replace('-', '_')}":
                continue  # stage not built yet
            raise
        module.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    # Warnings meant for the user (e.g. training without prices) read as one line, not a source location.
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PrefillRouterError as exc:
        # Our own errors already name the problem; a traceback would bury it.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
