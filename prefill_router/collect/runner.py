"""Send every prompt to every target, judge the answers, and record each finished pair durably.

    summary = run_collect(read_prompts("prompts.jsonl"), load_targets("targets.yaml"), "labels.jsonl",
                          CollectSettings(judge="choice"))

Per target: up to `max_concurrency` requests in flight, optional requests-per-second and tokens-per-minute
limits (from the target config), retries with backoff on 429/5xx, and a progress bar. The journal next to
the output makes a rerun skip everything already paid for; see `journal.py`.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from prefill_router.collect.journal import (
    GroupCommit,
    Journal,
    Key,
    failures_path,
    is_labelled,
    journal_path,
    write_dataset,
)
from prefill_router.collect.judges import DEFAULT_LETTERS, JUDGE_KINDS, JUDGES, check_reference
from prefill_router.collect.llm_judge import JudgeConfig, LLMJudge
from prefill_router.collect.openai_api import ChatResult, RateLimiter, RetryPolicy, Sleep, chat_completion
from prefill_router.collect.prompts import PromptItem
from prefill_router.errors import ConfigError, DataError
from prefill_router.targets import TargetConfig


@dataclass
class CollectSettings:
    judge: str                          # one of JUDGE_KINDS
    letters: str = DEFAULT_LETTERS      # valid letters for the `choice` judge
    max_tokens: int | None = None       # sent to targets; None leaves the server default
    temperature: float | None = 0.0     # None leaves the server default
    concurrency: int = 4                # per target, unless the target config sets max_concurrency
    requests_per_second: float | None = None  # per target, unless the target config sets its own
    tokens_per_minute: int | None = None      # per target, unless the target config sets its own
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_failed: bool = False          # re-run recorded failures (calls and judgements)
    only: tuple[str, ...] | None = None  # call only these targets; the dataset still lists all of them
    progress: bool = True

    def __post_init__(self) -> None:
        if self.judge not in JUDGE_KINDS:
            raise ConfigError(f"judge: unknown kind {self.judge!r}; choose one of {', '.join(JUDGE_KINDS)}")
        if self.concurrency < 1:
            raise ConfigError("concurrency: must be at least 1")
        for name in ("requests_per_second", "tokens_per_minute"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("max_tokens: must be at least 1")
        if not self.letters.isalpha():
            raise ConfigError(f"letters: must be letters only, got {self.letters!r}")

    def request_params(self) -> dict:
        params: dict = {}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        return params


@dataclass
class Plan:
    calls: dict[str, list[PromptItem]]              # target name -> prompts still to send
    rejudge: list[tuple[PromptItem, str, dict]]     # answers already paid for, to judge (again)
    done: int                                       # pairs finished and kept
    kept_failures: int                              # recorded failures left alone (no --retry-failed)

    @property
    def n_calls(self) -> int:
        return sum(len(v) for v in self.calls.values())


def active_targets(targets: Sequence[TargetConfig], settings: CollectSettings) -> list[TargetConfig]:
    """The targets this run calls, after checking names and API keys (before any paid call is made)."""
    if not targets:
        raise ConfigError("targets: no targets to collect from")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"targets: duplicate names in {names}")
    if settings.only is not None:
        unknown = [n for n in settings.only if n not in names]
        if unknown:
            raise ConfigError(f"--only: unknown target(s) {unknown}; the targets file has {names}")
    return [t for t in targets if settings.only is None or t.name in settings.only]


def check_references(prompts: Sequence[PromptItem], judge: str, letters: str, file: str | Path) -> None:
    """Refuse a prompt whose reference the judge cannot use, before any paid call is made."""
    for item in prompts:
        if item.reference is None:
            if judge == "llm":
                continue
            raise DataError(f"judge '{judge}' needs a reference answer ('answer' or 'reference')",
                            file=str(file), line=item.line, field="answer")
        if judge != "llm":
            try:
                check_reference(judge, item.reference, letters=letters)
            except ValueError as exc:
                raise DataError(str(exc), file=str(file), line=item.line, field="answer") from exc


def check_journal_matches(prompts: Sequence[PromptItem], records: dict[Key, dict], journal: Path) -> None:
    """A prompt_id whose text changed since it was labelled would mix labels of two prompts: refuse."""
    by_id = {p.prompt_id: p for p in prompts}
    for (pid, _target), record in records.items():
        item = by_id.get(pid)
        if item is not None and record.get("prompt") != item.prompt:
            raise ConfigError(f"{journal}: prompt_id {pid!r} was labelled for a different prompt text "
                              f"(line {item.line} of the prompts file changed); give it a new prompt_id or "
                              f"write to a new --out")


def make_plan(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], records: dict[Key, dict],
              settings: CollectSettings) -> Plan:
    """What is left to do for the active targets, given the journal's records."""
    active = active_targets(targets, settings)
    plan = Plan(calls={t.name: [] for t in active}, rejudge=[], done=0, kept_failures=0)
    for target in active:
        for item in prompts:
            record = records.get((item.prompt_id, target.name))
            if record is None:
                plan.calls[target.name].append(item)
            elif record.get("error"):
                if settings.retry_failed:
                    plan.calls[target.name].append(item)
                else:
                    plan.kept_failures += 1
            elif record.get("judge") != settings.judge:
                plan.rejudge.append((item, target.name, record))  # a new judge reads the stored answer
            elif record.get("judge_error"):
                if settings.retry_failed:
                    plan.rejudge.append((item, target.name, record))
                else:
                    plan.kept_failures += 1
            else:
                plan.done += 1
    return plan


