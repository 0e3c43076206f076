"""The `surprise` pooling: statistics of the encoder's next-token loss, from the same forward as the states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefill_router.features import load_encoder
from prefill_router.features.extract import extract_to_store
from prefill_router.features.surprise import SURPRISE, SURPRISE_STATS

PROMPTS = ["what is the capital of france?", "the quick brown fox jumps over the lazy dog and the dog",
           "0123 + 45 = ?", "a"]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    return load_encoder(str(tiny_encoder_dir), device="cpu", dtype="float32")


def _direct(folder, encoder, prompt) -> np.ndarray:
    """The statistics from a plain forward of one unpadded prompt through the saved causal LM (with its own,
    untied, LM head)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([encoder.tokenize([prompt])[0]])
    with torch.inference_mode():
        logits = lm(input_ids=ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(1, ids[0, 1:, None]).squeeze(1)
    q = torch.quantile(nll, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return np.array([nll.mean(), nll.std(unbiased=False), nll.max(), *q, entropy, np.log1p(ids.shape[1])])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_surprise_matches_the_models_own_loss_in_a_padded_batch(tiny_encoder_dir, padding):
    encoder = load_encoder(str(tiny_encoder_dir), device="cpu", dtype="float32", padding_side=padding)
    out = encoder.encode(PROMPTS, poolings=["mean", SURPRISE], layers=[1])
    assert out[SURPRISE].shape == (len(PROMPTS), 1, len(SURPRISE_STATS))
    assert out["mean"].shape == (len(PROMPTS), 1, encoder.hidden_size)
    for i, prompt in enumerate(PROMPTS):
        expected = _direct(tiny_encoder_dir, encoder, prompt)
        np.testing.assert_allclose(out[SURPRISE][i, 0], expected, rtol=1e-4, atol=1e-4)
    # the states asked for beside it are those of a call without it (surprise runs every layer, not others)
    np.testing.assert_allclose(out["mean"], encoder.encode(PROMPTS, poolings=["mean"], layers=[1])["mean"],
                               rtol=1e-5, atol=1e-5)


def test_surprise_differs_between_prompts_and_skips_prefix_reuse(encoder):
    encoder.use_prefix_cache(16)
    try:
        first = encoder.encode(PROMPTS[:2], poolings=[SURPRISE])[SURPRISE]
        again = encoder.encode(PROMPTS[:2], poolings=[SURPRISE])[SURPRISE]
    finally:
        encoder.use_prefix_cache(None)
    np.testing.assert_allclose(first, again, rtol=1e-5)
    assert not np.allclose(first[0], first[1])


def test_a_store_holds_surprise_at_the_final_state(encoder, tmp_path):
    fs = extract_to_store(PROMPTS, encoder, tmp_path / "store", poolings=["mean", SURPRISE], layers=[0, 1],
                          dtype="float32", progress=False)
    final = encoder.num_hidden_states - 1
    assert fs.hidden_states == {"mean": [0, 1], SURPRISE: [final]}
    stored = fs.get(SURPRISE)
    assert stored.shape == (len(PROMPTS), 1, len(SURPRISE_STATS))
    np.testing.assert_allclose(stored, encoder.encode(PROMPTS, poolings=[SURPRISE])[SURPRISE], rtol=1e-5)
    np.testing.assert_allclose(fs.get("mean"), encoder.encode(PROMPTS, poolings=["mean"], layers=[0, 1])["mean"],
                               rtol=1e-5, atol=1e-6)
