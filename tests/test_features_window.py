"""The routing window (features/window.py): which messages the router reads, how many tokens, and its identity."""

from __future__ import annotations

import numpy as np
import pytest

from prefill_router.features.encoder import load_encoder
from prefill_router.features.reference import SMOLLM2_REFERENCE_IDENTITY
from prefill_router.features.window import WINDOW_RULE, first_turn, window_messages

SYSTEM = {"role": "system", "content": "You are an agent. Use tools."}
AGENT = [
    SYSTEM,
    {"role": "user", "content": "what is the weather in paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C " * 50},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "and in rome?"},
    {"role": "tool", "tool_call_id": "c2", "content": "rainy"},
]


def test_window_keeps_first_system_and_last_user_only():
    assert window_messages(AGENT) == [SYSTEM, AGENT[5]]
    assert window_messages(window_messages(AGENT)) == window_messages(AGENT)  # idempotent
    assert window_messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    # no user turn: the last message with text that is no tool result
    assert window_messages([SYSTEM, {"role": "assistant", "content": "hello"}, {"role": "tool", "content": "x"}]) \
        == [SYSTEM, {"role": "assistant", "content": "hello"}]
    assert first_turn(AGENT) == AGENT[:2]
    assert window_messages(first_turn(AGENT)) == AGENT[:2]


@pytest.fixture(scope="module")
def encoders(tiny_encoder_dir):
    return load_encoder(str(tiny_encoder_dir)), load_encoder(str(tiny_encoder_dir), max_route_tokens=64)


def test_single_turn_prompt_inside_the_window_has_the_same_features(encoders):
    plain, windowed = encoders
    prompts = ["what is 2 + 2?", [{"role": "user", "content": "the quick brown fox"}],
               [SYSTEM, {"role": "user", "content": "hi"}]]
    assert all(n <= 64 for n in windowed.count_tokens(prompts))
    a, b = plain.encode(prompts, poolings=("mean", "last")), windowed.encode(prompts, poolings=("mean", "last"))
    for pooling in ("mean", "last"):
        np.testing.assert_array_equal(a[pooling], b[pooling])


def test_window_caps_tokens_and_drops_history(encoders, tiny_encoder_dir):
    plain, windowed = encoders
    seen = []
    hook = windowed.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        windowed.encode([AGENT, "fox " * 500], poolings=("mean",))
    finally:
        hook.remove()
    assert seen and max(seen) <= 64
    # the window of the agent conversation is its system prompt and last user turn, whatever came between
    shorter = [SYSTEM, {"role": "user", "content": "an earlier question"}, AGENT[5]]
    np.testing.assert_array_equal(windowed.encode([AGENT])["mean"], windowed.encode([shorter])["mean"])
    text_only = [{"role": m["role"], "content": m["content"] or ""} for m in AGENT]
    assert plain.count_tokens([text_only])[0] > plain.count_tokens([shorter])[0]  # without a window: all of it


def test_window_is_part_of_the_identity_only_when_set(encoders):
    plain, windowed = encoders
    assert "window" not in plain.identity() and "max_route_tokens" not in plain.identity()
    assert windowed.identity()["window"] == WINDOW_RULE and windowed.identity()["max_route_tokens"] == 64
    assert {k: v for k, v in windowed.identity().items() if k not in ("window", "max_route_tokens")} == \
        plain.identity()
    assert "window" not in SMOLLM2_REFERENCE_IDENTITY  # the shared reference features were read whole
