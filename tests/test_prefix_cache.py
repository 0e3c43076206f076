"""Prefix reuse (features/prefix_cache.py): a prompt that extends a cached one runs only its new tokens, and
its features equal a full pass within float rounding."""

from __future__ import annotations

import numpy as np
import pytest

from prefill_router.features import load_encoder
from prefill_router.features.prefix_cache import BLOCK, PrefixCache, block_hashes

SYSTEM = ("you are a careful assistant. answer the question with the letter of the right option, "
          "and think about the quick brown fox before you answer. " * 2)
TURN_1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is the capital of france?"}]
TURN_2 = TURN_1 + [{"role": "assistant", "content": "A. paris"},
                   {"role": "user", "content": "and the capital of the lazy dog? A. rome B. paris"}]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from conftest import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("prefix-enc"), layers=4, max_positions=512)


def count_new_tokens(encoder) -> list[int]:
    """Tokens each forward of decoder layer 1 sees, appended to the returned list."""
    seen: list[int] = []
    encoder.model.get_decoder().layers[0].register_forward_hook(
        lambda module, args, output: seen.append(int((output[0] if isinstance(output, tuple) else output).shape[-2])))
    return seen


@pytest.mark.parametrize("layers", [[0, 2], [1, 4]], ids=["early-exit", "every-layer"])
def test_a_second_turn_runs_only_its_new_tokens_and_equals_a_full_pass(encoder_dir, layers):
    plain = load_encoder(str(encoder_dir))
    reusing = load_encoder(str(encoder_dir))
    reusing.use_prefix_cache(64)
    seen = count_new_tokens(reusing)
    n1, n2 = (len(x) for x in reusing.tokenize([TURN_1, TURN_2]))
    assert n1 >= 2 * BLOCK  # the test means something only if turn 1 leaves whole blocks behind

    first = reusing.encode([TURN_1], layers=layers)
    second = reusing.encode([TURN_2], layers=layers)
    assert seen[0] == n1  # nothing cached yet: the whole prompt ran
    reused = n1 // BLOCK * BLOCK if n1 % BLOCK else n1 - BLOCK
    assert seen[1] == n2 - reused  # turn 2 ran only what turn 1 had not
    for got, prompt in ((first, TURN_1), (second, TURN_2)):
        want = plain.encode([prompt], layers=layers)
        for pooling in ("mean", "last"):
            np.testing.assert_allclose(got[pooling], want[pooling], rtol=1e-4, atol=1e-5)
    assert reusing.prefix_cache.stats()["hits"] == 1


def test_prompts_sharing_a_system_prompt_reuse_it_inside_the_routing_window(encoder_dir):
    """The gateway's window keeps the system prompt and the last user turn: a new question after the same
    system prompt reuses the template opening and the system prompt, and the features stay exact."""
    plain = load_encoder(str(encoder_dir), max_route_tokens=256)
    reusing = load_encoder(str(encoder_dir), max_route_tokens=256)
    reusing.use_prefix_cache(64)
    seen = count_new_tokens(reusing)
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "two plus two? A. 4 B. 5"}]
    reusing.encode([TURN_1])
    got = reusing.encode([other, TURN_2])  # TURN_2's window is [system, its last user turn]
    total = sum(len(x) for x in reusing.tokenize([other, TURN_2]))
    assert sum(seen[1:]) < total - 2 * BLOCK  # both reused at least the system prompt's whole blocks
    want = plain.encode([other, TURN_2])
    for pooling in ("mean", "last"):
        np.testing.assert_allclose(got[pooling], want[pooling], rtol=1e-4, atol=1e-5)


def test_batched_prompts_fill_the_cache_exactly_under_both_paddings(encoder_dir):
    for side in ("right", "left"):
        reusing = load_encoder(str(encoder_dir), padding_side=side)
        reusing.use_prefix_cache(64)
        plain = load_encoder(str(encoder_dir))
        batch = [TURN_1, "what is the capital of france? A. paris B. rome", SYSTEM]
        reusing.encode(batch, batch_tokens=4096)  # one padded batch stores every prompt
        grown = [TURN_2, SYSTEM + " the lazy dog jumps over the fox"]
        got = reusing.encode(grown)
        assert reusing.prefix_cache.stats()["hits"] == 2
        want = plain.encode(grown)
        for pooling in ("mean", "last"):
            np.testing.assert_allclose(got[pooling], want[pooling], rtol=1e-4, atol=1e-5)


def test_the_cache_stays_within_its_byte_budget_and_forgets_the_oldest():
    import torch

    cache = PrefixCache(max_bytes=3 * 4 * BLOCK * 10)  # room for 3 one-block entries of 10 floats per token
    for n in range(5):
        ids = [n] * BLOCK
        cache.store(ids, 1, [(torch.zeros(1, 1, BLOCK, 5), torch.zeros(1, 1, BLOCK, 5))], torch.zeros(2, 1, 0))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.lookup([0] * BLOCK + [7], 1) is None  # the first ones are gone
    hit = cache.lookup([4] * BLOCK + [7], 1)
    assert hit is not None and hit.tokens == BLOCK
    assert cache.lookup([4] * BLOCK + [7], 2) is None  # stored states stop at depth 1: a deeper call misses
    assert cache.lookup([4] * BLOCK, 1) is None  # at least one token is always computed anew


def test_block_hashes_depend_on_every_earlier_block():
    a = block_hashes(list(range(3 * BLOCK)), 3)
    b = block_hashes([99] + list(range(1, 3 * BLOCK)), 3)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))
