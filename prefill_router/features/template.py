"""Turning a prompt (plain text or chat messages) into the exact text the encoder reads.

Two templates:
- `chat` (default, the paper's recipe): the encoder's own chat template over the conversation, with the
  generation prompt added, so the last token is where the model would start its answer. A plain-text prompt
  becomes one user turn. The template's default system turn is kept when the conversation has none.
  The result already holds the special tokens, so it is tokenized with `add_special_tokens=False`.
- `raw`: the text as given, tokenized the way the tokenizer normally encodes text (`add_special_tokens=True`).
  Chat messages are written one per line as `role: content`.

With a routing window (`window=True`, see `window.py`), only the window's messages are rendered.

The template name and everything that shapes the text (the chat template itself lives in the tokenizer
files, which the encoder identity hashes; the window) belong to the feature-set identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

from prefill_router.errors import EncoderError
from prefill_router.features.window import window_messages

TemplateName = Literal["chat", "raw"]
TEMPLATES = ("chat", "raw")


def as_messages(prompt: Any, row: int) -> list[dict]:
    """The prompt as chat messages; raises EncoderError naming the row when it is empty or malformed."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise EncoderError(f"prompt at row {row} is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise EncoderError(f"prompt at row {row} must be a non-empty string or a non-empty list of chat "
                           f"messages, got {type(prompt).__name__}{' (empty)' if not prompt else ''}")
    messages = []
    for j, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise EncoderError(f"prompt at row {row}, message {j}: expected a dict with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise EncoderError(f"prompt at row {row}, message {j}: 'content' must be text, "
                               f"got {type(message['content']).__name__}")
        messages.append({"role": str(message["role"]), "content": message["content"]})
    if not any(m["content"].strip() for m in messages):
        raise EncoderError(f"prompt at row {row} is empty (every message has empty content)")
    return messages


def render(prompt: Any, tokenizer, template: str, row: int = 0, window: bool = False) -> tuple[str, bool]:
    """(text, add_special_tokens) for one prompt under the named template; with `window`, of its routing
    window's messages only (a plain string is its own window)."""
    if window and isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        # The window first: messages it leaves out (tool calls with no text, tool results) need no checks.
        prompt = window_messages(prompt) or prompt
    messages = as_messages(prompt, row)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise EncoderError("the encoder's tokenizer has no chat template; use template='raw' "
                               "(--template raw)")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False
    if template == "raw":
        if isinstance(prompt, str):
            return prompt, True
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages), True
    raise EncoderError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def prompt_hash(prompt: Any) -> str:
    """A stable hash of a prompt's content (before templating; the template is part of the identity)."""
    if isinstance(prompt, str):
        payload = "s:" + prompt
    else:
        payload = "m:" + json.dumps([{"role": m.get("role"), "content": m.get("content")} for m in prompt],
                                    ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def prompt_hashes(prompts: Sequence[Any]) -> list[str]:
    return [prompt_hash(p) for p in prompts]
