"""Read the prompts to label: JSONL or CSV, one prompt a line.

Fields (JSONL keys or CSV columns):
- `prompt_id` (or `id`): a stable identifier. Resuming relies on it; when absent, a hash of the prompt is used.
- `prompt` (text) or `messages` (OpenAI chat messages; in CSV a JSON string).
- `answer` or `reference`: what the judge compares against (a string, a number, or a list of acceptable
  answers). Needed by every judge except `llm`, where it is optional.
- `category` (optional): carried into the dataset for per-category reports and stratified splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefill_router.data.prompt import Prompt, check_prompt, message_text, prompt_hash, prompt_text, unknown_role
from prefill_router.data.readers import iter_jsonl_objects, read_csv_records
from prefill_router.errors import DataError

REFERENCE_FIELDS = ("answer", "reference")


@dataclass(frozen=True)
class PromptItem:
    prompt_id: str
    prompt: Prompt                 # text, or chat messages as given (content parts and images kept)
    reference: Any = None          # str | number | list, or None
    category: str | None = None
    line: int = 0                  # where it came from, for error messages

    def messages(self) -> list[dict]:
        """The chat messages sent to a target."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return list(self.prompt)

    def encoding_problem(self) -> str | None:
        """Why this prompt cannot be sent as UTF-8 JSON (it holds a lone surrogate such as "\\ud800"), or None."""
        text = self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"it holds {text[exc.start]!r} after {text[max(0, exc.start - 30):exc.start]!r}: a lone "
                    "surrogate, which is not valid Unicode text")
        return None

    def text(self) -> str:
        """The prompt's text (`data.prompt.prompt_text`): what token estimates and the LLM judge read."""
        return prompt_text(self.prompt)


def _check_messages(value: Any, file: str, line: int) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", file=file, line=line, field="messages") from exc
        except RecursionError:
            raise DataError("JSON nested too deeply", file=file, line=line, field="messages") from None
    if not isinstance(value, list) or not value:
        raise DataError("must be a non-empty list of {role, content} objects", file=file, line=line,
                        field="messages")
    try:
        # the shape every stage reads; the messages themselves are sent as given, so their roles must be chat roles
        normal = check_prompt(value)
        problem = None if isinstance(normal, str) else unknown_role(normal)
    except DataError as exc:
        raise DataError(str(exc), file=file, line=line, field="messages") from None
    if problem:
        raise DataError(problem, file=file, line=line, field="messages")
    # A target answers the user, so a user message must hold text (a system prompt alone is not a request).
    if not any(message_text(m.get("content")).strip() for m in value if m["role"] == "user"):
        raise DataError("no user message with content", file=file, line=line, field="messages")
    return value


def _item(row: dict, file: str, line: int, reference_field: str | None) -> PromptItem:
    has_prompt = row.get("prompt") not in (None, "")
    has_messages = row.get("messages") not in (None, "")
    if has_prompt and has_messages:
        raise DataError("give either 'prompt' or 'messages', not both", file=file, line=line, field="prompt")
    if has_messages:
        prompt: Prompt = _check_messages(row["messages"], file, line)
    elif has_prompt:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise DataError(f"must be text, got {type(prompt).__name__}", file=file, line=line, field="prompt")
        if not prompt.strip():
            raise DataError("empty prompt", file=file, line=line, field="prompt")
    else:
        raise DataError("missing: each line needs 'prompt' (text) or 'messages'", file=file, line=line,
                        field="prompt")
    pid = row.get("prompt_id", row.get("id"))
    if pid in (None, ""):
        pid = prompt_hash(prompt, "collect_id")  # hashes a lone surrogate too, so the run can record it
    fields = (reference_field,) if reference_field else REFERENCE_FIELDS
    reference = next((row[f] for f in fields if row.get(f) not in (None, "")), None)
    category = row.get("category")
    return PromptItem(str(pid), prompt, reference, None if category in (None, "") else str(category), line)


def read_prompts(path: str | Path, *, reference_field: str | None = None) -> list[PromptItem]:
    """Prompts from a JSONL or CSV file (.gz accepted), with errors naming the file, line and field."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise DataError("file not found", file=file)
    items: list[PromptItem] = []
    gz = path.suffix.lower() == ".gz"
    is_csv = (path.with_suffix("") if gz else path).suffix.lower() == ".csv"

    if is_csv:
        # physical lines (a prompt may hold newlines); invalid UTF-8 and short rows are named errors
        header, records, starts = read_csv_records(path)
        if not ({"prompt", "messages"} & set(header)):
            raise DataError(f"header needs a 'prompt' or 'messages' column, has {header}", file=file, line=1,
                            field="prompt")
        for line, record in zip(starts, records):
            items.append(_item(dict(zip(header, record)), file, line, reference_field))
    else:
        for line, row in iter_jsonl_objects(path):
            items.append(_item(row, file, line, reference_field))
    if not items:
        raise DataError("no prompts", file=file)
    first_line: dict[str, int] = {}
    for item in items:
        if item.prompt_id in first_line:
            raise DataError(f"prompt_id {item.prompt_id!r} repeats (first on line {first_line[item.prompt_id]})",
                            file=file, line=item.line, field="prompt_id")
        first_line[item.prompt_id] = item.line
    return items
