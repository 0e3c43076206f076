"""The `prefill-router` command. Each stage registers its subcommand from its own module in this package.

A module here exposes `register(subparsers)`, which adds one subcommand whose handler is stored as
`func(args) -> int`. Handlers compose library calls and define no math.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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
  prefill-router extract --dataset my_outcomes.csv --out runs/feats      # prefill features of its prompts
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
        importlib.import_module(f"prefill_router.cli.{name.replace('-', '_')}").register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class _StderrHandler(logging.Handler):
    """Library log records as bare lines on the current sys.stderr (looked up per record, so output captured
    by a test or redirected after start-up still gets them)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _log_to_stderr() -> None:
    # The library logs progress notes (resuming a store, ...) at INFO; the command shows them as plain lines.
    log = logging.getLogger("prefill_router")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    # Warnings meant for the user (e.g. training without prices) read as one line, not a source location.
    warnings.formatwarning = _one_line_warning
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PrefillRouterError as exc:
        # Our own errors already name the problem; a traceback would bury it.
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A missing file, a folder where a file was expected, no permission: the user's to fix, so one line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{_one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    """A multi-line message (a config error: a title, then one problem per line) as one line."""
    parts = [part.strip() for part in message.splitlines() if part.strip()]
    if len(parts) < 2:
        return message.strip()
    return f"{parts[0].rstrip(':')}: {'; '.join(parts[1:])}"


if __name__ == "__main__":
    sys.exit(main())