def pair_cost(target: TargetConfig, input_tokens: int | None, output_tokens: int | None) -> float | None:
    """USD for one call from the target's price table; None when the API reported no usage."""
    if input_tokens is None or output_tokens is None:
        return None
    return (input_tokens * target.usd_per_m_input + output_tokens * target.usd_per_m_output) / 1e6


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def make_record(item: PromptItem, target: TargetConfig, result: ChatResult, judge: str,
                score: float | None, judge_error: str | None) -> dict:
    return {
        "prompt_id": item.prompt_id, "prompt": item.prompt, "target": target.name,
        "score": score if result.ok else None,
        "cost": pair_cost(target, result.input_tokens, result.output_tokens) if result.ok else None,
        "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
        "category": item.category, "answer": result.text, "latency_s": result.latency_s,
        "attempts": result.attempts, "error": result.error, "judge": judge,
        "judge_error": judge_error if result.ok else None, "finish_reason": result.finish_reason,
        "reference": item.reference, "finished_at": _now(),
    }


def estimate_tokens(item: PromptItem) -> int:
    # Only for rate-limit reservations; corrected with the API's usage afterwards.
    return len(item.text()) // 4 + 1


@dataclass
class CollectSummary:
    """Per target over the whole dataset (this run and earlier ones) plus what this run did."""

    rows: list[dict]
    calls_made: int
    rejudged: int
    dataset_path: Path
    journal_path: Path
    failures_path: Path | None = None

    def table(self) -> str:
        head = (f"{'target':<24} {'ok':>6} {'failed':>7} {'unjudged':>9} {'missing':>8} {'mean score':>10} "
                f"{'cost USD':>10}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mean = "-" if r["mean_score"] is None else f"{r['mean_score']:.3f}"
            lines.append(f"{r['target']:<24} {r['ok']:>6} {r['failed']:>7} {r['judge_failed']:>9} "
                         f"{r['missing']:>8} {mean:>10} {r['cost_usd']:>10.4f}")
        return "\n".join(lines)


def summarize(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], records: dict[Key, dict]) -> list[dict]:
    rows = []
    for target in targets:
        ok = failed = judge_failed = missing = 0
        scores, cost = [], 0.0
        for item in prompts:
            record = records.get((item.prompt_id, target.name))
            if record is None:
                missing += 1
                continue
            cost += record.get("cost") or 0.0
            if record.get("error"):
                failed += 1
            elif record.get("score") is None:
                judge_failed += 1
            else:
                ok += 1
                scores.append(float(record["score"]))
        rows.append({"target": target.name, "ok": ok, "failed": failed, "judge_failed": judge_failed,
                     "missing": missing, "mean_score": sum(scores) / len(scores) if scores else None,
                     "cost_usd": cost})
    return rows


def dataset_rows(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], records: dict[Key, dict]):
    """Records of the current prompts x targets, in prompt order then target order."""
    for item in prompts:
        for target in targets:
            record = records.get((item.prompt_id, target.name))
            if record is not None:
                yield record


