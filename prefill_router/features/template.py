"""Turning a prompt (plain text or chat messages) into the exact text the encoder reads.

Three templates:
- `chat` (default, the paper's recipe): the encoder's own chat template over the conversation, with the
  generation prompt added, so the last token is where the model would start its answer. A plain-text prompt
  becomes one user turn. The template's default system turn is kept when the conversation has none.
  The result already holds the special tokens, so it is tokenized with `add_special_tokens=False`.
- `raw`: the text as given, tokenized the way the tokenizer normally encodes text (`add_special_tokens=True`).
  Chat messages are written one per line as `role: content`.
- `base`: for base (pretrained-only) models, which have no chat template (`gemma3-270m`'s default). Role-tagged
  plain text, the shape of the dialogue transcripts such a model read in pretraining: each turn as
  `Role: content` (System, User, Assistant, Tool; other roles title-cased), turns separated by a blank line,
  then the answer cue `Assistant:`, tokenized with `add_special_tokens=True` (the BOS token). A plain-text
  prompt is one user turn. Like the chat template's generation prompt, the cue puts the last token where the
  model would start its answer, so `last` pooling reads the same position in every prompt; `raw` ends wherever
  the prompt ends. The exact format is `BASE_TEMPLATE_RULE`, which the encoder identity records.

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

TemplateName = Literal["chat", "raw", "base"]
TEMPLATES = ("chat", "raw", "base")
# The `base` template: how each role is named, and the cue that ends every prompt.
BASE_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
BASE_ANSWER_CUE = "Assistant:"
# Recorded in the identity of features made with `base`, so a change of the format is a different identity.
BASE_TEMPLATE_RULE = "base-v1: 'Role: content' turns joined by blank lines, then 'Assistant:'; BOS added"


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
            raise EncoderError("the encoder's tokenizer has no chat template; use template='base' "
                               "(--template base) for a base model, or template='raw'")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]  # plain dicts, as typed there
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False renders text
        return text, False
    if template == "raw":
        if isinstance(prompt, str):
            return prompt, True
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages), True
    if template == "base":
        tagged = [f"{BASE_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
        return "\n\n".join([*tagged, BASE_ANSWER_CUE]), True
    raise EncoderError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
