"""The one prompt type: plain text, or OpenAI-style chat messages; its one normaliser, validator and hash.

    Prompt = str | list[Message]          Message = {"role": str, "content": str}

Every stage takes prompts in this shape: the dataset readers, `collect`, the encoder's templating, the token
counter, the semantic baselines and the gateway.

- `as_prompt(x)` normalises: a string stays as it is; a message list becomes [{"role", "content": str}].
  OpenAI content given as parts keeps its text parts, joined by newlines (images and audio never reach the
  encoder); null content is "". Emptiness is not checked. (It is not called `normalize_prompt`: that public
  name in `data.splits` lowercases prompts to find duplicates.)
- `check_prompt(x)` is `as_prompt` plus the rule that a prompt holds some text. Both raise `DataError`
  naming the offending message and field (`messages[2].content[0].text must be a string`); callers add
  where the prompt came from (a file and line, a row, an HTTP request).
- `prompt_text(x)` is the text of a prompt: what token counts, duplicate detection and embeddings read.
- `prompt_hash(x, scheme=)` hashes a prompt. Hashes are persisted (feature-store manifests, dataset and
  collect ids), so each scheme's output is frozen; see `prompt_hash`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

from prefill_router.errors import ConfigError, DataError


class Message(TypedDict):
    role: str
    content: str


Prompt = str | list[Message]
# The roles OpenAI-compatible chat APIs accept ("function" is the deprecated name of "tool"). Data files may use
# others (the encoder reads any role); what is sent to an LLM, by `collect` or the gateway, must use these.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
HashScheme = Literal["features", "dataset_id", "collect_id"]


def message_text(content: Any, where: str = "content") -> str:
    """The text of one message's OpenAI `content`: a string, null (""), or a list of parts whose "text"
    parts are joined by newlines (other parts, such as images, are dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise DataError(f"{where}[{j}] must be an object")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise DataError(f"{where}[{j}].text must be a string")
                texts.append(part["text"])
        return "\n".join(texts)
    raise DataError(f"{where} must be a string, a list of parts, or null")


def unknown_role(messages: list[Message]) -> str | None:
    """Why these messages cannot go to an OpenAI-compatible API because of a role, or None."""
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            return f"messages[{i}].role {m['role']!r} is not a chat role; use one of {', '.join(CHAT_ROLES)}"
    return None


def as_prompt(prompt: Any) -> Prompt:
    """The prompt in its one shape (see the module docstring); raises DataError naming the bad field."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, (list, tuple)):
        raise DataError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    messages: list[Message] = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise DataError(f"messages[{i}].role must be a non-empty string")
        messages.append({"role": role, "content": message_text(m.get("content"), f"messages[{i}].content")})
    return messages


def check_prompt(prompt: Any) -> Prompt:
    """`as_prompt`, refusing a prompt with no text (an empty string, no messages, or only empty ones)."""
    normal = as_prompt(prompt)
    if isinstance(normal, str):
        if not normal.strip():
            raise DataError("empty prompt")
    elif not normal:
        raise DataError("empty prompt: a non-empty list of chat messages is needed")
    elif not any(m["content"].strip() for m in normal):
        raise DataError("empty prompt: the messages hold no text")
    return normal


def prompt_text(prompt: Any) -> str:
    """A prompt's text: the string itself, or its messages' non-empty contents joined by newlines (a single
    message dict counts as a one-message list)."""
    if isinstance(prompt, dict):
        prompt = [prompt]
    normal = as_prompt(prompt)
    if isinstance(normal, str):
        return normal
    return "\n".join(m["content"] for m in normal if m["content"])


def prompt_key(prompt: Any) -> str:
    """A prompt as one string, for equality: the text itself, or its messages as key-sorted JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompt_hash(prompt: Any, scheme: HashScheme = "features") -> str:
    """A stable hash of a prompt as given (normalise it first where the caller wants equal prompts to match).

    Each scheme's output is persisted somewhere, so none may change:
    - "features" (default): sha256 of "s:" + text, or of "m:" + compact JSON of the messages' role and
      content, first 32 hex digits. Feature-store manifests record it per row; the gateway keys its score
      cache with it (in memory).
    - "dataset_id": sha1 of `prompt_key`, first 12 hex digits: a routing dataset's prompt id when its file
      has no prompt_id column.
    - "collect_id": "p" + sha256 of `prompt_key`, first 16 hex digits: collect's prompt id when the prompt
      file has none (journals are keyed by it).
    Text is encoded with `surrogatepass`, so a prompt holding a lone surrogate still gets a hash (valid text
    hashes as plain UTF-8).
    """
    if scheme == "features":
        if isinstance(prompt, str):
            payload = "s:" + prompt
        else:
            payload = "m:" + json.dumps([{"role": m.get("role"), "content": m.get("content")} for m in prompt],
                                        ensure_ascii=False, separators=(",", ":"))
        return _hex(hashlib.sha256, payload)[:32]
    if scheme == "dataset_id":
        return _hex(hashlib.sha1, prompt_key(prompt))[:12]
    if scheme == "collect_id":
        return "p" + _hex(hashlib.sha256, prompt_key(prompt))[:16]
    raise ConfigError(f"unknown prompt hash scheme {scheme!r}", field="scheme")


def prompt_hashes(prompts: Sequence[Any]) -> list[str]:
    """The "features" hash of each prompt."""
    return [prompt_hash(p) for p in prompts]


def _hex(algorithm: Any, text: str) -> str:
    return str(algorithm(text.encode("utf-8", "surrogatepass")).hexdigest())
