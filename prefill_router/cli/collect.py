"""`prefill-router collect`: label a prompt set by running the target models and judging their answers."""

from __future__ import annotations

import argparse
import sys

from prefill_router.cli.common import HelpFormatter
from prefill_router.errors import ConfigError

DESCRIPTION = """\
Send every prompt to every target through its OpenAI-compatible endpoint, judge each answer, and write the
long-format routing dataset that `train` reads (JSON lines: prompt_id, prompt, target, score, cost,
input_tokens, output_tokens, answer, latency_s, error, ...).

Each finished (prompt, target) pair is saved to OUT.journal as soon as it completes, so an interrupted run
resumes where it stopped when the same command is run again: nothing already paid for is sent twice.
Failed pairs are kept with their reason (OUT.journal and OUT-stem.failures.jsonl) and are absent from the
dataset, so `train` treats them as missing, never as wrong; run again with --retry-failed to re-send them.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("collect", help="label prompts by running target models and judging the answers",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="JSONL or CSV: prompt_id, prompt (or messages), answer/reference, [category]")
    p.add_argument("--targets", required=True, metavar="FILE",
                   help="targets YAML/TOML, or the gateway config itself: endpoints, prices, limits")
    p.add_argument("--judge", required=True, choices=["choice", "numeric", "exact", "contains", "llm"],
                   help="how an answer is scored against the reference")
    p.add_argument("--out", required=True, metavar="DATASET", help="output dataset (.jsonl)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="call only these targets of the file; the dataset still lists every target's labels "
                        "(default: all)")
    p.add_argument("--judge-config", metavar="FILE", help="judge endpoint and rubric for --judge llm (default: none)")
    p.add_argument("--reference-field", metavar="NAME",
                   help="prompts-file field holding the reference (default: 'answer', else 'reference')")
    p.add_argument("--letters", default="ABCDEFGHIJ", help="valid option letters for --judge choice")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens sent to targets (default: unset)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent to targets")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight per target, unless the target sets max_concurrency (default 4)")
    p.add_argument("--requests-per-second", type=float, default=None, metavar="R",
                   help="per-target request rate, unless the target sets requests_per_second (default: none)")
    p.add_argument("--tokens-per-minute", type=int, default=None, metavar="T",
                   help="per-target token rate, unless the target sets tokens_per_minute (default: none)")
    p.add_argument("--max-attempts", type=int, default=6, help="tries per call on 429/5xx/timeouts (default 6)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubling each time (Retry-After wins) (default 1)")
    p.add_argument("--retry-failed", action="store_true", help="re-run pairs recorded as failed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the number of calls and the estimated cost, then stop")
    p.add_argument("--assume-output-tokens", type=int, default=None,
                   help="output tokens per call for --dry-run cost (default: --max-tokens, else 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# Per-target fields only the gateway reads; a gateway config doubles as a targets file for `collect`.
GATEWAY_ONLY_FIELDS = ("fallbacks",)


def load_collect_targets(path):
    """Targets from a targets file or a gateway config (its router, batching, ... sections are ignored)."""
    from prefill_router.targets import parse_targets, read_config_file

    data = read_config_file(path)
    if isinstance(data.get("targets"), list):
        data["targets"] = [{k: v for k, v in t.items() if k not in GATEWAY_ONLY_FIELDS} if isinstance(t, dict)
                           else t for t in data["targets"]]
    return parse_targets(data, path)


def run(args: argparse.Namespace) -> int:
    from prefill_router.collect import (
        CollectSettings,
        RetryPolicy,
        dry_run,
        load_judge_config,
        read_prompts,
        run_collect,
    )

    targets = load_collect_targets(args.targets)
    prompts = read_prompts(args.prompts, reference_field=args.reference_field)
    if args.max_attempts < 1:
        raise ConfigError("--max-attempts: must be at least 1")
    if args.backoff < 0:
        raise ConfigError("--backoff: must be >= 0")
    settings = CollectSettings(judge=args.judge, letters=args.letters, max_tokens=args.max_tokens,
                               temperature=args.temperature, concurrency=args.concurrency,
                               requests_per_second=args.requests_per_second,
                               tokens_per_minute=args.tokens_per_minute,
                               retry=RetryPolicy(max_attempts=args.max_attempts, backoff_s=args.backoff),
                               retry_failed=args.retry_failed, progress=not args.no_progress,
                               only=tuple(args.only) if args.only else None)
    judge_config = None
    if args.judge == "llm":
        if not args.judge_config:
            raise ConfigError("--judge llm needs --judge-config FILE (the judge endpoint and rubric)")
        judge_config = load_judge_config(args.judge_config)
    if args.dry_run:
        # What the real run checks before its first paid call, so a dry run that passes means the run starts.
        from prefill_router.collect.runner import check_references

        for target in targets:
            if not args.only or target.name in args.only:
                target.api_key()
        if judge_config is not None:
            judge_config.judge.api_key()
        check_references(prompts, args.judge, args.letters, args.prompts)
        estimate = dry_run(prompts, targets, args.out, settings, assumed_output_tokens=args.assume_output_tokens)
        print(estimate.table())
        return 0
    try:
        summary = run_collect(prompts, targets, args.out, settings, judge_config=judge_config,
                              prompts_file=args.prompts)
    except KeyboardInterrupt:
        print(f"interrupted: finished pairs are saved in {args.out}.journal; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.table())
    print(f"{summary.calls_made} calls made, {summary.rejudged} answers re-judged in this run; "
          f"dataset: {summary.dataset_path} (journal: {summary.journal_path})")
    incomplete = sum(r["failed"] + r["judge_failed"] for r in summary.rows)
    if incomplete:
        print(f"{incomplete} pair(s) failed and are missing from the labels (reasons in "
              f"{summary.failures_path}); rerun with --retry-failed to try them again", file=sys.stderr)
    return 0