async def collect_async(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], out: str | Path,
                        settings: CollectSettings, *, judge_config: JudgeConfig | None = None,
                        prompts_file: str | Path = "<prompts>", sleep: Sleep = asyncio.sleep,
                        on_record: Callable[[dict], None] | None = None,
                        stop: asyncio.Event | None = None) -> CollectSummary:
    """Run the collection. `on_record` is called after each record is durably written; once `stop` is set,
    workers take no new pair (the ones in flight finish and are written)."""
    for target in active_targets(targets, settings):
        target.api_key()  # a missing key variable fails now, not after other targets were paid
    check_references(prompts, settings.judge, settings.letters, prompts_file)
    if settings.judge == "llm" and judge_config is None:
        raise ConfigError("judge: 'llm' needs a judge config (--judge-config FILE)")
    if judge_config is not None:
        judge_config.judge.api_key()
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".json"):
        raise ConfigError(f"--out {out}: the dataset is written as JSON lines; use a .jsonl file name")
    journal = Journal(journal_path(out))
    records = journal.load()
    check_journal_matches(prompts, records, journal.path)
    plan = make_plan(prompts, targets, records, settings)
    calls_made = rejudged = 0
    commit = GroupCommit(journal)
    try:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
            judge_answer = _make_judge(settings, judge_config, client, sleep)
            if plan.rejudge:
                rejudged = await _rejudge(plan.rejudge, judge_answer, commit, settings, on_record, stop)

            async def run_target(position: int, target: TargetConfig) -> int:
                return await _run_target(position, target, plan.calls.get(target.name, []), client, judge_answer,
                                         commit, settings, sleep, on_record, stop)

            made = await asyncio.gather(*(run_target(i, t) for i, t in enumerate(targets)))
            calls_made = sum(made)
    finally:
        # Also after an interruption: the dataset then holds everything finished so far.
        await commit.drain()
        journal.close()
        failures = write_outputs(prompts, targets, journal.records, out)
    return CollectSummary(summarize(prompts, targets, journal.records), calls_made, rejudged, out, journal.path,
                          failures)


def write_outputs(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], records: dict[Key, dict],
                  out: str | Path) -> Path | None:
    """The dataset (labelled pairs) and, when any pair failed, the failures file; returns its path or None."""
    rows = list(dataset_rows(prompts, targets, records))
    write_dataset([r for r in rows if is_labelled(r)], out)
    failed = [r for r in rows if not is_labelled(r)]
    path = failures_path(out)
    if failed:
        write_dataset(failed, path)
        return path
    path.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    return None


def _make_judge(settings: CollectSettings, judge_config: JudgeConfig | None, client: httpx.AsyncClient,
                sleep: Sleep):
    """An async function (item, answer) -> (score, None) or (None, reason)."""
    if settings.judge == "llm":
        cfg = judge_config.judge
        llm = LLMJudge(judge_config, client, settings.retry,
                       RateLimiter(cfg.requests_per_second, cfg.tokens_per_minute), sleep)
        gate = asyncio.Semaphore(cfg.max_concurrency or settings.concurrency)

        async def llm_judge(item: PromptItem, answer: str):
            async with gate:
                return await llm.score(item.text(), answer, item.reference)
        return llm_judge
    fn = JUDGES[settings.judge]
    if settings.judge == "choice":
        fn = partial(fn, letters=settings.letters)

    async def pure_judge(item: PromptItem, answer: str):
        try:
            return float(fn(answer, item.reference)), None
        except ValueError as exc:  # references were checked up front; kept as data, never raised mid-run
            return None, f"judge error: {exc}"
    return pure_judge


def _stopped(stop: asyncio.Event | None) -> bool:
    return stop is not None and stop.is_set()


async def _rejudge(work, judge_answer, commit: GroupCommit, settings: CollectSettings, on_record,
                   stop: asyncio.Event | None = None) -> int:
    bar = tqdm(total=len(work), desc="re-judging", unit="answer", disable=not settings.progress)
    queue = deque(work)

    async def worker():
        while queue and not _stopped(stop):
            item, _target, record = queue.popleft()
            score, judge_error = await judge_answer(item, record.get("answer") or "")
            updated = {**record, "score": score, "judge": settings.judge, "judge_error": judge_error,
                       "finished_at": _now()}
            await commit.append(updated)
            bar.update(1)
            if on_record:
                on_record(updated)

    try:
        await asyncio.gather(*(worker() for _ in range(min(settings.concurrency, len(work)))))
    finally:
        bar.close()
    return len(work)


async def _run_target(position: int, target: TargetConfig, items: list[PromptItem], client: httpx.AsyncClient,
                      judge_answer, commit: GroupCommit, settings: CollectSettings, sleep: Sleep, on_record,
                      stop: asyncio.Event | None = None) -> int:
    if not items:
        return 0
    limiter = RateLimiter(target.requests_per_second or settings.requests_per_second,
                          target.tokens_per_minute or settings.tokens_per_minute)
    params = settings.request_params()
    queue = deque(items)
    failures = 0
    bar = tqdm(total=len(items), desc=target.name, position=position, unit="call", leave=True,
               disable=not settings.progress)

    async def worker() -> None:
        nonlocal failures
        while queue and not _stopped(stop):
            item = queue.popleft()
            problem = item.encoding_problem()
            if problem is not None:  # a bad line fails alone, unpaid; the run goes on
                result = ChatResult(error=f"bad prompt (line {item.line}, prompt_id {item.prompt_id!r}), not sent: "
                                          f"{problem}")
            else:
                result = await chat_completion(client, target, item.messages(), params=params, limiter=limiter,
                                               estimated_tokens=estimate_tokens(item) + (settings.max_tokens or 0),
                                               retry=settings.retry, sleep=sleep)
            score = judge_error = None
            if result.ok:
                score, judge_error = await judge_answer(item, result.text or "")
            record = make_record(item, target, result, settings.judge, score, judge_error)
            await commit.append(record)
            if not result.ok or judge_error:
                failures += 1
                bar.set_postfix(failed=failures, refresh=False)
            bar.update(1)
            if on_record:
                on_record(record)

    workers = min(target.max_concurrency or settings.concurrency, len(items))
    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        bar.close()
    return len(items)


