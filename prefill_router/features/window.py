"""The routing window: which part of a conversation the router reads, and how much of it.

The rule (one rule for extraction, training and serving; `WINDOW_RULE` names it in the feature identity):

1. Messages: the first system message (its head, see 3) and the last user message. Everything else is left
   out: earlier user turns, assistant turns (and the tool calls they carry), tool results (`tool` and
   `function` roles). A conversation with no user message keeps its last message with text instead.
2. The kept messages are rendered with the encoder's template as usual (the chat template adds its default
   system turn and the generation prompt).
3. Tokens: when the rendered window is longer than `max_route_tokens`, the encoder's keep-head-and-tail rule
   cuts it to `max_route_tokens`: the first half (template opening and the head of the system prompt) and the
   last half (the end of the user turn and the generation prompt) are kept.

A plain single-turn prompt (a string, or one user message) is its own window, so within `max_route_tokens`
its features are exactly those computed without a window. The window is off unless `max_route_tokens` is set
(`EncoderSpec.max_route_tokens`, `prefill-router extract --max-route-tokens`); when set, the identity of the
features records `window` and `max_route_tokens`, and a router trained on them serves with the same window.

`first_turn` (the gateway's session mode) cuts the conversation after its first user message before the
window is taken, so every turn of a conversation reads the same window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

WINDOW_RULE = "first-system+last-user/keep-head-and-tail"
SYSTEM_ROLES = frozenset({"system", "developer"})  # OpenAI's newer name for the system turn
TOOL_ROLES = frozenset({"tool", "function"})
M = TypeVar("M", bound=Mapping[str, Any])  # a message: data.prompt.Message, or an OpenAI message dict


def _has_text(message: Mapping[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, str) and bool(content.strip())


def window_messages(messages: Sequence[M]) -> list[M]:
    """The messages the router reads (rule steps 1-2), in their original order. Idempotent."""
    messages = list(messages)
    system = next((i for i, m in enumerate(messages) if m.get("role") in SYSTEM_ROLES and _has_text(m)), None)
    turn = next((i for i in range(len(messages) - 1, -1, -1)
                 if messages[i].get("role") == "user" and _has_text(messages[i])), None)
    if turn is None:  # no user turn: the last message with text that is neither a system turn nor a tool result
        turn = next((i for i in range(len(messages) - 1, -1, -1)
                     if messages[i].get("role") not in SYSTEM_ROLES | TOOL_ROLES and _has_text(messages[i])), None)
    return [messages[i] for i in sorted({i for i in (system, turn) if i is not None})]


def first_turn(messages: Sequence[M]) -> list[M]:
    """The conversation up to and including its first user message (all of it when there is none)."""
    messages = list(messages)
    for i, m in enumerate(messages):
        if m.get("role") == "user" and _has_text(m):
            return messages[:i + 1]
    return messages
