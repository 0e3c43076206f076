"""Label collection: run target models on your prompts through OpenAI-compatible APIs, judge the answers,
and write the long-format routing dataset that `train` reads."""

from prefill_router.collect.journal import DATASET_FIELDS, Journal, failures_path, journal_path, write_dataset
from prefill_router.collect.judges import JUDGE_KINDS, JUDGES, check_reference, extract_choice, extract_number
from prefill_router.collect.llm_judge import JudgeConfig, LLMJudge, load_judge_config, parse_judge_score
from prefill_router.collect.openai_api import ChatResult, RateLimiter, RetryPolicy, chat_completion
from prefill_router.collect.prompts import PromptItem, read_prompts
from prefill_router.collect.runner import (
                                           CollectSettings,
                                           CollectSummary,
                                           DryRun,
                                           collect_async,
                                           dry_run,
                                           run_collect,
)

__all__ = [
    "DATASET_FIELDS",
    "JUDGES",
    "JUDGE_KINDS",
    "ChatResult",
    "CollectSettings",
    "CollectSummary",
    "DryRun",
    "Journal",
    "JudgeConfig",
    "LLMJudge",
    "PromptItem",
    "RateLimiter",
    "RetryPolicy",
    "chat_completion",
    "check_reference",
    "collect_async",
    "dry_run",
    "extract_choice",
    "extract_number",
    "failures_path",
    "journal_path",
    "load_judge_config",
    "parse_judge_score",
    "read_prompts",
    "run_collect",
    "write_dataset",
]