def run_collect(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], out: str | Path,
                settings: CollectSettings, **kwargs) -> CollectSummary:
    """Blocking wrapper around `collect_async`."""
    return asyncio.run(_collect_until_interrupted(prompts, targets, out, settings, **kwargs))


async def _collect_until_interrupted(prompts, targets, out, settings, **kwargs) -> CollectSummary:
    """collect_async where Ctrl-C always stops the run. Cancelling the main task alone is not enough: an HTTP
    library's cancel scope can swallow that cancellation (seen once in the suite: the run went on to the end).
    So Ctrl-C also sets a flag that every worker checks before its next call."""
    stop = asyncio.Event()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        stop.set()
        main.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # no loop signal handlers here (Windows, thread)
        installed = False
    try:
        summary = await collect_async(prompts, targets, out, settings, stop=stop, **kwargs)
    except asyncio.CancelledError:
        if stop.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
    if stop.is_set():  # the cancellation was lost on its way up; the workers stopped at the flag
        raise KeyboardInterrupt
    return summary


# ---------------------------------------------------------------------------------------------------------
# --dry-run


@dataclass
class DryRun:
    rows: list[dict]
    n_prompts: int
    mean_prompt_tokens: float
    assumed_output_tokens: int
    token_note: str

    @property
    def total_calls(self) -> int:
        return sum(r["calls"] for r in self.rows)

    @property
    def total_cost(self) -> float:
        return sum(r["est_cost_usd"] for r in self.rows)

    def table(self) -> str:
        head = f"{'target':<24} {'calls':>7} {'input tok':>11} {'output tok':>11} {'est. USD':>10}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['target']:<24} {r['calls']:>7} {r['input_tokens']:>11} {r['output_tokens']:>11} "
                         f"{r['est_cost_usd']:>10.4f}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<24} {self.total_calls:>7} {'':>11} {'':>11} {self.total_cost:>10.4f}")
        lines.append(f"{self.n_prompts} prompts, mean prompt length {self.mean_prompt_tokens:.1f} tokens "
                     f"({self.token_note}); output assumed {self.assumed_output_tokens} tokens per call.")
        return "\n".join(lines)


def count_prompt_tokens(prompts: Sequence[PromptItem]) -> tuple[list[int], str]:
    """Token count per prompt with the project's counting tokenizer; chars/4 when it is unavailable."""
    try:
        from prefill_router.data.tokens import count_tokens, counting_tokenizer

        counts = [int(c) for c in count_tokens([p.prompt for p in prompts])]
        return counts, f"tokenizer: {counting_tokenizer().name}"
    except (ImportError, DataError, OSError) as exc:
        return ([math.ceil(len(p.text()) / 4) for p in prompts],
                f"estimated as characters/4: no counting tokenizer ({type(exc).__name__})")


def dry_run(prompts: Sequence[PromptItem], targets: Sequence[TargetConfig], out: str | Path,
            settings: CollectSettings, *, assumed_output_tokens: int | None = None) -> DryRun:
    """What a run would send (pairs already in the journal are skipped) and its estimated cost."""
    records = Journal(journal_path(out)).load() if journal_path(out).exists() else {}
    plan = make_plan(prompts, targets, records, settings)
    counts, note = count_prompt_tokens(prompts)
    tokens_of = {p.prompt_id: c for p, c in zip(prompts, counts)}
    out_tokens = assumed_output_tokens if assumed_output_tokens is not None else (settings.max_tokens or 256)
    rows = []
    for target in targets:
        items = plan.calls.get(target.name, [])
        tin = sum(tokens_of[i.prompt_id] for i in items)
        tout = out_tokens * len(items)
        rows.append({"target": target.name, "calls": len(items), "input_tokens": tin, "output_tokens": tout,
                     "est_cost_usd": pair_cost(target, tin, tout)})
    mean = sum(counts) / len(counts) if counts else 0.0
    return DryRun(rows, len(prompts), mean, out_tokens, note)
