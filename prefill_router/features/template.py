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

from typing import TYPE_CHECKING, Any, Literal

# prompt_hash(es) are re-exported: the feature store's manifests record them per row.
from prefill_router.data.prompt import Message, check_prompt, prompt_hash, prompt_hashes  # noqa: F401
from prefill_router.errors import DataError, EncoderError
from prefill_router.features.window import window_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TemplateName = Literal["chat", "raw"]
TEMPLATES = ("chat", "raw")


def as_messages(prompt: Any, row: int) -> list[Message]:
    """The prompt as chat messages (`data.prompt.check_prompt`'s rules); the error names the row."""
    try:
        normal = check_prompt(prompt)
    except DataError as exc:
        raise EncoderError(f"prompt at row {row}: {exc}") from None
    return [{"role": "user", "content": normal}] if isinstance(normal, str) else normal


def render(prompt: Any, tokenizer: PreTrainedTokenizerBase, template: str, row: int = 0,
           window: bool = False) -> tuple[str, bool]:
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
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]  # plain dicts, as typed there
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False renders text
        return text, False
    if template == "raw":
        if isinstance(prompt, str):
            return prompt, True
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages), True
    raise EncoderError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
